"""Expert-parallel MoE under dynaflow: router, all_to_all dispatch, experts, all_to_all combine.

Each rank holds ``experts / world`` experts and its own tokens. Top-1 routing; the dispatch buffer is laid out
``[world, tokens, hidden + local experts]`` — block ``w`` holds (masked) the tokens routed to rank ``w`` and a
one-hot of the expert they chose there — so ``all_to_all_single`` exchanges blocks of dim 0 while the tokens
(the batch) stay in dim 1. That layout is what makes dispatch *row-separable*: nano-batch ``i`` of every rank
exchanges exactly its own rows, so dynaflow can split it. (A ``[world · tokens, ...]`` layout exchanges rows of
the batch dim itself; dynaflow's batch analysis then makes the all_to_all a whole-batch barrier.)

Run on CPU (gloo) or GPUs (nccl)::

    python -m torch.distributed.run --nproc-per-node 2 examples/expert_parallel_moe.py
    python -m torch.distributed.run --nproc-per-node 4 examples/expert_parallel_moe.py --strategy round_robin
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
class MoEConfig:
    hidden: int = 16
    ffn: int = 32
    experts: int = 4
    layers: int = 2


class Expert(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.w2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class EPMoE(nn.Module):
    """Top-1 MoE whose experts are spread over the ranks of ``group``."""

    def __init__(self, cfg: MoEConfig, world: int, group: dist.ProcessGroup):
        super().__init__()
        self.world, self.group, self.hidden = world, group, cfg.hidden
        self.local = cfg.experts // world
        self.router = nn.Linear(cfg.hidden, cfg.experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(self.local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        t = x.reshape(b * s, h)
        gate, choice = F.softmax(self.router(t), dim=-1).max(dim=-1)            # [T], [T]
        dest = torch.div(choice, self.local, rounding_mode="floor")            # owner rank per token
        ranks = torch.arange(self.world, device=x.device)
        to = (dest.unsqueeze(0) == ranks.unsqueeze(1)).unsqueeze(-1).to(x.dtype)  # [W, T, 1]
        which = F.one_hot(choice % self.local, self.local).to(x.dtype)         # [T, local]
        send = torch.cat([t.unsqueeze(0) * to, which.unsqueeze(0) * to], dim=-1)  # [W, T, h + local]
        recv = fc.all_to_all_single(send.contiguous(), None, None, self.group)  # block w: rank w's tokens for me
        rx, sel = recv[..., :h], recv[..., h:]
        out = torch.zeros_like(rx)
        for e, expert in enumerate(self.experts):
            out = out + expert(rx) * sel[..., e:e + 1]
        back = fc.all_to_all_single(out.contiguous(), None, None, self.group)   # block w: rank w's results for me
        y = back.sum(dim=0) * gate.unsqueeze(-1)
        return y.reshape(b, s, h)


class EPModel(nn.Module):
    """Layers of ``x + moe(norm(x))`` on hidden states ``[batch, seq, hidden]``."""

    def __init__(self, cfg: MoEConfig, world: int, group: dist.ProcessGroup):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden) for _ in range(cfg.layers))
        self.moes = nn.ModuleList(EPMoE(cfg, world, group) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return x


def build(rank: int, world: int, group: dist.ProcessGroup | None = None, cfg: MoEConfig = MoEConfig(),
          seed: int = 0) -> EPModel:
    """Rank ``rank``'s experts (``rank·local … rank·local + local - 1``) of a model defined by ``seed``."""
    group = group if group is not None else dist.group.WORLD
    if cfg.experts % world:
        raise ValueError(f"experts={cfg.experts} must be divisible by the world size {world}")
    full = EPModel(cfg, 1, group)  # every expert, same seed on every rank
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    model = EPModel(cfg, world, group)
    local = cfg.experts // world
    with torch.no_grad():
        for mine, ref in zip(model.moes, full.moes):
            mine.router.weight.copy_(ref.router.weight)
            for e in range(local):
                mine.experts[e].load_state_dict(ref.experts[rank * local + e].state_dict())
        for mine, ref in zip(model.norms, full.norms):
            mine.load_state_dict(ref.state_dict())
    return model.eval()


def make_input(batch: int, rank: int, cfg: MoEConfig = MoEConfig(), seq: int = 3, seed: int = 1) -> torch.Tensor:
    """Each rank its own tokens (expert parallelism shards the batch)."""
    return torch.randn(batch, seq, cfg.hidden, generator=torch.Generator().manual_seed(seed + 1000 * rank))


def main() -> None:
    import dynaflow

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="nanoflow")
    p.add_argument("--nano-batches", type=int, default=2)
    p.add_argument("--batch", type=int, default=6)
    args = p.parse_args()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    model = build(rank, world).to(device)
    x = make_input(args.batch, rank).to(device)
    with torch.no_grad():
        ref = model(x)
        fast = dynaflow.compile(model, strategy=args.strategy, nano_batches=args.nano_batches)
        out = fast(x)
    diff = torch.tensor((out - ref).abs().max().item(), device=device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(fast.explain())
        print(f"world {world}, strategy {args.strategy}, {fast.program.split}: max |dynaflow - eager| over ranks = "
              f"{diff.item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
