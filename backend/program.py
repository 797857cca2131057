"""Lowering: ``Schedule`` → ``Program``, a straight-line launch list per lane with explicit event waits.

Each :class:`Launch` knows how to fetch its arguments from the step's value table (a flat list of
slots) — a full value, a nano-batch view of a full value (``narrow``, no copy), or the nano-batch size —
and where its outputs go: a slot, and for values needed whole (by a barrier or as a graph output) a
write into the matching rows of a full-batch buffer (no ``torch.cat``). Cross-lane dependencies become
``Wait`` instructions on the producer's event; a wait already implied by an earlier wait on the same
lane is dropped. Every executor (serial, thread, later cuda and sim) runs the same Program.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dynaflow.errors import BackendError
from dynaflow.ir import ALL, Lane, NanoGraph, NanoOp, Schedule, Segment, SplitConfig
from dynaflow.segmented import InputRoles, OutRef, SegmentedModule, ValueKind

__all__ = ["Arg", "Launch", "Wait", "Program", "lower", "empty_laid_out"]

# Argument fetch kinds
SLOT, VIEW, CONST = 0, 1, 2


@dataclass(frozen=True)
class Arg:
    """How a launch fetches one argument: ``SLOT`` env[slot]; ``VIEW`` rows [start, stop) of env[slot] along
    ``dim`` (``batch`` is the full batch size, so ``k = size(dim) // batch`` rows per item); ``CONST`` the
    constant ``value`` (a nano-batch size)."""

    kind: int
    slot: int = -1
    dim: int = 0
    start: int = 0
    stop: int = 0
    value: Any = None
    batch: int = 1

    def __repr__(self) -> str:
        if self.kind == SLOT:
            return f"%{self.slot}"
        if self.kind == VIEW:
            return f"%{self.slot}[{self.start}:{self.stop}]@{self.dim}"
        return repr(self.value)


@dataclass(frozen=True)
class Launch:
    """Run ``op``'s segment on its arguments; store outputs into ``out_slots``; write merged outputs
    ``(output index, buffer slot, dim, start, stop)`` into full-batch buffers; then signal ``event``."""

    op: NanoOp
    segment: Segment
    fn: Callable[..., Any] = field(repr=False)
    args: tuple[Arg, ...]
    out_slots: tuple[int, ...]
    returns_tuple: bool
    merges: tuple[tuple[int, int, int, int, int], ...] = ()
    event: int | None = None
    lane: str = ""

    slot_args: tuple[int, ...] | None = field(init=False, repr=False, compare=False)
    """The argument slots when every argument is a whole ``SLOT`` (most launches), else ``None``: a launch then
    indexes the value slots directly instead of calling :func:`fetch` per argument."""
    timeline_op: str = field(init=False, repr=False, compare=False)
    """The op's name in a :class:`~dynaflow.timeline.TimelineEvent` (made once, not on every launch)."""
    resource_name: str = field(init=False, repr=False, compare=False)
    """The segment's resource in a :class:`~dynaflow.timeline.TimelineEvent` (made once)."""

    def __post_init__(self) -> None:
        # plain instance attributes set at construction (not cached properties), so the step loop's attribute
        # reads stay on CPython's fast path
        slots = tuple(a.slot for a in self.args) if all(a.kind == SLOT for a in self.args) else None
        object.__setattr__(self, "slot_args", slots)
        object.__setattr__(self, "timeline_op", repr(self.op))
        resource = getattr(self.segment, "resource", None)
        object.__setattr__(self, "resource_name", getattr(resource, "value", ""))

    def __repr__(self) -> str:
        merges = "".join(f" ; out{o}→%{b}[{s}:{e}]@{d}" for o, b, d, s, e in self.merges)
        ev = f" ; record e{self.event}" if self.event is not None else ""
        return f"{self.op} = {self.segment.name}({', '.join(map(repr, self.args))}) → {list(self.out_slots)}{merges}{ev}"


@dataclass(frozen=True)
class Wait:
    """Block the lane until event ``event`` (recorded by ``op`` on another lane) has fired."""

    event: int
    op: NanoOp

    def __repr__(self) -> str:
        return f"wait e{self.event} ({self.op})"


Instr = Launch | Wait


@dataclass(frozen=True)
class Program:
    """The lowered step: per-lane instruction lists, slot counts, buffers and how to build the outputs."""

    lanes: tuple[Lane, ...]
    streams: tuple[tuple[Instr, ...], ...]
    num_inputs: int
    num_slots: int
    buffers: tuple[int, ...]
    """Slots that hold full-batch merge buffers, allocated on the first nano write of a step."""
    num_events: int
    serial_order: tuple[Launch, ...]
    """A global launch order consistent with lane orders and waits: what the serial executor runs."""
    serial_frees: tuple[tuple[int, ...], ...]
    """Per entry of ``serial_order``: slots read for the last time there, dropped right after it so
    intermediates are freed at last use (as fx's generated code does), not at the end of the step."""
    output_tree: Any
    output_slots: dict[str, int]
    batch_size: int
    split: SplitConfig
    schedule: Schedule
    inputs: InputRoles = InputRoles()
    """The inputs' names and roles (written in place, declared static): what a CUDA-graph replay binds."""
    buffer_layouts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Merge-buffer slots laid out in another dim order than row-major, as eager lays their value out."""

    @property
    def num_launches(self) -> int:
        return len(self.serial_order)

    @functools.cached_property
    def flat_output_slots(self) -> tuple[int, ...] | None:
        """The slot of each output when the output structure is a flat tuple of values (what Dynamo's graphs
        return), else ``None``: the outputs are then one tuple built without walking the structure."""
        tree = self.output_tree
        if type(tree) is not tuple or not all(type(t) is OutRef for t in tree):
            return None
        return tuple(self.output_slots[t.name] for t in tree)

    @functools.cached_property
    def distinct_output_slots(self) -> tuple[int, ...]:
        """The slots the outputs are read from, each once (several outputs may be one value)."""
        return tuple(sorted(set(self.output_slots.values())))

    def listing(self) -> str:
        """The program as text: one block per lane."""
        out = [repr(self)]
        for lane, instrs in zip(self.lanes, self.streams):
            out.append(f"  lane {lane!r}:")
            out.extend(f"    {i!r}" for i in instrs)
        return "\n".join(out)

    def __repr__(self) -> str:
        waits = sum(isinstance(i, Wait) for s in self.streams for i in s)
        return (f"Program({self.split}, {len(self.lanes)} lanes, {self.num_launches} launches, {waits} waits, "
                f"{len(self.buffers)} merge buffers)")


class _Lowering:
    """What the phases of :func:`lower` share: a slot per (value, nano-batch), the merge buffers, the row
    ranges of every split segment."""

    def __init__(self, seg: SegmentedModule, graph: NanoGraph):
        self.seg = seg
        self.split = split = graph.split
        self.B = split.batch_size
        self.bounds_of = {s.name: graph.split_of(s).boundaries for s in graph.segments if not s.whole}
        self.slots: dict[tuple[str, int], int] = {(name, ALL): v.index for name, v in seg.values.items()
                                                  if v.source == "input"}
        self.num_slots = seg.num_inputs
        self.producer_whole = {c.segment.name: c.segment.whole for c in seg.calls}
        self.calls = {c.segment.name: c for c in seg.calls}
        self.out_names = [leaf.name for leaf in _leaves(seg.output_tree)]
        self.single = split.num == 1 and not split.stages
        self.buffers: dict[str, int] = {n: self.new_slot() for n in sorted(self._needs_buffer())}

    def new_slot(self) -> int:
        self.num_slots += 1
        return self.num_slots - 1

    def _needs_buffer(self) -> set[str]:
        """Phase 1: which split-produced batch values are needed whole: by a whole consumer, by a split consumer
        whose split differs from its producer's (it re-slices a merged value), or as a graph output."""
        seg, whole = self.seg, self.producer_whole
        needs: set[str] = set()
        for c in seg.calls:
            if c.segment.whole:
                needs.update(a for a in c.args if _split_batch(seg, a, whole))
            elif self.split.stages:
                mine = self.bounds_of[c.segment.name]
                needs.update(a for a in c.args if _split_batch(seg, a, whole)
                             and self.bounds_of[seg.values[a].source] != mine)
        needs.update(n for n in self.out_names if _split_batch(seg, n, whole))
        return needs

    def arg_for(self, name: str, nano: int, consumer: str) -> Arg:
        """Phase 2: how a launch of ``consumer`` on nano-batch ``nano`` reads value ``name``."""
        v = self.seg.values[name]
        if v.source == "const":
            return Arg(CONST, value=self.seg.constants[name])
        bounds, B, slots = self.bounds_of.get(consumer, ()), self.B, self.slots
        if v.source == "input":
            if nano == ALL or v.kind is ValueKind.FREE:
                return Arg(SLOT, v.index)
            if v.kind is ValueKind.BATCH_SIZE:
                return Arg(CONST, value=bounds[nano][1] - bounds[nano][0])
            start, stop = bounds[nano]
            return Arg(VIEW, v.index, v.batch_dim or 0, start, stop, batch=B)
        if self.producer_whole[v.source]:
            if nano != ALL and v.kind is ValueKind.BATCH:
                start, stop = bounds[nano]
                return Arg(VIEW, slots[(name, ALL)], v.batch_dim or 0, start, stop, batch=B)
            return Arg(SLOT, slots[(name, ALL)])
        if nano == ALL:
            return Arg(SLOT, self.buffers[name] if v.kind is ValueKind.BATCH else slots[(name, 0)])
        produced = self.bounds_of[v.source]
        if produced != bounds and v.kind is ValueKind.BATCH:  # re-split: a view of the merged value
            start, stop = bounds[nano]
            return Arg(VIEW, self.buffers[name], v.batch_dim or 0, start, stop, batch=B)
        if produced != bounds:  # re-split, batch-free: the copy of a producer nano-batch this one depends on
            start = bounds[nano][0]
            return Arg(SLOT, slots[(name, next(j for j, (a, b) in enumerate(produced) if a <= start < b))])
        return Arg(SLOT, slots[(name, nano)])

    def launch(self, op: NanoOp, lane: str, event: int | None) -> Launch:
        """Phase 3: one op's launch — output slots, merges into full-batch buffers, arguments."""
        call = self.calls[op.segment]
        out_slots, merges = [], []
        for j, name in enumerate(call.outputs):
            if self.single and name in self.buffers:
                out_slots.append(self.buffers[name])  # one nano-batch: its output *is* the full value
                continue
            s = self.new_slot()
            self.slots[(name, op.nano)] = s
            out_slots.append(s)
            if name in self.buffers and op.nano != ALL:
                start, stop = self.bounds_of[op.segment][op.nano]
                merges.append((j, self.buffers[name], self.seg.values[name].batch_dim or 0, start, stop))
        if self.single:
            for name in call.outputs:
                if name in self.buffers:
                    self.slots[(name, op.nano)] = self.buffers[name]
        return Launch(op, call.segment, call.fn, tuple(self.arg_for(a, op.nano, op.segment) for a in call.args),
                      tuple(out_slots), call.returns_tuple, tuple(merges), event, lane)

    def output_slots(self) -> dict[str, int]:
        """Phase 5: the slot each graph output is read from."""
        out = {}
        for name in self.out_names:
            v = self.seg.values[name]
            if v.source == "const":
                raise BackendError(f"graph output {name!r} is a constant attribute; return a tensor computed from inputs")
            if v.source == "input":
                out[name] = v.index
            elif name in self.buffers:
                out[name] = self.buffers[name]
            else:
                out[name] = self.slots[(name, ALL if self.producer_whole[v.source] else 0)]
        return out


def _lane_streams(graph: NanoGraph, schedule: Schedule, launches: dict[NanoOp, Launch], lane_of: dict[NanoOp, int],
                  event_of: dict[NanoOp, int]) -> tuple[tuple[Instr, ...], ...]:
    """Phase 4: each lane's instructions — a Wait per cross-lane dependency not covered by an earlier wait."""
    streams = []
    for li, ops in enumerate(schedule.order):
        instrs: list[Instr] = []
        seen: dict[int, int] = {}  # other lane -> highest position already waited for
        for op in ops:
            for dep in graph.deps(op):
                lj = lane_of[dep]
                if lj == li:
                    continue
                p = schedule.order[lj].index(dep)
                if seen.get(lj, -1) >= p:
                    continue  # an earlier wait on a later op of that lane already covers it
                seen[lj] = p
                instrs.append(Wait(event_of[dep], dep))
            instrs.append(launches[op])
        streams.append(tuple(instrs))
    return tuple(streams)


def lower(seg: SegmentedModule, graph: NanoGraph, schedule: Schedule) -> Program:
    """Lower a verified schedule into a Program (see the module docstring), in phases: merge buffers, argument
    views, launches in program order, per-lane waits, output slots, and the serial order with its frees."""
    low = _Lowering(seg, graph)
    lane_of = {op: li for li, ops in enumerate(schedule.order) for op in ops}
    cross = {op for op in graph.ops if any(lane_of[u] != lane_of[op] for u in graph.users(op))}
    event_of = {op: i for i, op in enumerate(sorted(cross, key=graph.ops.index))}
    launches = {op: low.launch(op, schedule.lanes[lane_of[op]].name, event_of.get(op))  # producers before consumers
                for op in graph.ops}
    streams = _lane_streams(graph, schedule, launches, lane_of, event_of)
    output_slots = low.output_slots()
    serial = _serial_order(streams)
    return Program(
        lanes=schedule.lanes, streams=streams, num_inputs=seg.num_inputs, num_slots=low.num_slots,
        buffers=tuple(sorted(set(low.buffers.values()))) if not low.single else (), num_events=len(event_of),
        serial_order=serial, serial_frees=_last_uses(serial, seg.num_inputs, set(output_slots.values())),
        output_tree=seg.output_tree, output_slots=output_slots,
        batch_size=low.B, split=graph.split, schedule=schedule, inputs=seg.inputs,
        buffer_layouts={slot: order for name, slot in low.buffers.items()
                        if not low.single and (order := seg.values[name].dim_order) is not None},
    )


def _split_batch(seg: SegmentedModule, name: str, producer_whole: dict[str, bool]) -> bool:
    v = seg.values[name]
    return v.source not in ("input", "const") and not producer_whole[v.source] and v.kind is ValueKind.BATCH


def _leaves(tree: Any) -> list[OutRef]:
    if isinstance(tree, OutRef):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [x for t in tree for x in _leaves(t)]
    if isinstance(tree, dict):
        return [x for t in tree.values() for x in _leaves(t)]
    return []


def _last_uses(order: Sequence[Launch], num_inputs: int, keep: set[int]) -> tuple[tuple[int, ...], ...]:
    """For each launch, the intermediate slots it reads (or writes unused) for the last time."""
    last: dict[int, int] = {}
    for i, launch in enumerate(order):
        for slot in launch.out_slots:
            last.setdefault(slot, i)  # an output nobody reads dies right after its producer
        for a in launch.args:
            if a.kind != CONST:
                last[a.slot] = i
    frees: list[list[int]] = [[] for _ in order]
    for slot, i in last.items():
        if slot >= num_inputs and slot not in keep:
            frees[i].append(slot)
    return tuple(tuple(sorted(f)) for f in frees)


def _serial_order(streams: Sequence[Sequence[Instr]]) -> tuple[Launch, ...]:
    """Interleave lanes into one order that satisfies every wait (lowest lane first when several can go)."""
    pc = [0] * len(streams)
    fired: set[int] = set()
    order: list[Launch] = []
    total = sum(len(s) for s in streams)
    done = 0
    while done < total:
        progressed = False
        for li, instrs in enumerate(streams):
            while pc[li] < len(instrs):
                ins = instrs[pc[li]]
                if isinstance(ins, Wait):
                    if ins.event not in fired:
                        break
                else:
                    order.append(ins)
                    if ins.event is not None:
                        fired.add(ins.event)
                pc[li] += 1
                done += 1
                progressed = True
        if not progressed:
            raise BackendError("Program deadlocks: every lane waits on an event no lane can fire. "
                               "The schedule should have been rejected by verify(); please report this.")
    return tuple(order)


def empty_laid_out(shape: Sequence[int], order: tuple[int, ...] | None, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor of ``shape`` whose dims lie in memory in ``order`` (outermost first; ``None``:
    row-major), with ``like``'s dtype and device."""
    if order is None:
        return torch.empty(list(shape), dtype=like.dtype, device=like.device)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return torch.empty([shape[d] for d in order], dtype=like.dtype, device=like.device).permute(inverse)


def fetch(arg: Arg, env: list[Any]) -> Any:
    """Materialise one launch argument from the step's value table (a nano view is ``narrow``: no copy)."""
    if arg.kind == SLOT:
        return env[arg.slot]
    if arg.kind == VIEW:
        full = env[arg.slot]
        k = full.size(arg.dim) // arg.batch  # rows per batch item (k > 1 for a flattened batch·seq dim)
        return full.narrow(arg.dim, arg.start * k, (arg.stop - arg.start) * k)
    return arg.value
