"""``dynaflow::decode_attention``: decode attention (one query token per request) that reads each request's KV
cache with a split-KV (flash-decoding) Triton kernel whose grid is sized by an SM budget.

Why: on a memory-bound decode step a partitioned lane has only part of the SMs; a kernel that keeps enough loads
in flight with few programs can still draw most of the HBM bandwidth there. Each program takes one request, one
KV head (its group of query heads) and one chunk of the KV; a second kernel combines the chunks' partial
softmaxes by their log-sum-exp. ``sm_budget`` sets how many programs run per SM wave (more chunks per request
when the batch is small).

It is offered the way a user registers a kernel of their own: a ``torch.library`` op with a fake
implementation (Dynamo and FLOP counting trace it), a batch rule (each request's row on its own:
``rows(q=0, k_cache=0, v_cache=0, lengths=0)``), and the name the default rules tag ``memory``. On CPU tensors,
or without Triton, the op runs :func:`reference` (plain torch). Import this module to register it.

Shapes: ``q`` (B, Hq, D); ``k_cache``, ``v_cache`` (B, L, Hkv, D) with Hq a multiple of Hkv; ``lengths`` (B,)
int: positions ``>= lengths[b]`` are ignored. Returns (B, Hq, D) in ``q``'s dtype (accumulated in float32).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dynaflow.frontend.aten_rules import register_batch_rule, rows

__all__ = ["decode_attention", "reference", "triton_decode_attention", "num_splits", "triton_available"]

BLOCK_N = 32
"""KV positions a program loads per iteration."""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no Triton path
        return False
    return True


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Plain-torch decode attention with the op's semantics (float32 accumulation, masking by ``lengths``)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    k = k_cache.float().repeat_interleave(hq // hkv, dim=2)             # (B, L, Hq, D)
    v = v_cache.float().repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), k) / math.sqrt(d)  # (B, Hq, L)
    pos = torch.arange(k_cache.shape[1], device=q.device)
    scores = scores.masked_fill(pos[None, None, :] >= lengths.to(q.device)[:, None, None], float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)                   # an empty request attends to nothing
    return torch.einsum("bhl,blhd->bhd", w, v).to(q.dtype)


def num_splits(batch: int, kv_heads: int, max_len: int, sm_budget: int, waves: int = 2) -> int:
    """KV chunks per (request, KV head): enough programs for ``waves`` waves over ``sm_budget`` SMs, never more
    chunks than blocks of the longest cache."""
    want = max(1, math.ceil(sm_budget * waves / max(1, batch * kv_heads)))
    return max(1, min(want, math.ceil(max_len / BLOCK_N)))


def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            sm_budget: int) -> torch.Tensor:
    """The two Triton kernels (partial chunks, then their log-sum-exp combination)."""
    from dynaflow.integrations.kernels import _split_kv

    b, hq, d = q.shape
    L, hkv = k_cache.shape[1], k_cache.shape[2]
    splits = num_splits(b, hkv, L, sm_budget)
    chunk = math.ceil(L / splits / BLOCK_N) * BLOCK_N
    part = torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    _split_kv.launch(q, k_cache, v_cache, lengths.to(torch.int32), part, lse, out, chunk, splits, BLOCK_N)
    return out


@torch.library.custom_op("dynaflow::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     sm_budget: int = 132) -> torch.Tensor:
    """Decode attention over per-request KV caches (module docstring); Triton on CUDA, plain torch elsewhere."""
    if q.is_cuda and triton_available():
        return triton_decode_attention(q, k_cache, v_cache, lengths, sm_budget)
    return reference(q, k_cache, v_cache, lengths)


@decode_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
      sm_budget: int = 132) -> Any:
    # the shape relations, stated: Dynamo then knows every argument's dim 0 is the one batch (one size symbol)
    for t in (k_cache, v_cache, lengths):
        torch._check(t.size(0) == q.size(0), lambda: "decode_attention: q, k_cache, v_cache, lengths share dim 0")
    torch._check(v_cache.size(1) == k_cache.size(1))
    torch._check(q.size(2) == k_cache.size(3))
    return torch.empty_like(q)


register_batch_rule("dynaflow::decode_attention", rows(q=0, k_cache=0, v_cache=0, lengths=0))
