"""The split-KV Triton kernels of ``dynaflow::decode_attention`` on a GPU, bf16, decode-sized shapes."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("batch,L,budget", [(256, 1024, 132), (4, 4096, 52), (64, 512, 40)])
def test_split_kv_on_the_gpu_equals_the_reference(batch, L, budget):
    pytest.importorskip("triton")
    from dynaflow.integrations.kernels.decode_attention import reference, triton_decode_attention

    torch.manual_seed(0)
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, L, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, L, 8, 128, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(1, L + 1, (batch,), device="cuda")
    out = triton_decode_attention(q, k, v, lengths, budget)
    torch.testing.assert_close(out.float(), reference(q, k, v, lengths).float(), atol=2e-2, rtol=2e-2)
