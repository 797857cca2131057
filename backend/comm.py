"""Collectives in a lowered program: the ordering rule and a communicator per lane.

**The rule.** On every rank, each communicator must see the same collectives in the same order. A lane
runs its ops in a fixed order, so a communicator used by exactly one lane is always ordered. Therefore:

* with ``lane_communicators=True`` (the default) every ``(process group, lane)`` pair gets its own
  communicator: the lowest lane issuing collectives on a group keeps the group the model was written with,
  each further lane gets a clone over the same ranks (:func:`dynaflow.distributed.lane_group`), and the
  segments it runs are rewritten to name the clone;
* with ``lane_communicators=False`` one communicator serves all lanes, so the collectives on it must be
  totally ordered by dependencies and lane orders; two that could run concurrently are rejected at plan
  time (:func:`check_collective_order`) with a :class:`ScheduleError` naming both.

Either way the per-communicator sequence is a function of the schedule, so ranks that plan the same
schedule issue the same sequence; :func:`order_text` describes it for the cross-rank check
(:func:`dynaflow.distributed.check_same_order`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Iterator, Sequence

import networkx as nx
import torch
import torch.fx

from dynaflow import distributed
from dynaflow.collective_ops import is_collective, group_name_of, set_group_name
from dynaflow.errors import BackendError, ScheduleError
from dynaflow.ir import ALL, NanoGraph, NanoOp, Schedule, SplitConfig
from dynaflow.backend.program import Launch, Program

__all__ = ["groups_of", "lane_assignment", "check_collective_order", "order_text", "order_key", "collective_blocker",
           "bind_communicators",
           "has_collectives", "DistributedPlanner"]

log = logging.getLogger(__name__)


def groups_of(collectives: tuple[str, ...]) -> list[str]:
    """Process-group names in a segment's collectives (``"all_reduce@0"`` → ``"0"``), in order, unique."""
    out: list[str] = []
    for c in collectives:
        g = c.rsplit("@", 1)[-1]
        if g not in out:
            out.append(g)
    return out


def collective_blocker(segments: Sequence[Any]) -> str | None:
    """Why a step must not run its segments an extra time (the split check, an Inductor warm-up): a segment
    issues collectives, which a rank running it again would issue without the other ranks; else ``None``."""
    return next((f"segment {s.name!r} issues collectives ({', '.join(s.collectives)}) that the other ranks would "
                 "not issue with it" for s in segments if s.collectives), None)


def has_collectives(graph: NanoGraph) -> bool:
    return any(s.collectives for s in graph.segments)


def lane_assignment(schedule: Schedule, graph: NanoGraph, lane_communicators: bool = True) -> dict[tuple[str, str], str | None]:
    """``{(group, lane): None | "clone"}``: which lanes use the model's group as written and which need a clone."""
    lanes_of: dict[str, list[int]] = {}
    for li, ops in enumerate(schedule.order):
        for op in ops:
            for g in groups_of(graph.segment(op).collectives):
                if li not in lanes_of.setdefault(g, []):
                    lanes_of[g].append(li)
    out: dict[tuple[str, str], str | None] = {}
    for g, lanes in sorted(lanes_of.items()):
        for k, li in enumerate(sorted(lanes)):
            out[(g, schedule.lanes[li].name)] = "clone" if (lane_communicators and k > 0) else None
    return out


def check_collective_order(schedule: Schedule, graph: NanoGraph, lane_communicators: bool = True) -> None:
    """Reject a schedule whose collectives could be issued in different orders (see the module docstring)."""
    if lane_communicators or not has_collectives(graph):
        return
    lane_pos = {op: li for li, ops in enumerate(schedule.order) for op in ops}
    combined = nx.DiGraph(graph.g)
    for ops in schedule.order:
        combined.add_edges_from(zip(ops, ops[1:]))
    by_group: dict[str, list[NanoOp]] = {}
    for op in graph.ops:
        for g in groups_of(graph.segment(op).collectives):
            by_group.setdefault(g, []).append(op)
    for g, ops in sorted(by_group.items()):
        if len({lane_pos[op] for op in ops}) < 2:
            continue
        after = {op: nx.descendants(combined, op) for op in ops}
        for i, a in enumerate(ops):
            for b in ops[i + 1:]:
                if lane_pos[a] != lane_pos[b] and b not in after[a] and a not in after[b]:
                    la, lb = schedule.lanes[lane_pos[a]].name, schedule.lanes[lane_pos[b]].name
                    ca = ", ".join(graph.segment(a).collectives)
                    cb = ", ".join(graph.segment(b).collectives)
                    raise ScheduleError(
                        f"Strategy {schedule.strategy!r} lets collectives on process group {g!r} run concurrently: "
                        f"{a} ({ca}) on lane {la!r} and {b} ({cb}) on lane {lb!r} are not ordered by dependencies or "
                        "lane order, so ranks could issue them in different orders (a deadlock or mismatched tensors). "
                        "Fix: put network segments on one lane (e.g. strategy='nanoflow'), or keep "
                        "lane_communicators=True so each lane gets its own communicator."
                    )


