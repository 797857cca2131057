"""The split-KV Triton kernels of ``dynaflow::decode_attention`` on a GPU, bf16, decode-sized shapes (32 query heads
and 8 KV heads of 128): equal to the plain-torch reference (float32 accumulation of the same bf16 inputs) within
``atol = rtol = 2e-2`` — the kernels round the softmax weights to bf16 before the second product, as flash
attention does — over ragged lengths (0, short, full, past the cache), one chunk per request or many, with and
without a CUDA graph around the op."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda


def _inputs(batch, L, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, 32, 128, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(batch, L, 8, 128, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(batch, L, 8, 128, device="cuda", dtype=dtype, generator=g)
    lengths = torch.randint(1, L + 1, (batch,), device="cuda", generator=g)
    lengths[0], lengths[-1] = 0, L + 5  # an empty request, and a length past the cache (the whole cache)
    return q, k, v, lengths


@pytest.mark.parametrize("batch,L,budget", [(256, 1024, 132), (4, 4096, 52), (64, 512, 40), (2, 8192, 26),
                                            (128, 2048, 0)])
def test_split_kv_on_the_gpu_equals_the_reference(batch, L, budget):
    pytest.importorskip("triton")
    from dynaflow.integrations.kernels.decode_attention import reference, triton_decode_attention

    q, k, v, lengths = _inputs(batch, L)
    for _ in range(2):  # the first call runs one program per SM and measures the occupancy; the second uses it
        out = triton_decode_attention(q, k, v, lengths, budget)
        rows = slice(0, min(batch, 16))  # the reference repeats K and V per query head in float32: a few rows
        torch.testing.assert_close(out[rows].float(), reference(q[rows], k[rows], v[rows], lengths[rows]).float(),
                                   atol=2e-2, rtol=2e-2)
    assert out[0].abs().max().item() == 0  # the empty request


def test_float32_caches_use_exact_products():
    pytest.importorskip("triton")
    from dynaflow.integrations.kernels.decode_attention import reference, triton_decode_attention

    q, k, v, lengths = _inputs(8, 300, torch.float32)
    torch.testing.assert_close(triton_decode_attention(q, k, v, lengths, 16), reference(q, k, v, lengths),
                               atol=1e-4, rtol=1e-4)


def test_the_op_runs_the_kernels_and_replays_in_a_cuda_graph():
    pytest.importorskip("triton")
    from dynaflow.integrations.kernels.decode_attention import triton_decode_attention

    q, k, v, lengths = _inputs(16, 1024)
    direct = triton_decode_attention(q, k, v, lengths, 52)
    torch.testing.assert_close(torch.ops.dynaflow.decode_attention(q, k, v, lengths, 52), direct, atol=0, rtol=0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.dynaflow.decode_attention(q, k, v, lengths, 52)  # warm-up: compiled, occupancy known
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dynaflow.decode_attention(q, k, v, lengths, 52)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out, triton_decode_attention(q, k, v, lengths, 52), atol=0, rtol=0)


def test_the_default_budget_is_the_sms_the_carveout_leaves():
    """``sm_budget=0`` sizes the grid for the SMs torch's carveout leaves (what the cuda executor sets on a
    partitioned lane): fewer programs under a carveout, the same result."""
    pytest.importorskip("triton")
    from dynaflow.backend.sm_partitions import available_sms, sm_carveout
    from dynaflow.integrations.kernels.decode_attention import DEFAULT_CONFIG, plan_for, triton_decode_attention

    q, k, v, lengths = _inputs(4, 8192)
    whole = triton_decode_attention(q, k, v, lengths)
    total = available_sms(q.device)
    with sm_carveout(total - 32):
        assert available_sms(q.device) == 32
        lane = plan_for(q, k)
        torch.testing.assert_close(triton_decode_attention(q, k, v, lengths), whole, atol=2e-2, rtol=2e-2)
    assert lane.programs <= 32 * DEFAULT_CONFIG.programs_per_sm < plan_for(q, k).programs
