"""The Triton kernels behind ``dynaflow::decode_attention`` (imported only when Triton is there)."""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

__all__ = ["launch"]


@triton.jit
def _partial(q, k, v, lengths, part, lse, scale,
             sqb, sqh, skb, skl, skh, spb, sph, sps, slb, slh,
             chunk, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """One (request, KV head, chunk): online softmax of the group's queries over the chunk's positions."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(lengths + b)
    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    gm, dm = g < G, dd < D
    qv = tl.load(q + b * sqb + (h * G + g)[:, None] * sqh + dd[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    qv = qv.to(tl.float32) * scale
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = s * chunk
    for off in range(0, chunk, BLOCK_N):
        pos = start + off + tl.arange(0, BLOCK_N)
        pm = pos < n
        kv_off = b * skb + pos[:, None] * skl + h * skh + dd[None, :]
        kb = tl.load(k + kv_off, mask=pm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        vb = tl.load(v + kv_off, mask=pm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        sc = tl.dot(qv, tl.trans(kb), input_precision="ieee")          # (G, N)
        sc = tl.where(pm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision="ieee")
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    heads = h * G + g
    tl.store(part + b * spb + heads[:, None] * sph + s * sps + dd[None, :], o, mask=gm[:, None] & dm[None, :])
    lse_i = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))  # an empty chunk weighs 0
    tl.store(lse + b * slb + heads * slh + s, lse_i, mask=gm)


@triton.jit
def _combine(part, lse, out, spb, sph, sps, slb, slh, sob, soh,
             S: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (request, query head): the chunks' partial outputs weighted by their share of the softmax."""
    b, h = tl.program_id(0), tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    dd = tl.arange(0, BLOCK_D)
    sm, dm = ss < S, dd < D
    ls = tl.load(lse + b * slb + h * slh + ss, mask=sm, other=float("-inf"))
    mx = tl.max(ls, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(ls - mx)
    w = tl.where(sm, w, 0.0)
    po = tl.load(part + b * spb + h * sph + ss[:, None] * sps + dd[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    tot = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * po, axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out + b * sob + h * soh + dd, o.to(out.dtype.element_ty), mask=dm)


def launch(q: Any, k: Any, v: Any, lengths: Any, part: Any, lse: Any, out: Any, chunk: int, splits: int,
           block_n: int) -> None:
    b, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    assert q.stride(2) == 1 and k.stride(3) == 1 and v.stride() == k.stride() and out.stride(2) == 1
    block_d = triton.next_power_of_2(d)
    _partial[(b, hkv, splits)](
        q, k, v, lengths, part, lse, 1.0 / d ** 0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        chunk, G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=block_d, BLOCK_N=block_n)
    _combine[(b, hq)](
        part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), S=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), D=d, BLOCK_D=block_d)