def order_text(program: Program) -> str:
    """Per communicator (``group`` or ``group/lane``), the collective launches in lane order."""
    seq: dict[str, list[str]] = {}
    for lane, instrs in zip(program.lanes, program.streams):
        for ins in instrs:
            if isinstance(ins, Launch) and ins.segment.collectives:
                key = ",".join(groups_of(ins.segment.collectives))
                seq.setdefault(f"{key}@{lane.name}", []).append(f"{ins.op}:{'+'.join(ins.segment.collectives)}")
    return "\n".join(f"{k}: {' '.join(v)}" for k, v in sorted(seq.items()))


def order_key(program: Program) -> str:
    """What ranks must hold alike (:func:`order_text` is what an error shows): per lane, the collective launches
    in order, each as segment, nano-batch and collectives, with each process group named by its first
    appearance (``g0``, ``g1``...): the groups' own names differ by rank when each rank's tensor-parallel group
    is another group of the world. In a step of one nano-batch every op is the whole batch (``all``): a batch of
    one captures a graph of its own, whose ops say ``nb0`` where the dynamic graph's say ``all``."""
    canonical: dict[str, str] = {}
    whole = program.split.num == 1
    lines = []
    for lane, instrs in zip(program.lanes, program.streams):
        ops = []
        for ins in instrs:
            if isinstance(ins, Launch) and ins.segment.collectives:
                names = []
                for c in ins.segment.collectives:
                    name, _, group = c.rpartition("@")
                    names.append(f"{name}@{canonical.setdefault(group, f'g{len(canonical)}')}")
                nano = "all" if whole or ins.op.nano == ALL else f"nb{ins.op.nano}"
                ops.append(f"{ins.op.segment}[{nano}]:{'+'.join(names)}")
        if ops:
            lines.append(f"{lane.name}: {' '.join(ops)}")
    return "\n".join(lines)


def _rebind(fn: Callable[..., Any], names: dict[str, str]) -> Callable[..., Any]:
    gm = getattr(fn, "__self__", None)
    if not isinstance(gm, torch.fx.GraphModule):
        raise BackendError(
            f"Cannot give a lane its own communicator: segment callable {fn!r} is not a GraphModule's forward. "
            "Pass lane_communicators=False and schedule network segments on one lane."
        )
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in graph.nodes:
        if is_collective(node) and group_name_of(node) in names:
            set_group_name(node, names[group_name_of(node)])
    return torch.fx.GraphModule(gm, graph).forward


def bind_communicators(program: Program, graph: NanoGraph, make_group: Callable[[str, str], str],
                       lane_communicators: bool = True) -> Program:
    """Rewrite the collective segments of lanes that need their own communicator.

    ``make_group(group, lane)`` returns the clone's registered name (it is called for each pair in sorted
    order — the order every rank must create them in). Returns ``program`` unchanged when no lane needs one.
    """
    need = lane_assignment(program.schedule, graph, lane_communicators)
    clones = {key: make_group(*key) for key in sorted(k for k, v in need.items() if v == "clone")}
    if not clones:
        return program
    cache: dict[tuple[str, str], Callable[..., Any]] = {}
    swapped: dict[int, Launch] = {}

    def swap(ins: Launch) -> Launch:
        if id(ins) in swapped:
            return swapped[id(ins)]
        names = {g: clones[(g, ins.lane)] for g in groups_of(ins.segment.collectives) if (g, ins.lane) in clones}
        if not names:
            swapped[id(ins)] = ins
            return ins
        key = (ins.segment.name, ins.lane)
        if key not in cache:
            cache[key] = _rebind(ins.fn, names)
        new = dataclasses.replace(ins, fn=cache[key])
        swapped[id(ins)] = new
        return new

    streams = tuple(tuple(swap(i) if isinstance(i, Launch) else i for i in s) for s in program.streams)
    serial = tuple(swap(i) for i in program.serial_order)
    log.debug("bound %d lane communicators: %s", len(clones), clones)
    return dataclasses.replace(program, streams=streams, serial_order=serial)



