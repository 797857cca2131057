"""The ``Strategy`` base class: every hook has a working default; override one to change one behaviour.

A strategy decides (1) the split rules (``rules()``), (2) the nano-batch split for a batch size
(``split_config(info)``), and (3) the schedule: either declaratively (``plan(graph, split)`` returns a
:class:`Schedule`) or imperatively, DynaFlow style, with ``async def schedule(self, ctx)`` calling
``ctx.pop(nano)`` and ``ctx.execute(op, lane=...)``. The imperative program is *recorded* once per
batch size into a static Schedule; it never runs per step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from dynaflow.errors import StrategyError
from dynaflow.ir import ALL, InputInfo, Lane, NanoGraph, NanoOp, Resource, Schedule, Segment, SplitConfig
from dynaflow.strategies import splits

__all__ = ["Strategy", "ScheduleContext", "SearchSpace", "SearchSpec"]


class _Done:
    """A completed awaitable, so ``await ctx.execute(...)`` and plain ``ctx.execute(...)`` both work."""

    def __await__(self):  # type: ignore[no-untyped-def]
        return iter(())


class ScheduleContext:
    """What an imperative ``schedule(ctx)`` sees while it is being recorded.

    ``pop(nano)`` returns nano-batch ``nano``'s next op in program order (a whole-batch op appears in every
    nano-batch's sequence and is returned once), or ``None`` when that nano-batch is done.
    ``execute(op, lane=...)`` appends ``op`` to a lane's order.
    """

    def __init__(self, strategy: "Strategy", graph: NanoGraph, lanes: Sequence[Lane]):
        self.strategy = strategy
        self.graph = graph
        self.split = graph.split
        self.lanes = {lane.name: lane for lane in lanes}
        self._order: dict[str, list[NanoOp]] = {lane.name: [] for lane in lanes}
        self._queues = {i: list(graph.ops_of_nano(i)) for i in range(graph.num_nanos)}
        self._taken: set[NanoOp] = set()

    @property
    def num_nano_batches(self) -> int:
        return self.split.max_num

    def segment(self, op: NanoOp):  # type: ignore[no-untyped-def]
        return self.graph.segment(op)

    def peek(self, nano: int) -> NanoOp | None:
        q = self._queues.get(nano)
        if q is None:
            raise StrategyError(f"Strategy {self.strategy.name!r}: ctx.pop({nano!r}) but nano-batches are numbered 0..{self.split.max_num - 1} (ints).")
        while q and q[0] in self._taken:
            q.pop(0)
        return q[0] if q else None

    def pop(self, nano: int) -> NanoOp | None:
        op = self.peek(nano)
        if op is not None:
            self._queues[nano].pop(0)
            self._taken.add(op)
        return op

    def done(self, nano: int | None = None) -> bool:
        nanos = range(self.split.max_num) if nano is None else [nano]
        return all(self.peek(i) is None for i in nanos)

    def execute(self, op: NanoOp, lane: str | Lane | None = None) -> _Done:
        name = lane.name if isinstance(lane, Lane) else (lane or next(iter(self.lanes)))
        if name not in self._order:
            raise StrategyError(
                f"Strategy {self.strategy.name!r}: ctx.execute({op}, lane={name!r}) names an unknown lane; "
                f"declared lanes: {list(self._order)}. Declare it in lanes()."
            )
        if not isinstance(op, NanoOp):
            raise StrategyError(f"Strategy {self.strategy.name!r}: ctx.execute() needs a NanoOp from ctx.pop(); got {op!r}.")
        self._taken.add(op)
        self._order[name].append(op)
        return _Done()

    def to_schedule(self, notes: Sequence[str] = ()) -> Schedule:
        return Schedule.from_lanes(self.strategy.name, self.split, {self.lanes[n]: ops for n, ops in self._order.items()}, notes)


@dataclass(frozen=True)
class SearchSpace:
    """What a tuning bucket offers a strategy's :meth:`Strategy.search_candidates`: the batch's facts, the segments'
    resources, the device's SMs and their granularity, and the search's limits."""

    info: InputInfo
    resources: frozenset[Resource]
    num_sms: int | None = None
    granularity: int = 8
    max_nano_batches: int = 4
    sm_steps: int = 4

    @property
    def nano_counts(self) -> range:
        """Nano-batch counts worth trying: 2 .. min(max_nano_batches, batch)."""
        return range(2, max(1, min(self.max_nano_batches, self.info.batch_size)) + 1)

    def sm_splits(self) -> list[int]:
        """SM counts for the smaller partition, multiples of the granularity, below the device's total."""
        if not self.num_sms:
            return []
        out = []
        for k in range(1, self.sm_steps):
            sm = max(self.granularity, int(self.num_sms * k / self.sm_steps) // self.granularity * self.granularity)
            if sm < self.num_sms:
                out.append(sm)
        return out


@dataclass(frozen=True)
class SearchSpec:
    """How a strategy wants to be autotuned (returned by :meth:`Strategy.search`): where the candidates come
    from, the tuning-bucket policy, how many predictions to measure and how often, the disk cache, and the
    strategy to run while ranks disagree."""

    candidates: Callable[[InputInfo, set[Resource], int | None, int], list[Any]]
    buckets: str = "pow2"
    measure_top_k: int = 2
    repeats: int = 5
    cache: bool = True
    fallback: "Strategy | None" = None
    phase_bound: Any = None
    """A :class:`~dynaflow.phase_bound.PhaseBound` measured candidates must keep to win (``None``: no bound)."""
    wrap: "Callable[[Strategy], Strategy] | None" = None
    """Applied to the strategy of every candidate, cached winner included (an engine integration's request
    alignment and nano-batch cap); ``None``: candidates run as built."""


class Strategy:
    """Base strategy: one nano-batch, program order, one lane — i.e. sequential execution."""

    name: str = "strategy"
    default_nano_batches: int = 1
    graphs: bool = False
    """Whether steps planned by this strategy run as CUDA graphs even when ``cuda_graphs`` is off (set by
    ``auto`` on a winner it measured faster that way)."""
    passthrough: bool = False
    """Whether the compiled graph runs the captured graph as is instead of a plan (the ``eager`` floor)."""

    def __init__(self, nano_batches: int | None = None, min_rows: int = 1) -> None:
        if nano_batches is not None and (not isinstance(nano_batches, int) or nano_batches < 1):
            raise StrategyError(f"Strategy {self.name!r}: nano_batches={nano_batches!r} must be an int >= 1 or None.")
        if not isinstance(min_rows, int) or min_rows < 1:
            raise StrategyError(f"Strategy {self.name!r}: min_rows={min_rows!r} must be an int >= 1.")
        self.nano_batches = nano_batches
        self.min_rows = min_rows

    # -- hooks -------------------------------------------------------------------------------------
    def rules(self) -> Sequence[Any] | None:
        """Split rules; ``None`` means dynaflow's defaults (attention, MLP/MoE, collectives)."""
        return None

    def split_config(self, info: InputInfo) -> SplitConfig:
        """Nano-batch sizes for this batch: the requested or default count, cut at request boundaries
        when the caller declared requests (else evenly), merged up to ``min_rows`` rows per nano-batch."""
        n = info.requested_nano_batches or self.nano_batches or self.default_nano_batches
        if info.request_lengths is not None:
            split = splits.token_balanced(info, n)
        elif info.requested_nano_batches:
            split = SplitConfig.even(info.batch_size, n)  # an explicit count the batch cannot hold is an error
        else:
            split = splits.even(info, n)
        return splits.with_min_rows(split, self.min_rows) if self.min_rows > 1 else split

    def lanes(self, graph: NanoGraph) -> list[Lane]:
        """The lanes this strategy schedules onto."""
        return [Lane("main")]

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        """Declarative planning; the default records :meth:`schedule` if a subclass defines it."""
        if _overrides(self, "schedule"):
            return self.record(graph)
        return Schedule.from_lanes(self.name, split, {self.lanes(graph)[0]: list(graph.ops)})

    def search(self) -> SearchSpec | None:
        """The autotuner's search this strategy asks for (``auto`` returns one); ``None``: plan directly."""
        return None

    @classmethod
    def search_candidates(cls, space: SearchSpace) -> list[dict[str, Any]]:
        """Points of the autotuner's search space for this strategy: option dicts for ``cls(**options)``.
        The default tries nothing; ``auto`` asks every registered strategy, so a strategy registered from
        outside the package is searched once it declares its points here."""
        return []

    # -- imperative recording ------------------------------------------------------------------------
    def record(self, graph: NanoGraph) -> Schedule:
        """Run ``schedule(ctx)`` once against a recorder and return the Schedule it produced."""
        ctx = ScheduleContext(self, graph, self.lanes(graph))
        result = self.schedule(ctx)  # type: ignore[attr-defined]
        if inspect.iscoroutine(result):
            try:
                while True:
                    yielded = result.send(None)
                    result.close()
                    raise StrategyError(
                        f"Strategy {self.name!r}: schedule(ctx) awaited {yielded!r}; it may only await ctx.execute() "
                        "— it is recorded once at plan time, not run per step."
                    )
            except StopIteration:
                pass
        return ctx.to_schedule()

    def describe(self) -> str:
        """One line saying what this strategy does with its parameters (for explain())."""
        return (self.__doc__ or self.name).strip().splitlines()[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nano_batches={self.nano_batches})"


def _overrides(obj: object, method: str) -> bool:
    return callable(getattr(type(obj), method, None)) and getattr(type(obj), method) is not getattr(Strategy, method, None)


def program_order_key(graph: NanoGraph):  # type: ignore[no-untyped-def]
    """Sort key (segment index, nano) — any per-lane order sorted by it is deadlock-free."""
    return lambda op: (graph.index(op.segment), op.nano if op.nano != ALL else -1)


def pipelined_order_key(graph: NanoGraph, lane_of: Callable[[Segment], Any]):  # type: ignore[no-untyped-def]
    """Sort key (run, nano, segment index): software pipelining across layers.

    A *run* is a maximal stretch of consecutive segments (program order) on one lane, all split the same way
    and none whole; inside a run ops go nano-batch-major, so a lane finishes nano-batch 0's whole stretch
    (``post0(i) pre0(i+1)``) before nano-batch 1's (``post1(i) pre1(i+1)``) and the next lane gets nano-batch
    0's work early (NanoFlow's pipeline: compute ``pre0 pre1 | post0(i) pre0(i+1) post1(i) pre1(i+1) …``,
    memory ``attn0(i) attn1(i) …``). A run ends where an op depends on another nano-batch of the same run,
    so the key is a topological order of the whole graph: per-lane orders sorted by it are deadlock-free."""
    run_of: dict[str, int] = {}
    run, members, prev = -1, set(), None  # type: ignore[var-annotated]
    for seg in graph.segments:
        split = None if seg.whole else graph.split_of(seg).sizes
        key = (lane_of(seg), split)
        cross = any(d.segment in members and d.nano != op.nano for op in graph.ops_of(seg) for d in graph.deps(op))
        if seg.whole or prev is None or key != prev or cross:
            run, members = run + 1, set()
        run_of[seg.name] = run
        members.add(seg.name)
        prev = key if not seg.whole else None
    return lambda op: (run_of[op.segment], op.nano if op.nano != ALL else -1, graph.index(op.segment))
