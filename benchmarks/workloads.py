"""The workloads of the GPU-floor benchmark (issue 13), as builders of one model step and its inputs.

Every builder returns a :class:`Workload`: the model, the positional inputs of one step (the *same* tensors
on every step, as a serving engine passes its KV caches), a one-line description, and what the harness
needs to time the step fairly (a ``reset`` that restores the start state of a stateful step, outside the
timed region; an ``output`` picker for what is compared against eager). ``model, inputs, description =
workload`` unpacks the three.

(a) ``dense_decode`` — NanoFlow's case: B one-token requests through Llama-8B-shaped layers (hidden 4096,
    32 query / 8 KV heads of 128, MLP 14336, bf16), each request attending over its own KV cache of L
    positions. GEMMs are compute-bound at B=2048, decode attention is memory-bound, and at L=512 the two
    take about the same time. The caches are inputs and are read, never written, so every step is identical.
    The layer exposes ``pre`` (norm + QKV GEMM), ``attn`` and ``post`` (O GEMM + MLP) so the hand-written
    pipelines in ``baselines.py`` can interleave them.
(b) ``mix`` — decode batch + prefill chunk: the model of ``overlap_gpu.py``, reused as is.
(c) ``hf_decode`` — launch-bound: a transformers ``LlamaForCausalLM`` (random weights from a config)
    decoding one token per request with a ``StaticCache``. A decode step appends at the cache's position
    counter, so ``reset`` puts every layer's counter back to the start position: each timed step does the
    same work at the same position, and never runs past the end of the cache.

``--dry-run`` sizes (``tiny=True``) run on a CPU in float32 in seconds.
"""

from __future__ import annotations

import dataclasses

import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import overlap_gpu  # noqa: E402  (workload (b) reuses its model)

log = logging.getLogger("gpu_floor")

__all__ = ["Workload", "DenseShape", "DenseDecode", "dense_decode", "mix", "hf_decode", "instances", "FAMILIES"]

FAMILIES = {"a": "dense_decode", "b": "mix", "c": "hf_decode"}


@dataclass
class Workload:
    """One model step: ``model(*inputs, **kwargs)``; ``reset()`` (if any) runs before every step, untimed."""

    name: str
    family: str
    model: nn.Module
    inputs: tuple[Any, ...]
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    reset: Callable[[], None] | None = None
    output: Callable[[Any], Any] = lambda out: out
    batch: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    """Sizes and dtype (written to the JSON)."""
    static: list[torch.Tensor] = field(default_factory=list)
    """Persistent inputs (KV caches): marked static for ``torch.compile(mode="reduce-overhead")``."""

    def __iter__(self) -> Iterator[Any]:
        yield from (self.model, self.inputs, self.description)

    def step(self, fn: Callable[..., Any] | None = None) -> Any:
        """One step of ``fn`` (default: the model) on this workload's inputs."""
        if self.reset is not None:
            self.reset()
        return self.output((fn or self.model)(*self.inputs, **self.kwargs))


