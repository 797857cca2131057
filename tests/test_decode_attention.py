"""``dynaflow::decode_attention`` (``dynaflow.integrations.kernels.decode_attention``) as a user would register a
kernel: its semantics against float64 attention written out here, and a model using it compiled by dynaflow —
the op's segment split per nano-batch (its batch rule) and tagged memory-bound (the default rules). The Triton
kernel itself runs in the ``triton`` tier (tests/kernels, Triton's interpreter on CPU) and under ``-m cuda``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynaflow
from dynaflow.integrations.kernels import decode_attention as da
from dynaflow.ir import Resource


def attention64(q, k, v, lengths):
    """Per request and head: softmax over the first ``lengths[b]`` positions, in float64, by loops."""
    b, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        for h in range(hq):
            if n == 0:
                continue
            kk, vv = k[i, :n, h // group].double(), v[i, :n, h // group].double()
            w = torch.softmax(kk @ q[i, h].double() / math.sqrt(d), dim=0)
            out[i, h] = w @ vv
    return out


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), d=st.sampled_from([4, 8, 16]),
       L=st.integers(1, 40), seed=st.integers(0, 9))
def test_the_op_is_masked_gqa_attention(b, hkv, group, d, L, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, d, generator=g)
    k, v = torch.randn(b, L, hkv, d, generator=g), torch.randn(b, L, hkv, d, generator=g)
    lengths = torch.randint(0, L + 1, (b,), generator=g)
    out = torch.ops.dynaflow.decode_attention(q, k, v, lengths, 132)
    torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=1e-5, rtol=1e-5)


def test_bf16_accumulates_in_float32():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 64, 2, 16), torch.randn(2, 64, 2, 16)
    lengths = torch.tensor([64, 17])
    out = torch.ops.dynaflow.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), lengths, 132)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=3e-2, rtol=3e-2)


def test_chunks_per_request_follow_the_sm_budget():
    assert da.num_splits(batch=256, kv_heads=8, max_len=4096, sm_budget=132) == 1  # enough programs already
    assert da.num_splits(batch=4, kv_heads=8, max_len=4096, sm_budget=132) == 9   # 2 waves over 132 SMs
    assert da.num_splits(batch=4, kv_heads=8, max_len=4096, sm_budget=52) == 4    # a partitioned lane
    assert da.num_splits(batch=1, kv_heads=1, max_len=40, sm_budget=132) == 2     # never more than its blocks


class Decode(nn.Module):
    def __init__(self, d: int = 8, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.d = heads, d
        self.q = nn.Linear(heads * d, heads * d)
        self.o = nn.Linear(heads * d, heads * d)

    def forward(self, x, k_cache, v_cache, lengths):
        q = self.q(x).view(x.shape[0], self.heads, self.d)
        a = torch.ops.dynaflow.decode_attention(q, k_cache, v_cache, lengths, 52)
        return self.o(a.reshape(x.shape[0], -1)) + x


@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_dynaflow_splits_the_op_per_nano_batch_on_the_memory_lane(executor):
    model = Decode().eval()
    x = torch.randn(6, 32)
    k, v = torch.randn(6, 12, 2, 8), torch.randn(6, 12, 2, 8)
    lengths = torch.tensor([12, 3, 7, 0, 12, 5])
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor=executor, verify=True)
    with torch.no_grad():
        torch.testing.assert_close(c(x, k, v, lengths), model(x, k, v, lengths), atol=1e-6, rtol=1e-6)
    segs = c.graphs[0].segmented.segments
    (attn,) = [s for s in segs if s.name.startswith("attention")]
    assert attn.resource is Resource.MEMORY and not attn.whole
