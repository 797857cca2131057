"""The toy engine's opaque kernels as ``torch.library`` custom ops (namespace ``toyengine``).

* ``rotary(positions, q, k, cos_sin, head_dim)`` rotates ``q`` and ``k`` **in place** (neox style, as
  ``transformers`` Llama does), like vLLM's ``_C.rotary_embedding``; ``positions`` is its own model input.
* ``write_kv(k, v, layer)`` writes the step's K/V into layer ``layer``'s paged cache at the forward context's
  ``slot_mapping`` and returns an empty tensor that attention takes as a dependency (vLLM's
  ``unified_kv_cache_update`` / ``kv_cache_dummy_dep``).
* ``paged_attention(q, k, v, out, kv_dep, layer, scale)`` fills ``out`` in place and returns nothing (vLLM's
  ``unified_attention_with_output``); it reads ``query_start_loc``, ``seq_lens`` and ``block_table`` from
  the forward context.

The kernels are pure torch with fixed shapes and no host reads of device data, so they run on CPU and on a
GPU inside a CUDA graph alike: each query token finds its request with a ``searchsorted`` on
``query_start_loc``, gathers its request's cache slots through the block table and masks keys past its own
position. The fake impls let Dynamo trace the ops; :func:`register_batch_rules` tells dynaflow they are
row-local.
"""

from __future__ import annotations

import torch

from .context import get_forward_context


@torch.library.custom_op("toyengine::rotary", mutates_args=("q", "k"))
def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, head_dim: int) -> None:
    half = head_dim // 2
    cos, sin = cos_sin[positions].unsqueeze(1).split(half, dim=-1)  # [T, 1, half] each
    for x in (q, k):
        xv = x.unflatten(-1, (-1, head_dim))  # a view: q/k may be column slices of the fused qkv output
        x1, x2 = xv[..., :half], xv[..., half:]
        xv.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


@rotary.register_fake
def _(positions, q, k, cos_sin, head_dim):
    return None


@torch.library.custom_op("toyengine::write_kv", mutates_args=())
def write_kv(k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    ctx = get_forward_context()
    k_cache, v_cache = ctx.kv_caches[layer]
    slots = ctx.meta.slot_mapping
    if slots.shape[0] != k.shape[0]:
        raise RuntimeError(f"toy engine: slot_mapping covers {slots.shape[0]} tokens, write_kv got {k.shape[0]}")
    k_cache.index_copy_(0, slots, k.reshape(k.shape[0], *k_cache.shape[1:]))
    v_cache.index_copy_(0, slots, v.reshape(v.shape[0], *v_cache.shape[1:]))
    return k.new_empty(0)


@write_kv.register_fake
def _(k, v, layer):
    return k.new_empty(0)


@torch.library.custom_op("toyengine::paged_attention", mutates_args=("out",))
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, kv_dep: torch.Tensor,
                    layer: int, scale: float) -> None:
    ctx = get_forward_context()
    meta = ctx.meta
    k_cache, v_cache = ctx.kv_caches[layer]
    n_tok, (n_kv, hd) = q.shape[0], k_cache.shape[1:]
    if meta.slot_mapping.shape[0] != n_tok:
        raise RuntimeError(f"toy engine: metadata covers {meta.slot_mapping.shape[0]} tokens, attention got {n_tok}")
    qh = q.reshape(n_tok, -1, hd)  # [T, H, hd]
    tok = torch.arange(n_tok, device=q.device)
    qsl = meta.query_start_loc
    req = torch.searchsorted(qsl, tok, right=True) - 1  # each token's request
    pos = meta.seq_lens[req] - (qsl[req + 1] - tok)  # each token's absolute position
    bs, width = ctx.block_size, meta.block_table.shape[1] * ctx.block_size
    j = torch.arange(width, device=q.device)
    slots = meta.block_table[req][:, j // bs] * bs + j % bs  # [T, L] cache slots of the request's history
    rep = qh.shape[1] // n_kv
    keys = k_cache[slots].repeat_interleave(rep, dim=2)  # [T, L, H, hd]
    vals = v_cache[slots].repeat_interleave(rep, dim=2)
    scores = torch.einsum("thd,tlhd->thl", qh, keys) * scale
    scores = scores.masked_fill((j[None, :] > pos[:, None])[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out.copy_(torch.einsum("thl,tlhd->thd", probs, vals).reshape(out.shape))


@paged_attention.register_fake
def _(q, k, v, out, kv_dep, layer, scale):
    return None


def register_batch_rules() -> None:
    """Row-local batch rules (idempotent): every token row of these ops is computed on its own, given the
    forward context of the rows it is called on (attention also runs as a nano-context segment)."""
    from dynaflow.frontend.aten_rules import register_batch_rule, rows

    register_batch_rule("toyengine::rotary", rows(positions=0, q=0, k=0))
    register_batch_rule("toyengine::write_kv", rows(k=0, v=0))
    register_batch_rule("toyengine::paged_attention", rows(q=0, k=0, v=0, out=0))
