"""``dynaflow::decode_attention``: decode attention (one query token per request) that reads each request's KV
cache with split-KV (flash-decoding) Triton kernels whose grid is sized by an SM budget.

Why: on a memory-bound decode step a partitioned lane has only part of the SMs; cuDNN/flash kernels size their
grid for the whole device and slow in proportion. These kernels are persistent: ``sm_budget * programs per SM``
programs (fewer when there is less work) each walk work items — (request, KV head, chunk of the KV) — and keep
``num_stages`` K/V tiles in flight, so a few programs per SM can draw most of the HBM bandwidth. A small second
kernel combines the chunks' partial softmaxes by their log-sum-exp. How the KV is cut (:func:`split_plan`) follows
the budget: one chunk per request when the batch alone gives every program work, more when it does not.

It is offered the way a user registers a kernel of their own: a ``torch.library`` op with a fake implementation
(Dynamo and FakeTensor counting trace it), a batch rule (each request's row on its own:
``rows(q=0, k_cache=0, v_cache=0, lengths=0)``), and a name the default rules tag ``memory``. On CPU tensors, or
without Triton, the op runs :func:`reference` (plain torch, registered as the op's CPU kernel). Import this module
to register it; Triton is imported only when the kernels first run on a GPU.

Shapes: ``q`` (B, Hq, D); ``k_cache``, ``v_cache`` (B, L, Hkv, D), Hq a multiple of Hkv (query head ``h`` reads KV
head ``h // (Hq // Hkv)``); ``lengths`` (B,) int: positions ``>= lengths[b]`` are ignored (a request of length 0
gives zeros). Returns (B, Hq, D) in ``q``'s dtype, accumulated in float32. The layout is the one a decode step
appends to — position-major, heads inside (``k_cache[b, pos] = k_new``), as vLLM's and transformers' caches are
per request; each (position, KV head) row is D contiguous elements, so the kernels' loads stay coalesced.
``sm_budget`` ≤ 0 means every SM this launch may use (:func:`~dynaflow.backend.sm_partitions.available_sms`): the
device's less torch's SM carveout, which the cuda executor sets to what a partitioned lane lacks — so on a lane's
partition the grid is that partition's without any argument naming it.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from dynaflow.backend.sm_partitions import available_sms
from dynaflow.frontend.aten_rules import register_batch_rule, rows

__all__ = ["decode_attention", "reference", "chunked_reference", "triton_decode_attention", "triton_available",
           "KernelConfig", "SplitPlan", "split_plan", "plan_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the partial kernel (the defaults are untuned guesses for Hopper, see the benchmark's
    ``--sweep``): ``block_n`` KV positions per tile, ``num_stages`` tiles in flight, ``programs_per_sm`` (capped by
    the compiled kernel's occupancy, so that every program is resident and the persistent loop stays balanced)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2


DEFAULT_CONFIG = KernelConfig()
ITEM_OVERHEAD_TILES = 2
"""What starting a work item costs (the query load, the pipeline's fill, the stores), in K/V tiles."""
COMBINE_TILES = 4
"""What the combine kernel costs (a launch and a pass over the partial outputs), in K/V tiles."""


@dataclass(frozen=True)
class SplitPlan:
    """How one call is cut: ``programs`` persistent programs over ``items`` work items (request, KV head,
    chunk), ``splits`` chunks of ``chunk`` positions per (request, KV head)."""

    programs: int
    splits: int
    chunk: int
    items: int


@functools.lru_cache(maxsize=1024)
def split_plan(batch: int, kv_heads: int, max_len: int, programs: int, block_n: int = DEFAULT_CONFIG.block_n
               ) -> SplitPlan:
    """The chunking that finishes first on ``programs`` programs: each program's items (``ceil(items /
    programs)`` rounds) times a chunk's tiles plus a per-item overhead, plus the combine when there are chunks.
    Splits up to eight rounds of items are tried (more only shortens the chunks); ties go to fewer chunks."""
    pairs, tiles, programs = max(1, batch * kv_heads), max(1, math.ceil(max_len / block_n)), max(1, programs)
    best: tuple[float, int, int] | None = None
    for splits in range(1, min(tiles, math.ceil(8 * programs / pairs)) + 1):
        chunk_tiles = math.ceil(tiles / splits)
        if (splits - 1) * chunk_tiles >= tiles:
            continue  # its last chunk would always be empty
        rounds = math.ceil(pairs * splits / programs)
        cost = rounds * (chunk_tiles + ITEM_OVERHEAD_TILES) + (COMBINE_TILES if splits > 1 else 0)
        if best is None or cost < best[0]:
            best = (cost, splits, chunk_tiles)
    assert best is not None
    _, splits, chunk_tiles = best
    items = batch * kv_heads * splits
    return SplitPlan(programs=max(1, min(programs, items)), splits=splits, chunk=chunk_tiles * block_n, items=items)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports (checked once)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no Triton path
        return False
    return True


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Plain-torch decode attention with the op's semantics (float32 accumulation, masking by ``lengths``)."""
    scores, v = _scores(q, k_cache, v_cache, lengths)
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)                   # an empty request attends to nothing
    return torch.einsum("bhl,blhd->bhd", w, v).to(q.dtype)