def _on_device(make: Callable[[], nn.Module], device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build the model directly on ``device`` (an 8-layer Llama-8B stack has 1.7 B parameters: initialising
    them on the host takes longer than the whole benchmark of that workload) and draw every weight matrix
    from N(0, 0.02) with a seeded generator of that device."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = make()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
    return model.to(dtype=dtype).eval()


# -- (a) dense decode --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseShape:
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    layers: int = 2
    batch: int = 2048
    kv_len: int = 512
    attention: str = "sdpa"
    """``sdpa``: torch's SDPA on caches ``[B, kv_heads, L, D]`` (stock kernels); ``split_kv``:
    ``dynaflow::decode_attention`` on caches ``[B, L, kv_heads, D]`` (Triton split-KV kernels whose grid follows the
    SMs the launch may use)."""

    @classmethod
    def tiny(cls, layers: int = 2, attention: str = "sdpa") -> "DenseShape":
        return cls(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=layers, batch=8, kv_len=16,
                   attention=attention)


class DenseLayer(nn.Module):
    """A Llama decoder layer for one-token decode against a per-request KV cache ``[B, kv_heads, L, D]``.

    The query heads that share a KV head are folded into the query length of SDPA: for one query token this
    is exactly grouped-query attention, on SDPA's plain (non-GQA) path."""

    def __init__(self, s: DenseShape):
        super().__init__()
        self.s = s
        self.norm1 = overlap_gpu.RMSNorm(s.hidden)
        self.qkv = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=False)
        self.o = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.norm2 = overlap_gpu.RMSNorm(s.hidden)
        self.mlp = overlap_gpu.MLP(overlap_gpu.Shape(hidden=s.hidden, intermediate=s.intermediate))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Compute lane, first half: norm and the QKV GEMM."""
        return self.qkv(self.norm1(x))

    def attn(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Memory lane: decode attention of each request over its own cache (the new K/V are not appended:
        the caches are read-only inputs, so every step is the same)."""
        s = self.s
        b = qkv.shape[0]
        if s.attention == "split_kv":
            q = qkv[:, : s.heads * s.head_dim].reshape(b, s.heads, s.head_dim)
            a = torch.ops.dynaflow.decode_attention(q, k_cache, v_cache, lengths)
            return a.reshape(b, s.heads * s.head_dim)
        q = qkv[:, : s.heads * s.head_dim].reshape(b, s.kv_heads, s.heads // s.kv_heads, s.head_dim)
        return F.scaled_dot_product_attention(q, k_cache, v_cache).reshape(b, s.heads * s.head_dim)

    def post(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Compute lane, second half: the O GEMM, residual, norm and MLP."""
        x = x + self.o(a)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.post(x, self.attn(self.pre(x), k_cache, v_cache, lengths))


class DenseDecode(nn.Module):
    def __init__(self, s: DenseShape):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(s) for _ in range(s.layers))

    def forward(self, x: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, ks[i], vs[i], lengths)
        return x


def dense_decode(layers: int = 2, *, tiny: bool = False, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 batch: int | None = None, kv_len: int | None = None, seed: int = 0,
                 attention: str = "sdpa") -> Workload:
    """Workload (a): B one-token requests, each with its own KV cache of L positions (not modified). The same
    seed gives the same weights and cache contents for either ``attention`` kernel (only the layout differs)."""
    if attention not in ("sdpa", "split_kv"):
        raise ValueError(f"attention={attention!r}: 'sdpa' or 'split_kv'")
    s = DenseShape.tiny(layers, attention) if tiny else DenseShape(layers=layers, attention=attention)
    if batch or kv_len:
        s = DenseShape(**{**s.__dict__, "batch": batch or s.batch, "kv_len": kv_len or s.kv_len})
    if attention == "split_kv":
        import dynaflow.integrations.kernels.decode_attention  # noqa: F401 - registers the op
    model = _on_device(lambda: DenseDecode(s), device, dtype, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(s.batch, s.hidden, device=device, dtype=dtype, generator=g)
    ks = [torch.randn(s.batch, s.kv_heads, s.kv_len, s.head_dim, device=device, dtype=dtype, generator=g)
          for _ in range(s.layers)]
    vs = [torch.randn(s.batch, s.kv_heads, s.kv_len, s.head_dim, device=device, dtype=dtype, generator=g)
          for _ in range(s.layers)]
    inputs: tuple[Any, ...] = (x, ks, vs)
    if attention == "split_kv":  # position-major caches, every position valid
        ks, vs = [k.transpose(1, 2).contiguous() for k in ks], [v.transpose(1, 2).contiguous() for v in vs]
        inputs = (x, ks, vs, torch.full((s.batch,), s.kv_len, device=device, dtype=torch.int32))
    kv_gb = 2 * s.layers * ks[0].numel() * ks[0].element_size() / 1e9
    desc = (f"dense decode: {s.batch} one-token requests, KV {s.kv_len} each ({kv_gb:.2f} GB of caches, read-only), "
            f"{s.layers} layers hidden {s.hidden}, {s.heads}q/{s.kv_heads}kv heads of {s.head_dim}, MLP {s.intermediate}"
            + (", split-KV attention kernels" if attention == "split_kv" else ""))
    suffix = "-splitkv" if attention == "split_kv" else ""
    return Workload(f"a-{s.layers}L{suffix}", "dense_decode", model, inputs, desc, batch=s.batch,
                    meta={**s.__dict__, "dtype": str(dtype).replace("torch.", ""), "kv_cache_gb": kv_gb},
                    static=[*ks, *vs])


# -- (b) decode + prefill mix ------------------------------------------------------------------------------
def mix(*, tiny: bool = False, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, layers: int = 4,
        seed: int = 0) -> Workload:
    """Workload (b): overlap_gpu.py's decode batch + prefill chunk, its model reused as is (built on the
    device here; ``overlap_gpu.build`` initialises on the host)."""
    s = overlap_gpu.Shape.tiny() if tiny else overlap_gpu.Shape(layers=layers)
    model = _on_device(lambda: overlap_gpu.Step(s), device, dtype, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    h = torch.randn(s.decode, s.hidden, device=device, dtype=dtype, generator=g)
    caches = [torch.randn(s.decode, s.kv_heads, s.kv_len, s.head_dim, device=device, dtype=dtype, generator=g)
              for _ in range(2 * s.layers)]
    p = torch.randn(s.prefill, s.hidden, device=device, dtype=dtype, generator=g)  # batch-free: != s.decode rows
    inputs = (h, caches, p)
    desc = (f"decode {s.decode} (KV {s.kv_len}) + prefill chunk {s.prefill}, {s.layers} layers hidden {s.hidden} "
            "(overlap_gpu.py's model)")
    return Workload("b", "mix", model, inputs, desc, batch=s.decode,
                    meta={**s.__dict__, "dtype": str(dtype).replace("torch.", "")}, static=list(inputs[1]))


# -- (c) transformers Llama, static cache, launch-bound --------------------------------------------------
@dataclass(frozen=True)
class HFShape:
    hidden: int = 2048
    layers: int = 4
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 5632
    vocab: int = 32000
    max_cache_len: int = 512
    start: int = 32
    """Cache position every timed step decodes at (the first ``start`` positions hold random K/V)."""

    @classmethod
    def tiny(cls) -> "HFShape":
        return cls(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128, max_cache_len=32, start=5)


def cache_kwarg(model: nn.Module) -> str:
    """The name of the forward's cache argument: ``cache`` in recent transformers 5.x, ``past_key_values``
    before (and a deprecated alias after); decided from the signature, not the version number."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def static_cache(model: nn.Module, batch: int, max_cache_len: int, device: Any, dtype: torch.dtype) -> Any:
    """A transformers ``StaticCache`` allocated now for ``batch`` rows (not lazily on the first forward)."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=max_cache_len)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch, kv_heads, head_dim, dtype, torch.device(device))
    return cache


def cache_counters(cache: Any) -> list[torch.Tensor]:
    """The per-layer position counters a decode step advances (``StaticLayer.cumulative_length``)."""
    return [t for t in (getattr(layer, "cumulative_length", None) for layer in cache.layers) if torch.is_tensor(t)]


def hf_decode(batch: int = 1, *, tiny: bool = False, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
              seed: int = 0, layers: int | None = None) -> Workload:
    """Workload (c): one decode step of a random-weight transformers Llama with a StaticCache (``layers``
    overrides the shape's layer count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = HFShape.tiny() if tiny else HFShape()
    if layers is not None:
        s = dataclasses.replace(s, layers=layers)
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=max(2048, s.max_cache_len), attn_implementation="sdpa")
    model = _on_device(lambda: LlamaForCausalLM(cfg), device, dtype, seed)
    cache = static_cache(model, batch, s.max_cache_len, device, dtype)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    for layer in cache.layers:  # a random "prompt" of `start` positions, written in place (static addresses)
        layer.keys.copy_(torch.randn(layer.keys.shape, device=device, dtype=dtype, generator=g))
        layer.values.copy_(torch.randn(layer.values.shape, device=device, dtype=dtype, generator=g))
    counters = cache_counters(cache)
    if len(counters) != s.layers:
        raise RuntimeError(f"this transformers StaticCache has no per-layer cumulative_length counters "
                           f"({len(counters)} found for {s.layers} layers); hf_decode cannot reset its position")

    def reset() -> None:
        for c in counters:
            c.fill_(s.start)

    reset()
    ids = torch.randint(1, s.vocab, (batch, 1), device=device, generator=g)
    desc = (f"transformers LlamaForCausalLM decode step, batch {batch}, StaticCache {s.max_cache_len} at position "
            f"{s.start}: {s.layers} layers hidden {s.hidden}, {s.heads}q/{s.kv_heads}kv heads, MLP {s.intermediate}, "
            f"vocab {s.vocab}")
    return Workload(f"c-b{batch}", "hf_decode", model, (ids,), desc, kwargs={cache_kwarg(model): cache}, reset=reset,
                    output=lambda out: out.logits, batch=batch,
                    meta={**s.__dict__, "batch": batch, "dtype": str(dtype).replace("torch.", "")},
                    static=[t for layer in cache.layers for t in (layer.keys, layer.values)])


# -- which instances a run builds --------------------------------------------------------------------------
def instances(families: str, *, tiny: bool) -> list[tuple[str, Callable[..., Workload]]]:
    """(name, builder) per workload instance of ``families`` (``"a,b,c"``); a builder takes ``device, dtype``.
    Built lazily, one at a time: the 8-layer dense decode alone holds 34 GB of KV caches."""
    out: list[tuple[str, Callable[..., Workload]]] = []
    for fam in [f.strip() for f in families.split(",") if f.strip()]:
        if fam not in FAMILIES:
            raise SystemExit(f"unknown workload {fam!r}; choose from {', '.join(FAMILIES)} ({FAMILIES})")
        if fam == "a":
            for n in ((2,) if tiny else (2, 8)):
                out.append((f"a-{n}L", lambda n=n, **kw: dense_decode(n, tiny=tiny, **kw)))
        elif fam == "b":
            out.append(("b", lambda **kw: mix(tiny=tiny, **kw)))
        else:
            for b in ((1, 4) if tiny else (1, 4, 16)):
                out.append((f"c-b{b}", lambda b=b, **kw: hf_decode(b, tiny=tiny, **kw)))
    return out
