"""``nanoflow``: resource-aware overlap (NanoFlow). Compute-bound segments run on a compute lane,
memory- and network-bound ones on their own lanes; each lane takes its ops segment-major, so while the
compute lane runs nano-batch i+1's GEMMs the memory lane runs nano-batch i's attention."""

from __future__ import annotations

from dynaflow.ir import Lane, NanoGraph, Resource, Schedule, SplitConfig
from dynaflow.strategies.base import Strategy, program_order_key

__all__ = ["NanoFlow"]


class NanoFlow(Strategy):
    """One lane per resource (compute / memory / network); nano-batches staggered so resources overlap."""

    name = "nanoflow"
    default_nano_batches = 2

    def __init__(self, nano_batches: int | None = None, sm_counts: dict[str, int] | None = None) -> None:
        super().__init__(nano_batches)
        self.sm_counts = dict(sm_counts or {})

    def lanes(self, graph: NanoGraph) -> list[Lane]:
        used = {s.resource for s in graph.segments}
        return [Lane(r.value, r, self.sm_counts.get(r.value)) for r in Resource if r in used] or [Lane("compute", Resource.COMPUTE)]

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        lanes = {lane.resource: lane for lane in self.lanes(graph)}
        order = {lane: [] for lane in lanes.values()}
        for op in sorted(graph.ops, key=program_order_key(graph)):
            order[lanes[graph.segment(op).resource]].append(op)
        notes = [f"{lane.name}: {len(ops)} ops" for lane, ops in order.items()]
        return Schedule.from_lanes(self.name, split, order, notes)

    def describe(self) -> str:
        return "compute / memory / network segments on separate lanes, nano-batches staggered"
