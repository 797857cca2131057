"""A pure-PyTorch stand-in for a serving engine's attention lookup, run through the integration machinery.

It mimics vLLM's pattern without vLLM: a module-global forward context holds per-layer attention metadata
(``query_start_loc``) keyed by layer name, and an opaque custom op that fills an ``output`` buffer in place
looks the metadata up by the layer name it is given. The model is compiled with the same pieces the vLLM
integration uses (mutation threading, the host-state rule, the request-aligned strategy, a nano-context
provider that slices the metadata), so this runs everywhere: on CPU here, and with the CUDA executor on a GPU
(``@pytest.mark.cuda``; the real engines cannot be installed on the GPU machine).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynaflow
from dynaflow.frontend.rules import Where, op_name
from dynaflow.integrations._common import HOST_STATE_META, RequestAligned, thread_mutations
from dynaflow.nanocontext import nano_context

_CONTEXT: dict[str, dict[str, torch.Tensor]] = {}


@torch.library.custom_op("dftest_engine::attention", mutates_args=("out",))
def engine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer: str) -> None:
    qsl = _CONTEXT[layer]["query_start_loc"].tolist()
    if qsl[-1] != q.shape[0]:
        raise RuntimeError(f"metadata covers {qsl[-1]} tokens, op got {q.shape[0]}")
    for a, b in zip(qsl, qsl[1:]):
        out[a:b] = F.scaled_dot_product_attention(q[None, a:b].transpose(1, 2), k[None, a:b].transpose(1, 2),
                                                  v[None, a:b].transpose(1, 2), is_causal=True).transpose(1, 2)[0]


@engine_attention.register_fake
def _(q, k, v, out, layer):
    return None


class Layer(nn.Module):
    def __init__(self, name: str, d: int = 32, heads: int = 4):
        super().__init__()
        self.name, self.heads = name, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.heads, d // self.heads).unbind(1)
        out = torch.empty_like(q)
        torch.ops.dftest_engine.attention(q, k, v, out, self.name)
        x = x + self.o(out.view(t, d))
        return x + self.mlp(x)


class TinyEngineModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer("l0"), Layer("l1")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@contextlib.contextmanager
def engine_context(qsl: torch.Tensor):
    saved = dict(_CONTEXT)
    _CONTEXT.update({n: {"query_start_loc": qsl} for n in ("l0", "l1")})
    try:
        yield
    finally:
        _CONTEXT.clear()
        _CONTEXT.update(saved)


def _is_attention(node) -> bool:
    return node.op == "call_function" and op_name(node).startswith("dftest_engine.attention")


HOST_RULE = Where(lambda n: bool(n.meta.get(HOST_STATE_META)), name="attention",
                  tags=("memory", "nano-context", "batch-local"))


def _compile(strategy: str, nano: int, executor: str):
    strat = RequestAligned(dynaflow.strategies.get(strategy, nano_batches=nano))
    graphs = []

    def backend(gm, example_inputs):
        thread_mutations(gm, _is_attention)
        from dynaflow.api import CompiledGraph
        from dynaflow.config import DynaflowConfig

        cfg = DynaflowConfig(executor=executor, rules=[HOST_RULE, dynaflow.Op("linear", name="gemm", tags=("compute",))])
        g = CompiledGraph(gm, cfg, strat).prepare()
        graphs.append(g)
        return g

    def run(model, x, lengths):
        qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        compiled = run.__dict__.setdefault("fn", torch.compile(model, backend=backend, dynamic=True))

        def enter(nano_index, rows):
            s, e = rows
            return engine_context(qsl[(qsl >= s) & (qsl <= e)] - s)

        with torch.no_grad(), engine_context(qsl), dynaflow.requests(lengths), nano_context(enter):
            return compiled(x)

    return run, graphs


CASES = [pytest.param("cpu", ex, id=f"cpu-{ex}") for ex in ("serial", "thread", "sim")] + [
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)"),
    ])
]


@pytest.mark.parametrize("device,executor", CASES)
@pytest.mark.parametrize("strategy", ["sequential", "round_robin", "nanoflow"])
@pytest.mark.parametrize("nano", [2, 3])
def test_engine_style_attention_lookup_per_nano_batch(device, executor, strategy, nano):
    torch.manual_seed(0)
    model = TinyEngineModel().eval().to(device)
    run, graphs = _compile(strategy, nano, executor)
    for lengths in ([5, 3, 4], [1, 1, 6], [2, 2, 2, 2, 2]):
        x = torch.randn(sum(lengths), 32, device=device)
        with torch.no_grad(), engine_context(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])):
            ref = model(x)
        torch.testing.assert_close(run(model, x, lengths), ref, atol=1e-5, rtol=1e-5)
    splits = {p.split.num for g in graphs for p in g._by_split.values()}
    assert max(splits) > 1
