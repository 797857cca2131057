"""A batch-free value crossing into a segment split another way (``stage_nano_batches``): each consumer
nano-batch reads the copy of a producer nano-batch it depends on. (Found by ``auto`` on a transformers decode
step: ``KeyError: ('glue_4.cache_position_1', 2)`` while lowering.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynaflow
from dynaflow.strategies.nanoflow import NanoFlow


class FreeMask(nn.Module):
    """The glue before attention makes a batch-free mask that the attention reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.a(x).view(-1, 2, 1, 4)
        mask = (self.w[:1] * 0.1).view(1, 1, 1, 1)
        o = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return self.b(o.reshape(-1, 8))


@pytest.mark.parametrize("executor", ["serial", "thread"])
@pytest.mark.parametrize("batch,main,memory", [(4, 2, 4), (6, 2, 3), (7, 3, 2), (5, 1, 5)])
def test_a_batch_free_value_into_a_resplit_segment_equals_eager(executor, batch, main, memory):
    model = FreeMask().eval()
    x = torch.randn(batch, 8)
    c = dynaflow.compile(model, strategy=NanoFlow(nano_batches=main, stage_nano_batches={"memory": memory}),
                         executor=executor, verify=True)
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), atol=1e-6, rtol=1e-6)
    assert c.graphs[0].last_plan.split.stages  # the attention really ran split another way
