"""``dynaflow::decode_attention`` (``dynaflow.integrations.kernels.decode_attention``) as a user would register a
kernel: its semantics against float64 attention written out here, the split-KV math and its plan, the op's
registration (schema, fake, Dynamo), and a model using it compiled by dynaflow — the op's segment split per
nano-batch (its batch rule) and tagged memory-bound (the default rules).

Tolerances: float32 inputs, ``atol = rtol = 1e-5`` (float32 accumulation in another order than float64's); bfloat16
inputs against float64 attention of the same bf16-rounded inputs, ``atol = rtol = 1e-2`` (the output's rounding to
bf16, relative 2**-8, plus float32 accumulation). The Triton kernels run under Triton's CPU interpreter in
:func:`test_the_triton_kernels_under_the_interpreter` (a subprocess: ``TRITON_INTERPRET=1`` must be set before
Triton defines a kernel) and, on a GPU, in tests/cuda/test_decode_attention_cuda.py."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynaflow
from dynaflow.integrations.kernels import decode_attention as da
from dynaflow.ir import Resource

ROOT = Path(__file__).resolve().parents[1]


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


def inputs(b, hkv, group, d, L, seed, dtype=torch.float32):
    """Random q, K, V and lengths in [0, L + 2] (a length past the cache means the whole cache)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, d, generator=g)
    k, v = torch.randn(b, L, hkv, d, generator=g), torch.randn(b, L, hkv, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), torch.randint(0, L + 3, (b,), generator=g)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), d=st.sampled_from([4, 8, 16]),
       L=st.integers(0, 40), seed=st.integers(0, 9))
def test_the_op_is_masked_gqa_attention(b, hkv, group, d, L, seed):
    q, k, v, lengths = inputs(b, hkv, group, d, L, seed)
    out = torch.ops.dynaflow.decode_attention(q, k, v, lengths, 132)
    torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("L", [1, 7, 64, 100])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 200])
def test_the_split_kv_math_in_torch_for_every_chunk_size(L, chunk):
    """The kernels' algorithm (a softmax per chunk, combined by log-sum-exp; empty chunks and requests weigh 0)."""
    q, k, v, lengths = inputs(3, 2, 4, 8, L, seed=L + chunk)
    lengths[0] = 0
    out = da.chunked_reference(q, k, v, lengths, chunk)
    torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=1e-5, rtol=1e-5)


def test_bf16_accumulates_in_float32():
    q, k, v, lengths = inputs(2, 2, 4, 16, 64, seed=0, dtype=torch.bfloat16)
    for out in (torch.ops.dynaflow.decode_attention(q, k, v, lengths, 132), da.chunked_reference(q, k, v, lengths, 16)):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), attention64(q, k, v, lengths), atol=1e-2, rtol=1e-2)


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(1, 512), kv_heads=st.sampled_from([1, 2, 8]), L=st.integers(0, 9000),
       programs=st.integers(1, 264), block_n=st.sampled_from([16, 32, 64, 128]))
def test_the_plan_covers_the_cache_on_at_most_the_budget(batch, kv_heads, L, programs, block_n):
    p = da.split_plan(batch, kv_heads, L, programs, block_n)
    assert 1 <= p.programs <= programs and p.programs <= p.items == batch * kv_heads * p.splits
    assert p.chunk % block_n == 0 and p.splits * p.chunk >= L
    assert L == 0 or (p.splits - 1) * p.chunk < L  # no chunk is empty for a full-length request


def test_the_plan_follows_the_sm_budget():
    big = da.split_plan(batch=256, kv_heads=8, max_len=2048, programs=104)
    assert big.splits == 1 and big.programs == 104  # the batch alone gives every program 20 items
    small = da.split_plan(batch=4, kv_heads=8, max_len=4096, programs=104)
    assert small.splits > 1 and small.items >= 0.9 * small.programs  # chunks so that ~every program has work
    assert da.split_plan(batch=4, kv_heads=8, max_len=4096, programs=264).splits > small.splits
    assert da.split_plan(batch=1, kv_heads=1, max_len=40, programs=132, block_n=16).splits <= 3  # its blocks


def test_the_op_passes_torch_library_opcheck():
    """Schema, fake (FakeTensor), and AOT dispatch with dynamic shapes agree with the real op."""
    q, k, v, lengths = inputs(3, 2, 2, 8, 12, seed=1)
    torch.library.opcheck(torch.ops.dynaflow.decode_attention.default, (q, k, v, lengths, 52))


def test_dynamo_traces_the_op_without_a_graph_break():
    def step(q, k, v, lengths):
        return torch.ops.dynaflow.decode_attention(q * 2, k, v, lengths, 52) + 1

    q, k, v, lengths = inputs(3, 2, 2, 8, 12, seed=2)
    from torch._dynamo.testing import CompileCounter

    counts = CompileCounter()
    out = torch.compile(step, backend=counts, fullgraph=True, dynamic=True)(q, k, v, lengths)
    torch.testing.assert_close(out, step(q, k, v, lengths))
    assert counts.frame_count == 1


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
    assert attn.resource is Resource.MEMORY and not attn.whole  # split per nano-batch, not a barrier
    assert re.search(r"attention_0\s+split\s+memory", c.explain())


def test_the_triton_kernels_under_the_interpreter():
    """tests/kernels (marked ``triton``), run here in a subprocess with ``TRITON_INTERPRET=1``."""
    if not da.triton_available():
        pytest.skip("Triton does not import: pip install triton (in the test extras; torch's CPU wheel ships none)")
    import numpy
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9) and int(numpy.__version__.split(".")[0]) >= 2:
        # a CUDA build of torch pins its own Triton (torch 2.11+cu130: 3.6), whose interpreter cannot run on
        # numpy 2 ("only 0-dimensional arrays can be converted to Python scalars"); there the kernels are compiled
        # for the GPU instead (tests/cuda), and the CPU-wheel tier runs this test with Triton 3.9
        pytest.skip(f"Triton {triton.__version__}'s interpreter does not run with numpy {numpy.__version__}")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "triton", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "kernels")], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
