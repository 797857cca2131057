"""``two_batch_overlap``: SGLang TBO / vLLM DBO as a schedule. The batch splits into two halves at the
request boundary closest to half the tokens; the second half runs one stage behind the first, so while
half A runs stage i on the compute lane, half B's stage i-1 — its communication or memory-bound part
(MoE dispatch / combine all-to-all, attention) — runs on the overlap lane."""

from __future__ import annotations

from typing import Sequence

from dynaflow.errors import StrategyError
from dynaflow.ir import ALL, Lane, NanoGraph, NanoOp, Resource, Schedule, SplitConfig
from dynaflow.strategies.base import SearchSpace, Strategy

__all__ = ["TwoBatchOverlap", "staggered_slots"]


def staggered_slots(graph: NanoGraph, stagger: int) -> dict[NanoOp, int]:
    """A time slot per op: one past its latest dependency, and nano-batch k at least ``k · stagger`` slots
    after nano-batch 0's op of the same segment. Slots increase along every dependency, so any per-lane
    order sorted by ``(slot, nano)`` is deadlock-free.

    Example: segments a → b → c, two nano-batches, stagger 1 → a0:0 a1:1 b0:1 b1:2 c0:2 c1:3.
    """
    slot: dict[NanoOp, int] = {}
    first: dict[str, int] = {}
    for op in graph.ops:  # program order: dependencies come first
        s = max((slot[d] + 1 for d in graph.deps(op)), default=0)
        if op.nano not in (0, ALL):
            s = max(s, first.get(op.segment, s) + op.nano * stagger)
        else:
            first[op.segment] = s
        slot[op] = s
    return slot


class TwoBatchOverlap(Strategy):
    """Two token-balanced halves, the second ``stagger`` stages behind; overlap-resource stages on a second lane."""

    name = "two_batch_overlap"

    @classmethod
    def search_candidates(cls, space: SearchSpace) -> list[dict]:
        return [{"stagger": s} for s in (0, 1)] if space.info.batch_size >= 2 else []
    default_nano_batches = 2

    def __init__(self, stagger: int = 1, overlap: Sequence[str] = ("network", "memory"), min_rows: int = 1,
                 nano_batches: int | None = None) -> None:
        super().__init__(nano_batches, min_rows)
        if not isinstance(stagger, int) or stagger < 0:
            raise StrategyError(f"Strategy 'two_batch_overlap': stagger={stagger!r} must be an int >= 0 (stages).")
        valid = {r.value for r in Resource}
        if isinstance(overlap, str):  # one resource named alone (a YAML file's `overlap: memory`)
            overlap = (overlap,)
        bad = [r for r in overlap if r not in valid]
        if bad:
            raise StrategyError(f"Strategy 'two_batch_overlap': overlap={list(overlap)} names {bad[0]!r}; "
                                f"resources are {sorted(valid)}.")
        self.stagger = stagger
        self.overlap = tuple(overlap)

    def lanes(self, graph: NanoGraph) -> list[Lane]:
        return [Lane("compute", Resource.COMPUTE), Lane("overlap", Resource(self.overlap[0]) if self.overlap else None)]

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        compute, overlap = self.lanes(graph)
        slots = staggered_slots(graph, self.stagger)
        order: dict[Lane, list[NanoOp]] = {compute: [], overlap: []}
        for op in sorted(graph.ops, key=lambda o: (slots[o], o.nano)):
            lane = overlap if graph.segment(op).resource.value in self.overlap else compute
            order[lane].append(op)
        if not order[overlap]:
            del order[overlap]
        notes = [f"stagger {self.stagger}", f"overlap lane takes {', '.join(self.overlap)} stages"]
        return Schedule.from_lanes(self.name, split, order, notes)

    def describe(self) -> str:
        return (f"two token-balanced halves, second {self.stagger} stage(s) behind; "
                f"{'/'.join(self.overlap)} stages overlap the other half's compute")

    def __repr__(self) -> str:
        return f"TwoBatchOverlap(stagger={self.stagger}, overlap={self.overlap}, min_rows={self.min_rows})"