def chunked_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                      chunk: int) -> torch.Tensor:
    """The kernels' algorithm in plain torch: a softmax per chunk of ``chunk`` positions, then the chunks combined
    by their log-sum-exp (an empty chunk weighs 0). It lets CPU tests check the split-KV math without Triton."""
    scores, v = _scores(q, k_cache, v_cache, lengths)
    outs, lses = [], []
    for lo in range(0, max(1, scores.shape[-1]), chunk):
        sc = scores[..., lo:lo + chunk]
        m = sc.amax(dim=-1, keepdim=True) if sc.shape[-1] else torch.full_like(scores[..., :1], -math.inf)
        m = m.masked_fill(m == -math.inf, 0.0)
        p = torch.exp(sc - m)
        total = p.sum(dim=-1, keepdim=True)
        outs.append(torch.einsum("bhl,blhd->bhd", p, v[:, lo:lo + chunk]) / total.clamp_min(1e-30))
        lses.append(torch.where(total > 0, m + total.clamp_min(1e-30).log(), -math.inf).squeeze(-1))
    w = torch.softmax(torch.stack(lses, dim=-1), dim=-1).nan_to_num(0.0)  # (B, Hq, chunks)
    return torch.einsum("bhc,cbhd->bhd", w, torch.stack(outs)).to(q.dtype)


