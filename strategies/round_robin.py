"""``round_robin``: N nano-batches dealt over K lanes; nano-batch i runs on lane i mod K."""

from __future__ import annotations

from dynaflow.errors import StrategyError
from dynaflow.ir import ALL, Lane, NanoGraph, Schedule, SplitConfig
from dynaflow.strategies.base import SearchSpace, Strategy, program_order_key

__all__ = ["RoundRobin"]


class RoundRobin(Strategy):
    """Interleave nano-batches over K lanes (whole-batch ops on lane 0), each lane in program order."""

    name = "round_robin"

    @classmethod
    def search_candidates(cls, space: SearchSpace) -> list[dict]:
        return [{"nano_batches": n, "lanes": min(n, 2)} for n in space.nano_counts]
    default_nano_batches = 2

    def __init__(self, nano_batches: int | None = None, lanes: int = 2) -> None:
        super().__init__(nano_batches)
        if not isinstance(lanes, int) or lanes < 1:
            raise StrategyError(f"Strategy 'round_robin': lanes={lanes!r} must be an int >= 1.")
        self.num_lanes = lanes

    def lanes(self, graph: NanoGraph) -> list[Lane]:
        return [Lane(f"lane{i}") for i in range(min(self.num_lanes, max(graph.split.num, 1)))]

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        lanes = self.lanes(graph)
        order = {lane: [] for lane in lanes}
        for op in sorted(graph.ops, key=program_order_key(graph)):
            lane = lanes[0] if op.nano == ALL else lanes[op.nano % len(lanes)]
            order[lane].append(op)
        return Schedule.from_lanes(self.name, split, order)

    def describe(self) -> str:
        return f"nano-batch i on lane i mod {self.num_lanes}; whole-batch ops on lane 0"

    def __repr__(self) -> str:
        return f"RoundRobin(nano_batches={self.nano_batches}, lanes={self.num_lanes})"
