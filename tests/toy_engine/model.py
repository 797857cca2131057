"""A tiny Llama decoder for the toy engine, with weights copied from a ``transformers`` Llama.

The forward has vLLM's shape: ``forward(input_ids, positions) -> hidden_states`` over the step's flat token
rows (no batch dim: requests are concatenated), with a fused qkv projection whose column slices the in-place
rotary op writes, and attention through the paged-KV custom ops. The LM head is applied outside the compiled
step to each request's last row, as vLLM's ``compute_logits`` is. Arithmetic mirrors ``transformers``'s Llama
(RMSNorm in float32, rotary cos/sin from its own rotary module) so greedy tokens can be compared exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.toyengine)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # as transformers' LlamaRMSNorm: the statistics in float32
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Layer(nn.Module):
    def __init__(self, idx: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, eps: float):
        super().__init__()
        self.idx, self.head_dim = idx, head_dim
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        self.scale = head_dim ** -0.5
        self.input_layernorm = RMSNorm(hidden, eps)
        self.qkv = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        x = self.input_layernorm(h)
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        torch.ops.toyengine.rotary(positions, q, k, cos_sin, self.head_dim)
        dep = torch.ops.toyengine.write_kv(k, v, self.idx)
        out = torch.empty((q.shape[0], self.q_size), dtype=q.dtype, device=q.device)
        torch.ops.toyengine.paged_attention(q, k, v, out, dep, self.idx, self.scale)
        h = h + self.o_proj(out)
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ToyLlama(nn.Module):
    """``forward(input_ids [T], positions [T]) -> hidden [T, hidden]``; ``logits(hidden)`` applies the head."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                 eps: float, max_positions: int):
        super().__init__()
        self.num_kv_heads, self.head_dim = kv_heads, head_dim
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(i, hidden, heads, kv_heads, head_dim, inter, eps) for i in range(layers))
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("cos_sin", torch.zeros(max_positions, head_dim))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, positions, self.cos_sin)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @classmethod
    def from_hf(cls, hf: nn.Module) -> "ToyLlama":
        """Copy a ``transformers.LlamaForCausalLM``'s weights (same dtype and device)."""
        c = hf.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        param = next(hf.parameters())
        m = cls(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                head_dim, c.intermediate_size, c.rms_norm_eps, c.max_position_embeddings)
        m = m.to(dtype=param.dtype, device=param.device)
        src = hf.model
        with torch.no_grad():
            m.embed_tokens.weight.copy_(src.embed_tokens.weight)
            m.norm.weight.copy_(src.norm.weight)
            m.lm_head.weight.copy_(hf.lm_head.weight)
            for mine, theirs in zip(m.layers, src.layers):
                a, mlp = theirs.self_attn, theirs.mlp
                mine.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
                mine.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
                mine.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                mine.o_proj.weight.copy_(a.o_proj.weight)
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(mine, name).weight.copy_(getattr(mlp, name).weight)
            # transformers' own cos/sin (computed in float32, then cast), so rotary rounds exactly as it does
            pos = torch.arange(c.max_position_embeddings, device=param.device)[None]
            cos, sin = src.rotary_emb(m.cos_sin[None], pos)
            half = head_dim // 2
            m.cos_sin.copy_(torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1))
        return m.eval().requires_grad_(False)
