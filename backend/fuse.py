"""Launch fusion for Inductor: consecutive launches of one lane compile as one unit.

Compiled one by one, every segment costs a Dynamo entry on the host (its guards, a config patch) and a kernel
boundary at each of its edges on the device, where ``torch.compile`` of the whole model has neither. A *run* of
launches -- one after another on one lane, no wait between them, no event recorded before the last -- executes
in that order on that lane whatever the executor does, so compiling it as one fx graph changes no ordering
between lanes: Inductor may fuse across the segments' edges, and the host makes one call instead of several.
A step of one nano-batch in program order becomes one launch, what ``torch.compile`` of the model would build.

Kept out of runs: segments tagged ``no-inductor`` (they run as captured), ``no-cudagraph`` (they run between
graph pieces), ``nano-context`` (each runs inside the engine's per-nano-batch context) or issuing collectives
(their order per communicator is checked launch by launch); a launch whose callable is not an fx GraphModule;
and a read of a merge buffer an earlier launch of the run writes into (that write happens after its launch,
outside the graph), which starts a new run.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Sequence

import torch
import torch.fx

from dynaflow.ir import NanoOp, Segment, SegmentKind
from dynaflow.backend.program import CONST, SLOT, VIEW, Arg, Instr, Launch, Program, Wait, _last_uses, _serial_order

__all__ = ["fuse_runs", "fusible", "KEPT_APART"]

KEPT_APART = frozenset({"no-inductor", "no-cudagraph", "nano-context"})
"""Segment hints whose launches are never fused with others (see the module docstring)."""


def fusible(launch: Launch) -> bool:
    """Whether a launch may join a run: an fx GraphModule segment without a hint that keeps it apart."""
    seg = launch.segment
    return (not (seg.hints & KEPT_APART) and not seg.collectives
            and isinstance(getattr(launch.fn, "__self__", launch.fn), torch.fx.GraphModule))


def fuse_runs(program: Program) -> Program:
    """``program`` with each run of two or more fusible launches replaced by one launch of a GraphModule that
    calls the run's segments in order (see the module docstring); the same program when there is none."""
    live_after = _readers(program)
    streams: list[tuple[Instr, ...]] = []
    fused_any = False
    for instrs in program.streams:
        out: list[Instr] = []
        run: list[Launch] = []

        def flush() -> None:
            nonlocal fused_any
            if len(run) > 1:
                out.append(_fuse(run, live_after))
                fused_any = True
            else:
                out.extend(run)
            run.clear()

        for ins in instrs:
            if isinstance(ins, Wait) or not fusible(ins):
                flush()
                out.append(ins)
                continue
            merged = {m[1] for launch in run for m in launch.merges}
            if any(a.kind != CONST and a.slot in merged for a in ins.args):
                flush()
            run.append(ins)
            if ins.event is not None:
                flush()
        flush()
        streams.append(tuple(out))
    if not fused_any:
        return program
    serial = _serial_order(streams)
    return dataclasses.replace(program, streams=tuple(streams), serial_order=serial,
                               serial_frees=_last_uses(serial, program.num_inputs,
                                                       set(program.output_slots.values())))


def _readers(program: Program) -> dict[int, set[int]]:
    """Slot → ids of the launches that read it; graph outputs are read by a reader no launch is (``-1``)."""
    readers: dict[int, set[int]] = {}
    for launch in program.serial_order:
        for a in launch.args:
            if a.kind != CONST:
                readers.setdefault(a.slot, set()).add(id(launch))
    for slot in program.output_slots.values():
        readers.setdefault(slot, set()).add(-1)
    return readers


