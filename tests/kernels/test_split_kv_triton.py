"""The Triton split-KV kernels of ``dynaflow::decode_attention``, run by Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by .ci/kernels before Python starts): equal to float64 attention for masked,
grouped (GQA), chunked and empty caches. The same kernels on a GPU: tests/cuda/test_decode_attention_cuda.py."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_decode_attention import attention64

pytestmark = pytest.mark.triton


def test_the_tier_runs_the_interpreter():
    import triton  # noqa: F401 - the tier installs it; a missing Triton fails here, it is not skipped

    assert os.environ.get("TRITON_INTERPRET") == "1", "run this tier through .ci/kernels (TRITON_INTERPRET=1)"


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 4]), d=st.sampled_from([8, 16]),
       L=st.integers(1, 80), budget=st.sampled_from([1, 8, 132]), seed=st.integers(0, 9))
def test_split_kv_kernels_equal_attention(b, hkv, group, d, L, budget, seed):
    from dynaflow.integrations.kernels.decode_attention import triton_decode_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, d, generator=g)
    k, v = torch.randn(b, L, hkv, d, generator=g), torch.randn(b, L, hkv, d, generator=g)
    lengths = torch.randint(0, L + 1, (b,), generator=g)
    out = triton_decode_attention(q, k, v, lengths, budget)
    torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=1e-5, rtol=1e-5)
