"""``nanoflow``: resource-aware overlap (NanoFlow). Compute-bound segments run on a compute lane,
memory- and network-bound ones on their own lanes (each optionally an SM partition), so while the compute
lane runs nano-batch i+1's GEMMs the memory lane runs nano-batch i's attention and the network lane
nano-batch i-1's all-reduce — every resource stays busy.

By default each lane is software-pipelined across layers (:func:`~dynaflow.strategies.base.pipelined_order_key`):
a stretch of compute segments between two attentions runs nano-batch-major — ``post0(i) pre0(i+1) post1(i)
pre1(i+1)`` — so nano-batch 0's next attention is ready while nano-batch 1's current one still runs.
``pipeline=False`` takes each lane's ops segment-major instead (``post0 post1 pre0 pre1``)."""

from __future__ import annotations

import math

from typing import Mapping, Sequence

from dynaflow.errors import StrategyError
from dynaflow.ir import InputInfo, Lane, NanoGraph, Resource, Schedule, SplitConfig
from dynaflow.strategies import splits
from dynaflow.strategies.base import SearchSpace, Strategy, pipelined_order_key, program_order_key

__all__ = ["NanoFlow"]


class NanoFlow(Strategy):
    """One lane per resource (compute / memory / network); nano-batches staggered so resources overlap."""

    name = "nanoflow"

    @classmethod
    def search_candidates(cls, space: SearchSpace) -> list[dict]:
        """Uneven halves (NanoFlow's large/small nano-batches), then per count: even, a finer attention
        split, and SM partitions between compute and the other resource."""
        info, resources = space.info, space.resources
        out: list[dict] = [{"weights": w} for w in ((2, 1), (1, 2))] if info.batch_size >= 3 else []
        for n in space.nano_counts:
            out.append({"nano_batches": n})
            if Resource.MEMORY in resources and 2 * n <= info.batch_size:  # finer attention split
                out.append({"nano_batches": n, "stage_nano_batches": {"memory": 2 * n}})
            others = [r for r in (Resource.MEMORY, Resource.NETWORK) if r in resources]  # transfers use no SMs
            if space.num_sms and others and Resource.COMPUTE in resources:
                out += [{"nano_batches": n, "sm_counts": {"compute": space.num_sms - sm, others[0].value: sm}}
                        for sm in space.sm_splits()]
        return out
    default_nano_batches = 2

    def __init__(self, nano_batches: int | None = None, sm_counts: Mapping[str, int] | None = None,
                 weights: Sequence[float] | None = None, min_rows: int = 1,
                 stage_nano_batches: Mapping[str, int] | None = None, pipeline: bool = True) -> None:
        super().__init__(len(weights) if weights and nano_batches is None else nano_batches, min_rows)
        if not isinstance(pipeline, bool):
            raise StrategyError(f"Strategy 'nanoflow': pipeline={pipeline!r} must be True (software-pipelined across "
                                "layers, the default) or False (each lane segment-major).")
        self.pipeline = pipeline
        self.stage_nano_batches = dict(stage_nano_batches or {})
        for key, n in self.stage_nano_batches.items():
            if key not in {r.value for r in Resource}:
                raise StrategyError(f"Strategy 'nanoflow': stage_nano_batches names unknown resource {key!r}; "
                                    f"resources are {[r.value for r in Resource]}.")
            if not isinstance(n, int) or n < 1:
                raise StrategyError(f"Strategy 'nanoflow': stage_nano_batches[{key!r}]={n!r} must be an int >= 1.")
        if sm_counts is not None and not isinstance(sm_counts, Mapping):
            raise StrategyError(f"Strategy 'nanoflow': sm_counts={sm_counts!r:.80} must map lanes to SM counts, e.g. "
                                "{'compute': 96, 'memory': 36}.")
        self.sm_counts = dict(sm_counts or {})
        unknown = [k for k in self.sm_counts if k not in {r.value for r in Resource}]
        if unknown:
            raise StrategyError(f"Strategy 'nanoflow': sm_counts names unknown lane {unknown[0]!r}; lanes are "
                                f"{[r.value for r in Resource]}.")
        for lane, sms in self.sm_counts.items():
            if not isinstance(sms, int) or isinstance(sms, bool) or sms < 1:
                raise StrategyError(f"Strategy 'nanoflow': sm_counts[{lane!r}]={sms!r:.40} must be an int >= 1 (the "
                                    "SMs of that lane's partition), e.g. {'compute': 96, 'memory': 36}.")
        if weights is not None and (isinstance(weights, (str, bytes)) or not weights or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights)):
            raise StrategyError(f"Strategy 'nanoflow': weights={weights!r:.80} must be positive numbers, one per "
                                "nano-batch.")
        if weights is not None and nano_batches is not None and len(weights) != nano_batches:
            raise StrategyError(f"Strategy 'nanoflow': weights={list(weights)} give {len(weights)} nano-batches but "
                                f"nano_batches={nano_batches}; give one weight per nano-batch, or leave nano_batches "
                                "unset (the weights' count is used).")
        self.weights = tuple(float(w) for w in weights) if weights else None

    def split_config(self, info: InputInfo) -> SplitConfig:
        """Uneven nano-batches in proportion to ``weights`` when given (e.g. NanoFlow's large-then-small
        split), else the base policy; ``stage_nano_batches`` re-splits one resource's segments (e.g. the
        memory-bound attention in 4 while the GEMMs run in 2)."""
        split = self._main_split(info)
        if not self.stage_nano_batches:
            return split
        policy = splits.token_balanced if info.request_lengths is not None else splits.even  # request boundaries
        stages = tuple((r, policy(info, n).sizes) for r, n in sorted(self.stage_nano_batches.items())
                       if policy(info, n).sizes != split.sizes)
        return SplitConfig(split.sizes, split.labels, stages) if stages else split

    def _main_split(self, info: InputInfo) -> SplitConfig:
        if self.weights is None or info.request_lengths is not None:
            return super().split_config(info)
        n = min(len(self.weights), info.batch_size)
        top = max(self.weights[:n])
        w = [x / top for x in self.weights[:n]]  # relative weights: 1e308s would overflow their sum
        raw = [info.batch_size * x / sum(w) for x in w]
        sizes = [max(1, int(r)) for r in raw]
        order = sorted(range(n), key=lambda i: raw[i] - int(raw[i]), reverse=True)
        i = 0
        while sum(sizes) < info.batch_size:  # largest remainders get the leftover rows
            sizes[order[i % n]] += 1
            i += 1
        while sum(sizes) > info.batch_size:
            j = max(range(n), key=lambda k: sizes[k])
            sizes[j] -= 1
        return splits.with_min_rows(SplitConfig(tuple(sizes)), self.min_rows)

    def lanes(self, graph: NanoGraph) -> list[Lane]:
        used = {s.resource for s in graph.segments}
        return [Lane(r.value, r, self.sm_counts.get(r.value)) for r in Resource if r in used] or [Lane("compute", Resource.COMPUTE)]

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        lanes = {lane.resource: lane for lane in self.lanes(graph)}
        order = {lane: [] for lane in lanes.values()}
        key = pipelined_order_key(graph, lambda seg: seg.resource) if self.pipeline else program_order_key(graph)
        for op in sorted(graph.ops, key=key):
            order[lanes[graph.segment(op).resource]].append(op)
        notes = [f"{lane.name}: {len(ops)} ops" for lane, ops in order.items()]
        notes.append("software-pipelined across layers" if self.pipeline else "segment-major")
        return Schedule.from_lanes(self.name, split, order, notes)

    def describe(self) -> str:
        sms = f", SMs {self.sm_counts}" if self.sm_counts else ""
        return f"compute / memory / network segments on separate lanes, nano-batches staggered{sms}"

    def __repr__(self) -> str:
        stages = f", stage_nano_batches={self.stage_nano_batches}" if self.stage_nano_batches else ""
        pipe = "" if self.pipeline else ", pipeline=False"
        return f"NanoFlow(nano_batches={self.nano_batches}, sm_counts={self.sm_counts}, weights={self.weights}{stages}{pipe})"
