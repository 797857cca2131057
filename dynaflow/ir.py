"""The intermediate representation: segments, split configs, nano-ops, the nano graph, lanes, schedules.

All IR objects are small frozen dataclasses whose repr reads like what they describe::

    >>> SplitConfig.even(7, 3)
    SplitConfig(7 → 3/2/2)
    >>> NanoOp("attn_1", 2)
    attn_1[nb2]
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import networkx as nx

from dynaflow.errors import ConfigError, ScheduleError

__all__ = [
    "Resource",
    "HINTS",
    "SegmentKind",
    "Segment",
    "SplitConfig",
    "InputInfo",
    "NanoOp",
    "ALL",
    "NanoGraph",
    "Lane",
    "Schedule",
]

ALL = -1
"""The nano-batch index of an op that runs once on the whole batch (barriers, batch-free segments)."""

HINTS = frozenset({"no-inductor", "no-cudagraph", "barrier", "batch-local", "nano-context", "pure"})
"""Segment hints. ``barrier`` forces a whole-batch segment; ``batch-local`` asserts (and trusts) that a
segment the analysis flags as coupled is in fact row-separable (e.g. MoE token permutations);
``nano-context`` marks a segment that reads per-step host state (an engine's attention metadata), so
executors run each nano-batch launch of it inside the active :func:`dynaflow.nanocontext.nano_context`;
``pure`` asserts that the segment's ops write nothing but their outputs and the arguments their schemas mark
written, so ``auto`` may run it again to time it (ops from libraries outside aten/prims/c10d/dynaflow are
otherwise assumed to write hidden state, such as an engine's KV cache)."""


class Resource(str, enum.Enum):
    """The hardware resource a segment is bound by."""

    COMPUTE = "compute"
    MEMORY = "memory"
    NETWORK = "network"
    TRANSFER = "transfer"
    """Copies between host and device: the copy engines, which no kernel competes with."""

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


class SegmentKind(str, enum.Enum):
    """How a segment meets the nano-batches.

    ``split``: runs once per nano-batch on its slice; ``barrier``: couples the batch, so all nano-batches
    join, it runs once on the whole batch, and they split again; ``shared``: touches no batch data, runs
    once and every nano-batch reads its result.
    """

    SPLIT = "split"
    BARRIER = "barrier"
    SHARED = "shared"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


@dataclass(frozen=True)
class Segment:
    """One cut of the captured graph: a named group of consecutive fx nodes with its tags."""

    name: str
    index: int
    resource: Resource
    kind: SegmentKind = SegmentKind.SPLIT
    hints: frozenset[str] = frozenset()
    rule: str = "default"
    reason: str = ""
    num_nodes: int = 0
    flops: int | None = None
    bytes: int | None = None
    collectives: tuple[str, ...] = ()
    """The collectives the segment issues, in order, as ``"all_reduce@<group name>"``."""
    main_split: bool = False
    """Runs at the main split even when its resource has a stage of its own: it shares a tensor written in
    place with a segment of another resource, and all accesses of one written tensor must see the same rows."""

    @property
    def whole(self) -> bool:
        """Runs once on the whole batch (barrier or shared)."""
        return self.kind is not SegmentKind.SPLIT

    def __repr__(self) -> str:
        extra = f", hints={{{', '.join(sorted(self.hints))}}}" if self.hints else ""
        kind = "" if self.kind is SegmentKind.SPLIT else f", {self.kind.value}"
        if self.collectives:
            extra += f", collectives=[{', '.join(self.collectives)}]"
        if self.main_split:
            extra += ", main split"
        return f"Segment({self.name!r}, {self.resource.value}{kind}{extra})"


@dataclass(frozen=True)
class SplitConfig:
    """Nano-batch sizes along the batch dimension; uneven sizes are allowed.

    Worked example: a batch of 7 rows in 3 nano-batches::

        SplitConfig.even(7, 3).sizes      == (3, 2, 2)
        SplitConfig.even(7, 3).boundaries == ((0, 3), (3, 5), (5, 7))
    """

    sizes: tuple[int, ...]
    labels: tuple[str, ...] | None = None
    """Optional name per nano-batch (e.g. ``("prefill", "decode")``) for strategies that treat them apart."""
    stages: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Per-resource re-splits, NanoFlow style: ``(("memory", (2, 2, 2, 2)),)`` runs memory-bound segments in
    four nano-batches while the others use ``sizes``. Where the split changes between a producer and a
    consumer, the value is merged into a full-batch buffer and re-sliced (views, no copies beyond the merge)."""

    def __post_init__(self) -> None:
        sizes = as_ints(self.sizes, "SplitConfig sizes", "rows per nano-batch, e.g. SplitConfig((3, 3))")
        object.__setattr__(self, "sizes", sizes)
        if self.stages:
            example = "rows per nano-batch, e.g. stages=(('memory', (2, 2, 2)),)"
            stages = tuple(sorted((str(r), as_ints(sz, f"SplitConfig stage {r!r} sizes", example))
                                  for r, sz in dict(self.stages).items()))
            object.__setattr__(self, "stages", stages)
            for r, sz in stages:
                if r not in {x.value for x in Resource}:
                    raise ConfigError(f"SplitConfig stages name {r!r}; stages are keyed by resource: "
                                      f"{[x.value for x in Resource]}.")
                if not sz or any(x < 1 for x in sz) or sum(sz) != sum(sizes):
                    raise ConfigError(f"SplitConfig stage {r!r} sizes {sz} must be >= 1 and sum to the batch "
                                      f"{sum(sizes)}, like the main sizes {sizes}.")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))
            if len(self.labels) != len(sizes):
                raise ConfigError(f"SplitConfig labels {self.labels} must give one label per nano-batch ({len(sizes)}).")
        if not sizes:
            raise ConfigError("SplitConfig needs at least one nano-batch size; got sizes=().")
        if any(s < 1 for s in sizes) and sizes != (0,):  # (0,): a rank without rows joining its peers' step
            raise ConfigError(
                f"SplitConfig sizes must all be >= 1; got {sizes}. Use fewer nano-batches for this batch."
            )

    @classmethod
    def even(cls, batch_size: int, nano_batches: int) -> "SplitConfig":
        """Split ``batch_size`` rows into ``nano_batches`` near-equal parts, larger parts first."""
        if nano_batches < 1 or nano_batches > batch_size:
            raise ConfigError(
                f"nano_batches={nano_batches} is invalid for a batch of {batch_size} rows: it must be "
                f"between 1 and the batch size ({batch_size}). Pass nano_batches<= {batch_size}, or leave "
                "nano_batches unset (None) so the strategy picks per batch size and a batch of 1 runs whole."
            )
        base, extra = divmod(batch_size, nano_batches)
        return cls(tuple(base + (1 if i < extra else 0) for i in range(nano_batches)))

    @classmethod
    def whole(cls, batch_size: int) -> "SplitConfig":
        """One nano-batch holding the whole batch (of no rows too: a data-parallel rank left idle this step)."""
        return cls((batch_size,))

    @property
    def batch_size(self) -> int:
        return sum(self.sizes)

    @property
    def num(self) -> int:
        return len(self.sizes)

    @property
    def boundaries(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` row ranges, one per nano-batch."""
        out, start = [], 0
        for s in self.sizes:
            out.append((start, start + s))
            start += s
        return tuple(out)

    def for_resource(self, resource: "Resource | str") -> "SplitConfig":
        """The split segments of ``resource`` use: its stage sizes if it has some, else the main sizes.

        Example: ``SplitConfig((4, 4), stages=(("memory", (2, 2, 2, 2)),)).for_resource("memory").sizes``
        is ``(2, 2, 2, 2)``; ``.for_resource("compute").sizes`` is ``(4, 4)``.
        """
        key = resource.value if isinstance(resource, Resource) else str(resource)
        for r, sizes in self.stages:
            if r == key:
                return SplitConfig(sizes)
        return SplitConfig(self.sizes, self.labels) if self.stages else self

    def for_segment(self, segment: "Segment") -> "SplitConfig":
        """The split ``segment`` runs with (see :meth:`for_resource`; a ``main_split`` segment takes the main
        sizes)."""
        if not self.stages:
            return self
        return SplitConfig(self.sizes, self.labels) if segment.main_split else self.for_resource(segment.resource)

    @property
    def max_num(self) -> int:
        """The largest nano-batch count over the main split and its stages."""
        return max([self.num] + [len(sz) for _, sz in self.stages])

    def __repr__(self) -> str:
        labels = f" {'/'.join(self.labels)}" if self.labels else ""
        stages = "".join(f", {r} {'/'.join(map(str, sz))}" for r, sz in self.stages)
        return f"SplitConfig({self.batch_size} → {'/'.join(map(str, self.sizes))}{labels}{stages})"


@dataclass(frozen=True)
class InputInfo:
    """What a strategy knows about one batch (size, device, requests) when it picks a split config.

    ``request_lengths`` gives the rows (tokens) each request occupies along the batch dim, in batch order,
    and ``request_phases`` each request's phase (``"prefill"`` or ``"decode"``); callers set them per step
    with :func:`dynaflow.requests` so splits can fall on request boundaries.
    """

    batch_size: int
    device: str = "cpu"
    dtype: str = "float32"
    request_lengths: tuple[int, ...] | None = None
    requested_nano_batches: int | None = None
    request_phases: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.request_lengths is not None:
            lengths = tuple(int(n) for n in self.request_lengths)
            object.__setattr__(self, "request_lengths", lengths)
            if any(n < 1 for n in lengths) and sum(lengths) == self.batch_size:
                empty = next(i for i, n in enumerate(lengths) if n < 1)
                raise ConfigError(
                    f"request_lengths={lengths}: request {empty} has no rows; leave requests without rows out of "
                    "dynaflow.requests(...) (every request listed holds at least one row of the batch)."
                )
            if any(n < 1 for n in lengths) or sum(lengths) != self.batch_size:
                raise ConfigError(
                    f"request_lengths={lengths} must be positive and sum to the batch size {self.batch_size} "
                    f"(they sum to {sum(lengths)}). Pass one length per request, in batch order."
                )
        if self.request_phases is not None:
            phases = tuple(self.request_phases)
            object.__setattr__(self, "request_phases", phases)
            bad = [p for p in phases if p not in PHASES]
            if bad:
                raise ConfigError(f"request_phases has {bad[0]!r}; each phase must be one of {PHASES}.")
            if self.request_lengths is None or len(phases) != len(self.request_lengths):
                raise ConfigError(
                    f"request_phases has {len(phases)} entries but request_lengths has "
                    f"{'none' if self.request_lengths is None else len(self.request_lengths)}; give one phase per request."
                )

    @property
    def requests(self) -> tuple[tuple[int, int], ...] | None:
        """``(start, stop)`` row ranges, one per request (``None`` when the caller gave no requests)."""
        if self.request_lengths is None:
            return None
        out, start = [], 0
        for n in self.request_lengths:
            out.append((start, start + n))
            start += n
        return tuple(out)

    def __repr__(self) -> str:
        extra = f", nano_batches={self.requested_nano_batches}" if self.requested_nano_batches else ""
        if self.request_lengths is not None:
            extra += f", requests={len(self.request_lengths)}"
        if self.request_phases is not None:
            extra += f", prefill={self.request_phases.count('prefill')}"
        return f"InputInfo(batch={self.batch_size}, {self.device}, {self.dtype}{extra})"


PHASES = ("prefill", "decode")


def as_ints(values: object, what: str, example: str) -> tuple[int, ...]:
    """``values`` as a tuple of ints (Python or NumPy ints, 0-d integer tensors), or a :class:`ConfigError` naming
    ``what``: a string or a float is not a size (``int("33")`` would quietly read one)."""
    if isinstance(values, (str, bytes)):
        raise ConfigError(f"{what} must be a sequence of ints ({example}); got the string {values!r}.")
    try:
        return tuple(operator.index(v) for v in values)  # type: ignore[union-attr]
    except TypeError:
        raise ConfigError(f"{what} must be a sequence of ints ({example}); got {values!r}.") from None


@dataclass(frozen=True, order=True)
class NanoOp:
    """One (segment, nano-batch) launch; ``nano == ALL`` for a whole-batch op."""

    segment: str
    nano: int

    def __repr__(self) -> str:
        return f"{self.segment}[{'all' if self.nano == ALL else f'nb{self.nano}'}]"


class NanoGraph:
    """The nano-batch operator graph: a networkx DiGraph of :class:`NanoOp` with data-dependency edges.

    Built from the ordered segments, the segment-level dependencies and a split config: a split segment
    becomes one op per nano-batch, a barrier/shared segment one op on the whole batch. A split consumer
    depends on the same nano-batch of a split producer; anything touching a whole op joins all of them.
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        segment_deps: Iterable[tuple[str, str]],
        split: SplitConfig,
    ) -> None:
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.split = split
        self._by_name: dict[str, Segment] = {s.name: s for s in self.segments}
        self.g: nx.DiGraph = nx.DiGraph()
        order: list[NanoOp] = []
        for seg in self.segments:
            for op in self._ops_of(seg):
                self.g.add_node(op)
                order.append(op)
        self.ops: tuple[NanoOp, ...] = tuple(order)
        self.segment_deps = tuple(sorted(set(segment_deps), key=lambda e: (self.index(e[1]), self.index(e[0]))))
        for prod, cons in self.segment_deps:
            self._connect(self._by_name[prod], self._by_name[cons])
        nx.freeze(self.g)  # strategies read it; the schedule they return is verified against it

    def split_of(self, seg: Segment | NanoOp | str) -> SplitConfig:
        """The split a segment runs with: the main sizes, or its resource's stage sizes."""
        return self.split.for_segment(seg if isinstance(seg, Segment) else self.segment(seg))

    def rows(self, op: NanoOp) -> tuple[int, int]:
        """The ``(start, stop)`` batch rows ``op`` processes (the whole batch for a whole op)."""
        if op.nano == ALL:
            return (0, self.split.batch_size)
        return self.split_of(op).boundaries[op.nano]

    def ops_of(self, seg: Segment) -> list[NanoOp]:
        """The ops of one segment: one per nano-batch of its split, or one whole op."""
        return self._ops_of(seg)

    def _ops_of(self, seg: Segment) -> list[NanoOp]:
        if seg.whole:
            return [NanoOp(seg.name, ALL)]
        return [NanoOp(seg.name, i) for i in range(self.split_of(seg).num)]

    def _connect(self, prod: Segment, cons: Segment) -> None:
        if not prod.whole and not cons.whole:
            a, b = self.split_of(prod), self.split_of(cons)
            if a.sizes == b.sizes:
                for i in range(a.num):
                    self.g.add_edge(NanoOp(prod.name, i), NanoOp(cons.name, i))
                return
            # a re-split: each consumer nano-batch waits for the producer nano-batches its rows overlap
            for j, (cs, ce) in enumerate(b.boundaries):
                for i, (ps, pe) in enumerate(a.boundaries):
                    if ps < ce and cs < pe:
                        self.g.add_edge(NanoOp(prod.name, i), NanoOp(cons.name, j))
            return
        for p in self._ops_of(prod):
            for c in self._ops_of(cons):
                self.g.add_edge(p, c)

    def segment(self, op: NanoOp | str) -> Segment:
        return self._by_name[op.segment if isinstance(op, NanoOp) else op]

    def index(self, name: str) -> int:
        return self._by_name[name].index

    def deps(self, op: NanoOp) -> list[NanoOp]:
        return sorted(self.g.predecessors(op), key=self.ops.index)

    def users(self, op: NanoOp) -> list[NanoOp]:
        return sorted(self.g.successors(op), key=self.ops.index)

    @property
    def num_nanos(self) -> int:
        """Nano-batch indices in use: the largest count over the main split and its stages."""
        return self.split.max_num

    def ops_of_nano(self, nano: int) -> list[NanoOp]:
        """The ops nano-batch ``nano`` runs, in program order (whole ops included)."""
        return [op for op in self.ops if op.nano in (nano, ALL)]

    def __contains__(self, op: object) -> bool:
        return op in self.g

    def __iter__(self) -> Iterator[NanoOp]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        return (
            f"NanoGraph({len(self.segments)} segments × {self.split}, "
            f"{len(self.ops)} ops, {self.g.number_of_edges()} edges)"
        )


@dataclass(frozen=True)
class Lane:
    """An execution lane: a CUDA stream (with an optional SM partition) on GPU, a thread on CPU."""

    name: str
    resource: Resource | None = None
    sm_count: int | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.sm_count is not None and self.sm_count < 1:
            raise ConfigError(f"Lane {self.name!r}: sm_count must be >= 1 or None; got {self.sm_count}.")

    def __repr__(self) -> str:
        parts = [repr(self.name)]
        if self.resource is not None:
            parts.append(self.resource.value)
        if self.sm_count is not None:
            parts.append(f"sm={self.sm_count}")
        if self.priority:
            parts.append(f"priority={self.priority}")
        return f"Lane({', '.join(parts)})"


@dataclass(frozen=True)
class Schedule:
    """Every nano-op placed on a lane, in order. ``order[i]`` is the op sequence of ``lanes[i]``."""

    strategy: str
    split: SplitConfig
    lanes: tuple[Lane, ...]
    order: tuple[tuple[NanoOp, ...], ...]
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        bad = next(((lane,) for lane in self.lanes if not isinstance(lane, Lane)), None)  # (None,): a lane of None
        if bad is not None:
            bad = bad[0]
            raise ScheduleError(f"Schedule of strategy {self.strategy!r}: lane {bad!r} is a {type(bad).__name__}, not "
                                f"a dynaflow.Lane; key the lanes by Lane objects, e.g. {{Lane({str(bad)!r}): [ops]}}.")
        shape = isinstance(self.order, tuple) and all(  # (the count per lane is verify_schedule's to check)
            isinstance(ops, tuple) and all(isinstance(op, NanoOp) for op in ops) for ops in self.order)
        if not shape:
            got = type(self.order).__name__
            if isinstance(self.order, (tuple, list)):
                got += f" of {[type(o).__name__ for o in self.order][:4]}"
            raise ScheduleError(
                f"Schedule of strategy {self.strategy!r}: order must hold one tuple of NanoOps per lane; got {got}. "
                "Build it with Schedule.from_lanes(strategy, split, {lane: [ops]}).")

    @classmethod
    def from_lanes(
        cls,
        strategy: str,
        split: SplitConfig,
        lanes: Mapping[Lane, Sequence[NanoOp]],
        notes: Sequence[str] = (),
    ) -> "Schedule":
        """Build from ``{lane: [ops...]}`` (insertion order of the mapping is lane order)."""
        return cls(strategy, split, tuple(lanes), tuple(tuple(v) for v in lanes.values()), tuple(notes))

    @property
    def num_ops(self) -> int:
        return sum(len(o) for o in self.order)

    def lane_of(self, op: NanoOp) -> Lane:
        for lane, ops in zip(self.lanes, self.order):
            if op in ops:
                return lane
        raise KeyError(op)

    def levels(self, graph: NanoGraph) -> dict[NanoOp, int]:
        """Earliest step of each op if every op took one unit: ops on one level may run together."""
        level: dict[NanoOp, int] = {}
        prev: dict[NanoOp, NanoOp | None] = {}
        for ops in self.order:
            for i, op in enumerate(ops):
                prev[op] = ops[i - 1] if i else None
        pending = [op for ops in self.order for op in ops]
        while pending:
            progressed = False
            for op in list(pending):
                before = [d for d in graph.deps(op)] + ([prev[op]] if prev.get(op) else [])
                if all(b in level for b in before):
                    level[op] = 1 + max((level[b] for b in before), default=-1)
                    pending.remove(op)
                    progressed = True
            if not progressed:  # cyclic: verify() reports it; the table shows lane order only
                for op in pending:
                    level[op] = -1
                break
        return level

    def table(self, graph: NanoGraph | None = None) -> str:
        """A lane × step table; with ``graph``, rows are dependency levels so concurrent ops share a row."""
        width = max([len(repr(op)) for ops in self.order for op in ops] + [len(repr(l)) for l in self.lanes] + [4])
        if graph is None:
            rows: dict[int, dict[int, NanoOp]] = {}
            for li, ops in enumerate(self.order):
                for step, op in enumerate(ops):
                    rows.setdefault(step, {})[li] = op
        else:
            level = self.levels(graph)
            rows = {}
            for li, ops in enumerate(self.order):
                for op in ops:
                    rows.setdefault(level[op], {})
                    cell = rows[level[op]]
                    cell[li] = op if li not in cell else cell[li]
        head = "step | " + " | ".join(repr(l).ljust(width) for l in self.lanes)
        out = [f"{self!r}", head, "-" * len(head)]
        for step in sorted(rows):
            out.append(
                f"{step:>4} | " + " | ".join(repr(rows[step].get(li, "")).ljust(width) if li in rows[step]
                                            else "".ljust(width) for li in range(len(self.lanes)))
            )
        return "\n".join(line.rstrip() for line in out)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"Schedule({self.strategy!r}, {self.split}, {len(self.lanes)} lanes, {self.num_ops} ops)"
