"""The Triton kernels behind ``dynaflow::decode_attention`` (imported only when Triton is there).

Both kernels are persistent: the grid is the plan's program count (a multiple of the SM budget), and each program
walks the work items ``pid, pid + programs, ...``. So the number of programs in flight — and, on a green-context
partition, the SMs they need — is set by the caller, not by the batch size.

``_partial``: one work item is (request, KV head, chunk of KV positions). It loads the group's query heads once
and streams the chunk's K and V tiles (``BLOCK_N`` positions; Triton pipelines ``num_stages`` tiles ahead, which
is what keeps enough bytes in flight per SM), with an online softmax in float32 and both products on the tensor
cores (bf16 operands, float32 accumulation, as flash attention does). With one chunk per request it writes the
output itself; otherwise it writes the chunk's normalised output and its log-sum-exp (base 2), and ``_combine``
weighs the chunks of each (request, query head) by their share of the softmax.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

__all__ = ["launch"]


@triton.jit
def _partial(q, k, v, lengths, part, lse, out, qk_scale, n_items, L, chunk, splits, hkv,
             sqb, sqh, skb, skl, skh, svb, svl, svh, spb, sph, sps, slb, slh, sob, soh,
             G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, DIRECT: tl.constexpr):
    """Work items (request, KV head, chunk), strided over the programs: online softmax of the group's queries."""
    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    gm, dm = g < G, dd < D
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        s = item % splits
        h = (item // splits) % hkv
        b = (item // splits // hkv).to(tl.int64)                  # 64-bit offsets: caches may exceed 2**31 elements
        heads = h * G + g
        n = tl.minimum(tl.load(lengths + b), L)                   # positions >= lengths[b] (or >= L) are ignored
        lo = s * chunk
        hi = tl.minimum(lo + chunk, n)
        qv = tl.load(q + b * sqb + heads[:, None] * sqh + dd[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
        qv = qv.to(k.dtype.element_ty)
        k_row = k + b * skb + h * skh + dd[None, :]
        v_row = v + b * svb + h * svh + dd[None, :]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):                      # every tile holds at least one valid position
            pos = start + nn
            pm = pos < hi
            kb = tl.load(k_row + pos[:, None] * skl, mask=pm[:, None] & dm[None, :], other=0.0)
            vb = tl.load(v_row + pos[:, None] * svl, mask=pm[:, None] & dm[None, :], other=0.0)
            sc = tl.dot(qv, tl.trans(kb), input_precision="ieee") * qk_scale     # (G, N) logits in base 2
            sc = tl.where(pm[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))                          # finite: one position is valid
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision="ieee")
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                           # an empty chunk (or request): 0
        if DIRECT:
            tl.store(out + b * sob + heads[:, None] * soh + dd[None, :], o.to(out.dtype.element_ty),
                     mask=gm[:, None] & dm[None, :])
        else:
            tl.store(part + b * spb + heads[:, None] * sph + s * sps + dd[None, :], o, mask=gm[:, None] & dm[None, :])
            lse_i = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))  # empty weighs 0
            tl.store(lse + b * slb + heads * slh + s, lse_i, mask=gm)


@triton.jit
def _combine(part, lse, out, n_rows, hq, spb, sph, sps, slb, slh, sob, soh,
             S: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows (request, query head), strided over the programs: the chunks' outputs weighted by ``2**lse``."""
    ss = tl.arange(0, BLOCK_S)
    dd = tl.arange(0, BLOCK_D)
    sm, dm = ss < S, dd < D
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        b = (row // hq).to(tl.int64)
        h = row % hq
        ls = tl.load(lse + b * slb + h * slh + ss, mask=sm, other=float("-inf"))
        mx = tl.max(ls, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.where(sm, tl.exp2(ls - mx), 0.0)
        po = tl.load(part + b * spb + h * sph + ss[:, None] * sps + dd[None, :], mask=sm[:, None] & dm[None, :],
                     other=0.0)
        tot = tl.sum(w, axis=0)
        o = tl.sum(w[:, None] * po, axis=0) / tl.where(tot > 0, tot, 1.0)
        tl.store(out + b * sob + h * soh + dd, o.to(out.dtype.element_ty), mask=dm)


def launch(q: Any, k: Any, v: Any, lengths: Any, part: Any, lse: Any, out: Any, *, programs: int, chunk: int,
           splits: int, block_n: int, num_warps: int, num_stages: int) -> Any:
    """Run the plan: ``_partial`` on ``programs`` programs, then (several chunks) ``_combine`` on as many.
    Returns ``_partial``'s compiled kernel (its registers and shared memory give the occupancy)."""
    b, hq, d = q.shape
    L, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    assert q.stride(2) == 1 and k.stride(3) == 1 and v.stride(3) == 1 and out.stride(2) == 1
    block_d = max(16, triton.next_power_of_2(d))                 # tl.dot needs every dim >= 16
    direct = splits == 1
    n_items = b * hkv * splits
    kernel = _partial[(max(1, min(programs, n_items)),)](
        q, k, v, lengths, part, lse, out, 1.4426950408889634 / d ** 0.5, n_items, L, chunk, splits, hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=block_d, BLOCK_N=block_n, DIRECT=direct,
        num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _combine[(max(1, min(programs, b * hq)),)](
            part, lse, out, b * hq, hq, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), S=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), D=d,
            BLOCK_D=block_d, num_warps=4)
    return kernel