def _scores(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked float32 logits (B, Hq, L) and the values repeated per query head (B, L, Hq, D)."""
    group = q.shape[1] // k_cache.shape[2]
    k = k_cache.float().repeat_interleave(group, dim=2)
    v = v_cache.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), k) / math.sqrt(q.shape[2])
    pos = torch.arange(k_cache.shape[1], device=q.device)
    return scores.masked_fill(pos[None, None, :] >= lengths.to(q.device)[:, None, None], -math.inf), v


_OCCUPANCY: dict[tuple[Any, ...], int] = {}
"""Programs of the compiled partial kernel that fit on an SM at once, per device, dtypes, shape and config (the
smaller of its two variants once both ran)."""
_MEASURED: set[tuple[Any, ...]] = set()


def _occupancy(kernel: Any, device: torch.device, num_warps: int) -> int | None:
    """How many programs of ``kernel`` (a compiled Triton kernel) an SM holds: registers, shared memory, threads."""
    try:
        props = torch.cuda.get_device_properties(device)
        threads = 32 * num_warps
        fits = [getattr(props, "max_threads_per_multi_processor", 2048) // threads, 32]
        if kernel.n_regs:  # 64 K registers per SM on every NVIDIA GPU since Kepler (older torch does not say)
            fits.append(getattr(props, "regs_per_multiprocessor", 65536) // (kernel.n_regs * threads))
        if kernel.metadata.shared:  # each resident block also reserves 1 KiB
            fits.append(props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024))
        return max(1, min(fits))
    except Exception:  # noqa: BLE001 - an older Triton or torch without these fields: keep the configured count
        log.debug("no occupancy for the split-KV kernel", exc_info=True)
        return None


def _variant(q: torch.Tensor, k_cache: torch.Tensor, config: KernelConfig) -> tuple[Any, ...]:
    return (q.device, q.dtype, k_cache.dtype, q.shape[2], q.shape[1] // k_cache.shape[2], config)


def plan_for(q: torch.Tensor, k_cache: torch.Tensor, sm_budget: int = 0,
             config: KernelConfig = DEFAULT_CONFIG) -> SplitPlan:
    """The plan :func:`triton_decode_attention` runs for these inputs now: ``sm_budget`` (≤ 0: the SMs available
    to this launch, the lane's partition under the cuda executor) times the programs per SM that fit (one until
    the kernel variant has run once)."""
    if sm_budget <= 0:
        sm_budget = available_sms(q.device) if q.is_cuda else 1
    per_sm = min(config.programs_per_sm, _OCCUPANCY.get(_variant(q, k_cache, config), 1))
    return split_plan(q.shape[0], k_cache.shape[2], k_cache.shape[1], sm_budget * per_sm, config.block_n)


def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            sm_budget: int = 0, config: KernelConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """The Triton kernels on ``sm_budget * config.programs_per_sm`` programs (at most as many as fit: the first
    call of a kernel variant runs one program per SM and measures its occupancy)."""
    from dynaflow.integrations.kernels import _split_kv

    b, hq, d = q.shape
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    plan = plan_for(q, k_cache, sm_budget, config)
    if plan.splits > 1:
        part = torch.empty(b, hq, plan.splits, d, device=q.device, dtype=torch.float32)
        lse = torch.empty(b, hq, plan.splits, device=q.device, dtype=torch.float32)
    else:
        part, lse = out.unsqueeze(2), out[:, :, 0].unsqueeze(2)          # unused (the kernel writes ``out``)
    kernel = _split_kv.launch(q, k_cache, v_cache, lengths.to(torch.int32), part, lse, out,
                              programs=plan.programs, chunk=plan.chunk, splits=plan.splits, block_n=config.block_n,
                              num_warps=config.num_warps, num_stages=config.num_stages)
    key = _variant(q, k_cache, config)
    variant = (*key, plan.splits == 1)                                  # with or without the combine: two kernels
    if variant not in _MEASURED and q.is_cuda and kernel is not None:
        _MEASURED.add(variant)
        fits = _occupancy(kernel, q.device, config.num_warps) or config.programs_per_sm
        _OCCUPANCY[key] = min(fits, _OCCUPANCY.get(key, fits))
        log.info("split-KV kernel %s: %d programs per SM fit", variant[1:], fits)
    return out


@torch.library.custom_op("dynaflow::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     sm_budget: int = 0) -> torch.Tensor:
    """Decode attention over per-request KV caches (module docstring); Triton on CUDA, plain torch elsewhere."""
    if q.is_cuda and triton_available():
        return triton_decode_attention(q, k_cache, v_cache, lengths, sm_budget)
    return reference(q, k_cache, v_cache, lengths)


@decode_attention.register_kernel("cpu")
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
      sm_budget: int = 0) -> torch.Tensor:
    return reference(q, k_cache, v_cache, lengths)


@decode_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
      sm_budget: int = 0) -> Any:
    # the shape relations, stated: Dynamo then knows every argument's dim 0 is the one batch (one size symbol)
    for t in (k_cache, v_cache, lengths):
        torch._check(t.size(0) == q.size(0), lambda: "decode_attention: q, k_cache, v_cache, lengths share dim 0")
    torch._check(v_cache.size(1) == k_cache.size(1), lambda: "decode_attention: k_cache and v_cache share L")
    torch._check(v_cache.size(2) == k_cache.size(2), lambda: "decode_attention: k_cache and v_cache share Hkv")
    torch._check(q.size(2) == k_cache.size(3), lambda: "decode_attention: q and k_cache share D")
    torch._check(q.size(1) % k_cache.size(2) == 0, lambda: "decode_attention: Hq is a multiple of Hkv")
    return torch.empty_like(q)


register_batch_rule("dynaflow::decode_attention", rows(q=0, k_cache=0, v_cache=0, lengths=0))