class DistributedPlanner:
    """Per captured graph: the ranks' split agreement, the ordering check and the lane communicators.

    ``agree(split, resplit)`` runs on every call when agreement is active (one tiny all_reduce), so ranks
    whose batch sizes differ — data-parallel serving — still take part in the same collectives; a nano-batch
    count seen for the first time is *fresh* on every rank at once (they agreed on it), and only then may
    planning communicate: create lane communicators and compare collective orders across ranks.
    """

    def __init__(self, segments: Any, agree: bool | None = None, lane_communicators: bool = True,
                 strategy: str = "?") -> None:
        self.groups = sorted({g for s in segments for g in groups_of(s.collectives)})
        self.agree_option = agree
        self.lane_communicators = lane_communicators
        self.strategy = strategy
        self._seen: set[tuple[int, Any]] = set()
        self._fresh = True
        self._lockstep = False
        self._made: set[tuple[str, str]] = set()

    def _group(self) -> Any:
        import torch.distributed as dist

        return distributed.resolve_group(self.groups[0]) if len(self.groups) == 1 else dist.group.WORLD

    @property
    def agreeing(self) -> bool:
        """Whether ranks agree on the split: ``distributed_agree`` True, or None with collectives in the graph,
        and torch.distributed initialized with more than one rank in the agreement group."""
        if self.agree_option is False or (self.agree_option is None and not self.groups):
            return False  # decided without asking torch.distributed: this is read on every call
        if not distributed.initialized():
            return False
        return distributed.group_size(self._group()) > 1

    def agree(self, split: SplitConfig, resplit: Callable[[int], SplitConfig] | None = None) -> SplitConfig:
        """The split all ranks use (one all_reduce). It is *fresh* when this graph has not planned it before
        on some rank: which graphs a rank holds is its own (a batch of one, or an input with other strides,
        captures a graph on that rank alone), so the ranks' planned splits are compared in the same
        all_reduce, and any difference makes the call fresh on every rank."""
        if not self.agreeing:
            return split
        split, same = distributed.agree_split_state(split, self._group(), resplit, repr(sorted(self._seen)))
        if not self._lockstep:
            key = (split.num, split.stages)
            self._fresh = not same or key not in self._seen
            self._seen.add(key)
        return split

    def fail(self) -> None:
        """This rank's split failed before the agreement: the other ranks, waiting in it, raise too."""
        if self.agreeing:
            distributed.fail_agreement(self._group())

    def agree_key(self, key: str, batch: int, detail: str = "") -> tuple[bool, int, bool]:
        """Whether every rank holds ``key`` now, the smallest batch, and whether every rank holds ``detail``
        (see :func:`distributed.agree_key`)."""
        return distributed.agree_key(key, batch, self._group(), detail)

    def max_over_ranks(self, values: Sequence[float]) -> list[float]:
        return distributed.max_over_ranks(values, self._group())

    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        """Every rank plans the same things in the same order (the autotuner's search): planning may create
        communicators and compare collective orders for any nano-batch count, seen before or not."""
        fresh, self._fresh, self._lockstep = self._fresh, True, True
        try:
            yield
        finally:
            self._fresh, self._lockstep = fresh, False

    def finish(self, schedule: Schedule, graph: NanoGraph, program: Program) -> Program:
        """Check the collective order, compare orders across ranks (when fresh), bind lane communicators."""
        check_collective_order(schedule, graph, self.lane_communicators)
        if not has_collectives(graph):
            return program
        agreeing = self.agreeing

        def make(group: str, lane: str) -> str:
            if agreeing and not self._fresh and (group, lane) not in self._made \
                    and not distributed.has_lane_group(group, lane):
                raise ScheduleError(
                    f"Strategy {self.strategy!r} needs a new communicator for lane {lane!r} (group {group!r}) for "
                    f"{graph.split}, but that nano-batch count was planned before, so other ranks will not create it "
                    "with this rank. Fix: make the strategy's lanes depend only on the nano-batch count."
                )
            self._made.add((group, lane))
            return distributed.lane_group(group, lane)

        self.check(program)  # before any communicator is made: ranks whose lanes differ fail here
        return bind_communicators(program, graph, make, self.lane_communicators)

    def check(self, program: Program) -> None:
        """Compare the collective order across ranks when this call is fresh; also for a plan this rank made
        before, since another rank may be planning it now (and waits in this check)."""
        if self._fresh and self.groups and self.agreeing:
            distributed.check_same_order(order_text(program), self._group(), self.strategy, order_key(program))

    def describe(self) -> str:
        """One line for ``explain()``: groups, whether ranks agree on the split, which lanes got communicators."""
        made = ", ".join(f"{lane}: clone of group {g!r}" for g, lane in sorted(self._made)) or "none"
        mode = "one per lane" if self.lane_communicators else "one per group (collectives must be ordered)"
        return (f"collectives on process group(s) {self.groups}; split agreement "
                f"{'on' if self.agreeing else 'off'}; communicators {mode}; lane clones: {made}")

    def abort(self, exc: BaseException) -> None:
        """Planning failed on this rank: take part in the order check with a failure marker, so the other
        ranks (which planned fine and wait in it) raise too instead of hanging."""
        if self.groups and self.agreeing and self._fresh:
            import torch.distributed as dist

            try:
                distributed.check_same_order(f"planning failed on rank {dist.get_rank()}: {exc}", self._group(),
                                             self.strategy)
            except ScheduleError:
                pass  # this rank raises its own error

