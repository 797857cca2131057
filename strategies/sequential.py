"""``sequential``: every op on one lane in program order — the semantic oracle for every test."""

from __future__ import annotations

from dynaflow.ir import Lane, NanoGraph, Schedule, SplitConfig
from dynaflow.strategies.base import Strategy

__all__ = ["Sequential"]


class Sequential(Strategy):
    """Run nano-batches one after another on a single lane (1 nano-batch unless asked for more)."""

    name = "sequential"
    default_nano_batches = 1

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        # graph.ops is segment-major program order: seg0[nb0], seg0[nb1], seg1[nb0], ...
        return Schedule.from_lanes(self.name, split, {Lane("main"): list(graph.ops)})
