"""``eager``: the captured graph run as Dynamo gave it — no segments, no executor, no copies.

It is the floor ``auto`` measures every candidate against: whatever dynaflow's plans cost (a launch per
segment, nano-batch views, merges), a bucket whose winner is ``eager`` runs exactly the ops eager PyTorch
runs, through Dynamo's graph. Planned like ``sequential`` (one nano-batch, one lane) so the cost model can
compare it; run by the compiled graph directly (:attr:`~dynaflow.strategies.base.Strategy.passthrough`).
"""

from __future__ import annotations

from dynaflow.ir import InputInfo, SplitConfig
from dynaflow.strategies.sequential import Sequential

__all__ = ["Eager"]


class Eager(Sequential):
    """The captured graph as is: one nano-batch, no dynaflow executor (the floor of ``auto``)."""

    name = "eager"
    passthrough = True

    def split_config(self, info: InputInfo) -> SplitConfig:
        return SplitConfig.whole(info.batch_size)

    def describe(self) -> str:
        return "the captured graph run as is (no segments, no executor)"
