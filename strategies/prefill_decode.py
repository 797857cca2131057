"""``prefill_decode``: intra-GPU prefill/decode multiplexing (Nexus, semi-PD style). The batch splits by
request phase — the caller says which rows are prefill and which decode with ``dynaflow.requests`` — and
each phase runs on its own lane with its own SM share, so compute-bound prefill and memory-bound decode
share the GPU instead of taking turns."""

from __future__ import annotations

import logging

from dynaflow.errors import StrategyError
from dynaflow.ir import ALL, InputInfo, Lane, NanoGraph, NanoOp, Schedule, SplitConfig
from dynaflow.strategies import splits
from dynaflow.strategies.base import SearchSpace, Strategy, program_order_key

__all__ = ["PrefillDecode"]

log = logging.getLogger(__name__)


class PrefillDecode(Strategy):
    """Prefill rows on one lane, decode rows on another, each with an optional SM count."""

    name = "prefill_decode"

    @classmethod
    def search_candidates(cls, space: SearchSpace) -> list[dict]:
        """Only for a batch that mixes prefill and decode requests; with SMs, partitions between the two."""
        phases = space.info.request_phases
        if not phases or len(set(phases)) < 2:
            return []
        return [{}] + [{"prefill_sms": space.num_sms - sm, "decode_sms": sm} for sm in space.sm_splits()
                       if space.num_sms]

    def __init__(self, prefill_sms: int | None = None, decode_sms: int | None = None) -> None:
        super().__init__(None)
        for key, value in (("prefill_sms", prefill_sms), ("decode_sms", decode_sms)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise StrategyError(f"Strategy 'prefill_decode': {key}={value!r} must be an int >= 1 or None.")
        self.prefill_sms = prefill_sms
        self.decode_sms = decode_sms

    def split_config(self, info: InputInfo) -> SplitConfig:
        """One nano-batch per run of same-phase requests; without phases (no ``dynaflow.requests`` with
        phases around the call) there is nothing to separate: one nano-batch."""
        if info.request_phases is None:
            log.debug("prefill_decode: no request phases declared for %s; running one nano-batch", info)
        return splits.by_phase(info)

    def lanes(self, graph: NanoGraph) -> list[Lane]:
        return [Lane("prefill", sm_count=self.prefill_sms), Lane("decode", sm_count=self.decode_sms)]

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        prefill, decode = self.lanes(graph)
        labels = split.labels or ("prefill",) * split.num
        order: dict[Lane, list[NanoOp]] = {prefill: [], decode: []}
        for op in sorted(graph.ops, key=program_order_key(graph)):
            lane = prefill if op.nano == ALL or labels[op.nano] == "prefill" else decode
            order[lane].append(op)
        order = {lane: ops for lane, ops in order.items() if ops}
        counts = {lab: labels.count(lab) for lab in dict.fromkeys(labels)}
        return Schedule.from_lanes(self.name, split, order, [f"nano-batches by phase: {counts}"])

    def describe(self) -> str:
        sms = lambda n: f"{n} SMs" if n else "shared SMs"  # noqa: E731
        return f"prefill rows on one lane ({sms(self.prefill_sms)}), decode rows on another ({sms(self.decode_sms)})"

    def __repr__(self) -> str:
        return f"PrefillDecode(prefill_sms={self.prefill_sms}, decode_sms={self.decode_sms})"
