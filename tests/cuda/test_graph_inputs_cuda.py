"""CUDA graphs without input copies, on a GPU: a steady step with stable inputs issues no device-to-device
memcpy beyond its merge writes (counted with ``torch.profiler``), the same step with fresh inputs does (so the count can fail), and
every output equals eager. The CPU twin of these checks is ``tests/test_graph_inputs.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow.backend.graph_steps import StaticInputError

pytestmark = pytest.mark.cuda

B, L, D = 64, 256, 256


class Decode(nn.Module):
    """A decode-shaped step: a projection, then attention-like reads of a large per-request cache."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        self.o = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unsqueeze(1)                                   # (B, 1, D)
        w = torch.softmax((q * cache).sum(-1) / D ** 0.5, dim=-1)    # (B, L)
        return self.o((w.unsqueeze(-1) * cache).sum(1))


def _memcpys(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "memcpy" in e.name.lower() or "Memcpy" in e.name]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Decode().to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("strategy,nano", [("sequential", 1), ("nanoflow", 2)])
def test_a_steady_step_with_stable_inputs_copies_nothing(strategy, nano):
    model = _model()
    c = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor="cuda",
                         config={"cuda_graphs": True, "copy_outputs": False})
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(4):  # two warm-ups, capture, one replay
            x.copy_(torch.randn_like(x))
            out = c(x, cache)
        torch.testing.assert_close(out, model(x, cache), atol=3e-2, rtol=3e-2)
        steady = _memcpys(lambda: c(x, cache))
        fresh = _memcpys(lambda: c(x.clone(), cache.clone()))
    # A split step writes each nano-batch's slice of a merged output into its full-batch buffer: a contiguous
    # slice is one device-to-device memcpy node of the graph (seen on an H200: two for nanoflow x2). Those
    # are the computation; anything beyond them is an input copied in.
    program = c.graphs[0].last_plan.program
    merges = sum(len(launch.merges) for launch in program.serial_order)
    assert len(steady) <= merges, f"a steady step copied beyond its {merges} merge writes: {steady}"
    assert len(fresh) > len(steady), f"fresh inputs were not copied in ({fresh}): the count cannot fail"


def test_a_declared_static_cache_stays_in_place_on_the_gpu():
    model = _model()
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor="cuda",
                         config={"cuda_graphs": True, "static_inputs": ["cache"]})
    cache = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
            cache.mul_(0.5)  # the engine writes into its cache between steps
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=3e-2, rtol=3e-2)
        with pytest.raises(StaticInputError, match="static_inputs: 'cache'"):
            c(x, cache.clone())
