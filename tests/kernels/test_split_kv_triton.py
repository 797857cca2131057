"""The Triton split-KV kernels of ``dynaflow::decode_attention``, run by Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set before Python starts: tests/test_decode_attention.py runs this file so, in a
subprocess, in the default tier): equal to float64 attention for masked, grouped (GQA), chunked and empty caches, on one program or many,
with and without the combine kernel. float32 and float16 only: the interpreter's ``tl.dot`` multiplies bfloat16's
raw bits (triton-lang/triton#11584); bfloat16 runs on a GPU (tests/cuda/test_decode_attention_cuda.py)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_decode_attention import attention64, inputs

pytestmark = pytest.mark.triton


def test_the_tier_runs_the_interpreter():
    import triton  # noqa: F401 - selected with -m triton, a missing Triton fails here, it is not skipped

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 pytest -m triton tests/kernels"


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 4]), d=st.sampled_from([8, 16]),
       L=st.integers(0, 300), budget=st.sampled_from([1, 3, 8, 132]), block_n=st.sampled_from([16, 32]),
       seed=st.integers(0, 9))
def test_split_kv_kernels_equal_attention(b, hkv, group, d, L, budget, block_n, seed):
    from dynaflow.integrations.kernels.decode_attention import KernelConfig, triton_decode_attention

    q, k, v, lengths = inputs(b, hkv, group, d, L, seed)
    out = triton_decode_attention(q, k, v, lengths, budget, KernelConfig(block_n=block_n))
    torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [1, 4, 64])  # several items per program; one chunk each; many chunks
def test_split_kv_kernels_in_half_precision(budget):
    from dynaflow.integrations.kernels.decode_attention import KernelConfig, split_plan, triton_decode_attention

    q, k, v, lengths = inputs(3, 2, 4, 16, 200, seed=budget, dtype=torch.float16)
    lengths[1] = 0
    cfg = KernelConfig(block_n=16, programs_per_sm=1)
    plan = split_plan(3, 2, 200, budget, 16)
    assert (plan.splits > 1) == (budget == 64)
    out = triton_decode_attention(q, k, v, lengths, budget, cfg)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=2e-3, rtol=2e-3)


def test_a_query_with_strided_heads():
    """``q`` as a view whose last dim is not contiguous (a transposed projection): made contiguous first."""
    from dynaflow.integrations.kernels.decode_attention import KernelConfig, triton_decode_attention

    q, k, v, lengths = inputs(2, 2, 2, 16, 40, seed=3)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Hq, D) with strides (Hq*D, 1, Hq)
    assert q.stride(-1) != 1
    out = triton_decode_attention(q, k, v, lengths, 4, KernelConfig(block_n=16))
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=1e-5, rtol=1e-5)
