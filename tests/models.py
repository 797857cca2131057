"""Shared test models: small hand-written modules and tiny random transformers models.

Every factory returns a model in ``eval()`` mode with deterministic weights (seeded locally, so the
weights do not depend on the order in which tests run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dynaflow

HIDDEN = 16


class MLP(nn.Module):
    """A hand-written MLP: linear -> gelu -> linear -> relu -> linear (all row-separable)."""

    def __init__(self, d_in: int = HIDDEN, d_hidden: int = 32, d_out: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        return self.fc3(h)


class FeedForward(nn.Module):
    """The MLP submodule of a transformer block (matched by the default ``mlp``/``feedforward`` rule)."""

    def __init__(self, d: int, mult: int = 2):
        super().__init__()
        self.up = nn.Linear(d, d * mult)
        self.down = nn.Linear(d * mult, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        k = k.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        v = v.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = FeedForward(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TinyTransformer(nn.Module):
    """A stack of pre-norm blocks: input (B, S, d) -> output (B, S, d)."""

    def __init__(self, d: int = HIDDEN, heads: int = 2, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class BatchCoupled(nn.Module):
    """``h - h.mean(0)``: the mean couples rows of the batch, so a correct plan needs a barrier."""

    def __init__(self, d: int = HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h - h.mean(0)
        return self.fc2(torch.relu(h))


def _build(cls, *args, seed: int = 0, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(*args, **kwargs)
    return model.eval()


def make_mlp(seed: int = 0) -> nn.Module:
    return _build(MLP, seed=seed)


def make_transformer(seed: int = 0, layers: int = 2) -> nn.Module:
    return _build(TinyTransformer, seed=seed, layers=layers)


def make_coupled(seed: int = 0) -> nn.Module:
    return _build(BatchCoupled, seed=seed)


def mlp_input(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, HIDDEN, generator=g)


def transformer_input(batch: int, seq: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, HIDDEN, generator=g)


# -- transformers models ------------------------------------------------------------------------------
HF_VOCAB = 128
HF_SEQ = 8


def _hf_common() -> dict:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=HF_VOCAB,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )


def make_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_hf_common())
    return _build(LlamaForCausalLM, cfg, seed=seed)


def make_mixtral(seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**_hf_common(), num_local_experts=4, num_experts_per_tok=2)
    return _build(MixtralForCausalLM, cfg, seed=seed)


def make_falcon(seed: int = 0) -> nn.Module:
    """Multi-query attention (one KV head) and a fused QKV split by list indices (``fused_qkv[..., [-2], :]``)."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=HF_VOCAB,
                       multi_query=True, bos_token_id=1, eos_token_id=1, attn_implementation="sdpa")
    return _build(FalconForCausalLM, cfg, seed=seed)


HF_FACTORIES = {"llama": make_llama, "mixtral": make_mixtral}


def hf_input(batch: int, seq: int = HF_SEQ, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, HF_VOCAB, (batch, seq), generator=g)


# -- grad mode for test calls ---------------------------------------------------------------------------
def assert_same_generation(out, ref, tol: float = 1e-4) -> None:
    """Two ``generate(..., return_dict_in_generate=True, output_logits=True)`` results: tokens equal, and every
    step's logits close (so equal tokens are not the luck of a tiny random model)."""
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def grad_off(mode: str = "no_grad"):
    """The no-autograd context a test calls a model in: ``"no_grad"`` (the default) or ``"inference"``.

    Both matter for the thread executor: grad and inference modes are thread-local, so its lanes must take
    the caller's (a past bug re-enabled autograd in the lanes under ``no_grad``).
    """
    if mode == "inference":
        return torch.inference_mode()
    assert mode == "no_grad", mode
    return torch.no_grad()


def split_strategies() -> list[str]:
    """Registered strategies that split into exactly the ``nano_batches`` they are given (``auto`` picks its own
    split, ``prefill_decode`` splits by request phase, ``eager`` runs the captured graph as is:
    tests/test_strategies.py and tests/test_auto_floor.py cover those)."""
    return [s for s in dynaflow.strategies.available() if s not in ("auto", "prefill_decode", "eager")]