def _fuse(run: Sequence[Launch], readers: dict[int, set[int]]) -> Launch:
    """One launch for ``run``: its arguments are the ones read from outside the run, its outputs the values read
    after it (by another launch, a merge or the graph's outputs). The GraphModule carries ``fuse_key``, its
    structure without slot numbers: the runs of two nano-batches that differ only in their rows share a compile."""
    members = {id(launch) for launch in run}
    made = {slot: (i, j) for i, launch in enumerate(run) for j, slot in enumerate(launch.out_slots)}
    merged_from = {launch.out_slots[m[0]] for launch in run for m in launch.merges}
    needed = [slot for launch in run for slot in launch.out_slots
              if slot in merged_from or readers.get(slot, set()) - members]

    reads: dict[int, set[Arg]] = {}
    for launch in run:
        for a in launch.args:
            if a.kind != CONST and a.slot not in made:
                reads.setdefault(a.slot, set()).add(a)
    shared = {slot for slot, args in reads.items() if len(args) > 1}
    """Outside values the run reads in more than one way (whole and as nano-batch rows, or as two nano-batches'
    rows): passed once, whole. Views of one tensor as separate inputs of one compile make Dynamo fakify their
    common base, whose batch dim the caller's ``maybe_mark_dynamic`` left marked, as a symbol with no source."""

    graph = torch.fx.Graph()
    root = torch.nn.Module()
    outer: list[Arg] = []
    placeholders: dict[Any, int] = {}
    nodes: list[torch.fx.Node] = []
    value: dict[int, torch.fx.Node] = {}
    structure: list[Any] = []

    def arg_node(a: Arg) -> torch.fx.Node:
        if a.kind != CONST and a.slot in made:  # made earlier in the run: a value of this graph
            node = value[a.slot]
            if a.kind == VIEW:
                structure.append(("rows", made[a.slot], a.dim, a.start, a.stop, a.batch))
                return graph.call_function(rows, (node, a.dim, a.start, a.stop, a.batch))
            structure.append(("value", made[a.slot]))
            return node
        if a.kind == VIEW and a.slot in shared:  # one input, its rows cut here: the compile sees no aliased inputs
            whole = arg_node(Arg(SLOT, a.slot))
            structure.append(("rows of", a.dim, a.start, a.stop, a.batch))
            return graph.call_function(rows, (whole, a.dim, a.start, a.stop, a.batch))
        key = ("const", len(outer)) if a.kind == CONST else (a.kind, a.slot, a.dim, a.start, a.stop, a.batch)
        if key not in placeholders:
            placeholders[key] = len(outer)
            nodes.append(graph.placeholder(f"arg{len(outer)}"))
            outer.append(a)
        structure.append(("arg", placeholders[key]))
        return nodes[placeholders[key]]

    for i, launch in enumerate(run):
        root.add_module(f"seg{i}", getattr(launch.fn, "__self__", launch.fn))
        call = graph.call_module(f"seg{i}", tuple(arg_node(a) for a in launch.args))
        outs = ([graph.call_function(operator.getitem, (call, j)) for j in range(len(launch.out_slots))]
                if launch.returns_tuple else [call])
        value.update(zip(launch.out_slots, outs))
        structure.append((launch.segment.name, launch.returns_tuple, len(launch.out_slots)))
    graph.output(tuple(value[slot] for slot in needed))
    module = torch.fx.GraphModule(root, graph, class_name="FusedRun")
    module.fuse_key = (tuple(structure), tuple(made[slot] for slot in needed))

    position = {slot: k for k, slot in enumerate(needed)}
    merges = tuple((position[launch.out_slots[j]], buf, dim, start, stop)
                   for launch in run for j, buf, dim, start, stop in launch.merges)
    last = run[-1]
    segment = _fused_segment(run, "+".join(launch.segment.name for launch in run))
    return Launch(NanoOp(segment.name, last.op.nano), segment, module, tuple(outer), tuple(needed), True, merges,
                  last.event, last.lane)


def _fused_segment(run: Sequence[Launch], name: str) -> Segment:
    """The segment a fused launch stands for: the run's names joined, its first segment's resource; split when
    every member is, else the first whole member's kind (what an error note names)."""
    segs = [launch.segment for launch in run]
    kind = next((s.kind for s in segs if s.kind is not SegmentKind.SPLIT), SegmentKind.SPLIT)
    hints = frozenset.intersection(*(s.hints for s in segs))
    return Segment(name, segs[0].index, segs[0].resource, kind, hints, rule="fused run",
                   reason=f"{len(segs)} launches of lane {run[0].lane!r} compiled as one",
                   num_nodes=sum(s.num_nodes for s in segs))


def rows(full: torch.Tensor, dim: int, start: int, stop: int, batch: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a value made earlier in a fused run, as :func:`~dynaflow.backend.program.fetch`
    takes them (``k`` rows per batch item)."""
    k = full.size(dim) // batch
    return full.narrow(dim, start * k, (stop - start) * k)
