"""Invariant checks for nano graphs and schedules.

A schedule is valid when every op of the graph appears exactly once, on one lane, and the union of
data dependencies and lane orders is acyclic. Acyclicity is exactly "no deadlock": each lane runs its
ops in order and waits for their dependencies, so a cycle is a lane waiting on itself.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import networkx as nx

from dynaflow.errors import ScheduleError

if TYPE_CHECKING:
    from dynaflow.ir import NanoGraph, Schedule

__all__ = ["verify_graph", "verify_schedule"]


def verify_graph(graph: "NanoGraph") -> None:
    """Check that the nano graph is a DAG whose edges only join ops of the same nano-batch, whole ops, or
    nano-batches of differently split segments whose rows overlap (a stage re-split)."""
    from dynaflow.ir import ALL

    if not nx.is_directed_acyclic_graph(graph.g):
        cycle = nx.find_cycle(graph.g)
        raise ScheduleError(f"NanoGraph has a dependency cycle: {cycle}. This is a bug in partitioning.")
    for a, b in graph.g.edges:
        if a.nano == b.nano or ALL in (a.nano, b.nano):
            continue
        (a0, a1), (b0, b1) = graph.rows(a), graph.rows(b)
        if graph.split_of(a) == graph.split_of(b) or a1 <= b0 or b1 <= a0:
            raise ScheduleError(f"NanoGraph edge {a} -> {b} crosses nano-batches; only whole ops, and re-split "
                                "nano-batches whose rows overlap, join them.")
    for op in graph.ops:
        if graph.ops.index(op) < max((graph.ops.index(d) for d in graph.deps(op)), default=-1):
            raise ScheduleError(f"NanoGraph op {op} comes before one of its dependencies in program order.")


def verify_schedule(schedule: "Schedule", graph: "NanoGraph") -> None:
    """Raise :class:`ScheduleError` naming the strategy and the offending ops if ``schedule`` is invalid."""
    who = f"Strategy {schedule.strategy!r} returned an invalid schedule"
    if schedule.split != graph.split:
        raise ScheduleError(f"{who}: it was planned for {schedule.split} but the graph uses {graph.split}.")
    if len(schedule.lanes) != len(schedule.order):
        raise ScheduleError(f"{who}: {len(schedule.lanes)} lanes but {len(schedule.order)} op lists.")
    if len({l.name for l in schedule.lanes}) != len(schedule.lanes):
        raise ScheduleError(f"{who}: lane names repeat: {[l.name for l in schedule.lanes]}; give each a unique name.")
    placed = [op for ops in schedule.order for op in ops]
    counts = Counter(placed)
    dup = sorted(op for op, n in counts.items() if n > 1)
    if dup:
        raise ScheduleError(f"{who}: ops scheduled more than once: {dup}. Each op must appear exactly once.")
    unknown = [op for op in placed if op not in graph]
    if unknown:
        raise ScheduleError(f"{who}: ops not in the graph: {unknown[:5]}. Valid ops look like {graph.ops[:3]}.")
    missing = [op for op in graph.ops if op not in counts]
    if missing:
        raise ScheduleError(
            f"{who}: {len(missing)} op(s) never scheduled, e.g. {missing[:5]}. Every op of the graph must be "
            "placed on exactly one lane."
        )
    _check_order(schedule, graph, who)


def _check_order(schedule: "Schedule", graph: "NanoGraph", who: str) -> None:
    lane_pos = {op: (li, i) for li, ops in enumerate(schedule.order) for i, op in enumerate(ops)}
    # A dependency placed later on the same lane can never be satisfied: name it plainly.
    for op, (li, i) in lane_pos.items():
        for dep in graph.deps(op):
            lj, j = lane_pos[dep]
            if lj == li and j > i:
                raise ScheduleError(
                    f"{who}: dependency violated on lane {schedule.lanes[li]!r}: {op} runs at position {i} "
                    f"but needs {dep}, which runs later at position {j}. Put {dep} before {op}."
                )
    combined = nx.DiGraph(graph.g)
    for ops in schedule.order:
        combined.add_edges_from(zip(ops, ops[1:]))
    if not nx.is_directed_acyclic_graph(combined):
        cycle = [e[0] for e in nx.find_cycle(combined)]
        where = ", ".join(f"{op}@{schedule.lane_of(op).name}" for op in cycle)
        raise ScheduleError(
            f"{who}: lane orders and dependencies form a cycle (a deadlock): {where}. Reorder the lanes so "
            "that every op's dependencies can finish first."
        )
