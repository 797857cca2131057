"""Tensor-parallel Llama-style decoder under dynaflow: all-reduces overlapped with nano-batches.

Megatron-style sharding in plain PyTorch: q/k/v and gate/up projections are column-parallel (each rank
holds ``heads / world`` heads and ``ffn / world`` columns), o_proj and down_proj are row-parallel and end in an
all-reduce written with ``torch.distributed._functional_collectives`` — Dynamo captures it as
``_c10d_functional.all_reduce`` + ``wait_tensor``, which dynaflow's default rules cut into a network
segment. (In-place ``torch.distributed.all_reduce(t)`` works too: pass ``--inplace``; Dynamo rewrites it to
the functional op followed by ``t.copy_(...)``.)

Run on CPU (gloo) or GPUs (nccl, one per rank)::

    python -m torch.distributed.run --nproc-per-node 2 examples/tensor_parallel_llama.py
    python -m torch.distributed.run --nproc-per-node 4 examples/tensor_parallel_llama.py --strategy round_robin

Every rank prints nothing but rank 0 reports the largest difference to the eager (non-split) run.
"""

from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TPConfig:
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    layers: int = 2
    eps: float = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup, inplace: bool) -> torch.Tensor:
    """Sum over the tensor-parallel group (functional by default; in-place ``dist.all_reduce`` works too)."""
    if inplace:
        dist.all_reduce(t, group=group)
        return t
    return fc.all_reduce(t, "sum", group)


class TPAttention(nn.Module):
    """Column-parallel q/k/v (local heads), causal SDPA, row-parallel o_proj + all-reduce."""

    def __init__(self, cfg: TPConfig, world: int, group: dist.ProcessGroup, inplace: bool):
        super().__init__()
        self.local_heads = cfg.heads // world
        self.head_dim = cfg.hidden // cfg.heads
        local = self.local_heads * self.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * local, bias=False)
        self.o_proj = nn.Linear(local, cfg.hidden, bias=False)
        self.group, self.inplace = group, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.local_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        return all_reduce(self.o_proj(o), self.group, self.inplace)


class TPMLP(nn.Module):
    """Column-parallel gate/up, SiLU gating, row-parallel down + all-reduce."""

    def __init__(self, cfg: TPConfig, world: int, group: dist.ProcessGroup, inplace: bool):
        super().__init__()
        local = cfg.ffn // world
        self.gate_up = nn.Linear(cfg.hidden, 2 * local, bias=False)
        self.down = nn.Linear(local, cfg.hidden, bias=False)
        self.group, self.inplace = group, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return all_reduce(self.down(F.silu(gate) * up), self.group, self.inplace)


class TPBlock(nn.Module):
    def __init__(self, cfg: TPConfig, world: int, group: dist.ProcessGroup, inplace: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.hidden, cfg.eps), RMSNorm(cfg.hidden, cfg.eps)
        self.attn = TPAttention(cfg, world, group, inplace)
        self.mlp = TPMLP(cfg, world, group, inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TPLlama(nn.Module):
    """A stack of tensor-parallel decoder blocks on hidden states ``[batch, seq, hidden]``."""

    def __init__(self, cfg: TPConfig, world: int, group: dist.ProcessGroup, inplace: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(TPBlock(cfg, world, group, inplace) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _shard_rows(w: torch.Tensor, parts: int, rank: int, chunks: int = 1) -> torch.Tensor:
    """Rank ``rank``'s share of each of ``chunks`` stacked output blocks (q|k|v, gate|up)."""
    return torch.cat([c.chunk(parts, dim=0)[rank] for c in w.chunk(chunks, dim=0)], dim=0)


def build(rank: int, world: int, group: dist.ProcessGroup | None = None, cfg: TPConfig = TPConfig(),
          seed: int = 0, inplace: bool = False) -> TPLlama:
    """Rank ``rank``'s shard of a model whose full weights come from ``seed`` (identical on every rank)."""
    group = group if group is not None else dist.group.WORLD
    if cfg.heads % world or cfg.ffn % world:
        raise ValueError(f"heads={cfg.heads} and ffn={cfg.ffn} must be divisible by the world size {world}")
    gen = torch.Generator().manual_seed(seed)
    model = TPLlama(cfg, world, group, inplace)
    hd = cfg.hidden
    with torch.no_grad():
        for block in model.blocks:
            qkv = torch.randn(3 * hd, hd, generator=gen) / hd ** 0.5
            o = torch.randn(hd, hd, generator=gen) / hd ** 0.5
            gate_up = torch.randn(2 * cfg.ffn, hd, generator=gen) / hd ** 0.5
            down = torch.randn(hd, cfg.ffn, generator=gen) / cfg.ffn ** 0.5
            block.attn.qkv.weight.copy_(_shard_rows(qkv, world, rank, chunks=3))
            block.attn.o_proj.weight.copy_(o.chunk(world, dim=1)[rank])
            block.mlp.gate_up.weight.copy_(_shard_rows(gate_up, world, rank, chunks=2))
            block.mlp.down.weight.copy_(down.chunk(world, dim=1)[rank])
    return model.eval()


def make_input(batch: int, cfg: TPConfig = TPConfig(), seq: int = 5, seed: int = 1) -> torch.Tensor:
    """The same hidden states on every rank (tensor parallelism replicates activations)."""
    return torch.randn(batch, seq, cfg.hidden, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    import dynaflow

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="nanoflow")
    p.add_argument("--nano-batches", type=int, default=2)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--inplace", action="store_true", help="use in-place torch.distributed.all_reduce")
    args = p.parse_args()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    model = build(rank, world, inplace=args.inplace).to(device)
    x = make_input(args.batch).to(device)
    with torch.no_grad():
        ref = model(x)
        fast = dynaflow.compile(model, strategy=args.strategy, nano_batches=args.nano_batches)
        out = fast(x)
    diff = (out - ref).abs().max().item()
    if rank == 0:
        print(fast.explain())
        print(f"world {world}, strategy {args.strategy}, {fast.program.split}: max |dynaflow - eager| = {diff:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
