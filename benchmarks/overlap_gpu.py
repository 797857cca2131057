"""Measured overlap on a GPU: one model step run sequentially and under dynaflow strategies.

The step is a stack of Llama-8B-shaped decoder layers in bf16 (hidden 4096, 32 query / 8 KV heads of
128, MLP 14336) serving two kinds of work at once, as a continuous-batching server does:

* a batch of **decode** tokens, one per request, each attending over its own KV cache of ``--kv-len``
  positions (memory-bound: it streams the caches), and
* a **prefill chunk** of ``--prefill`` tokens with causal attention over itself (GEMM-heavy).

The decode batch is the batch dynaflow splits into nano-batches; the prefill chunk is batch-free, so
its segments run whole and can overlap with decode work on another lane. Every configuration is timed
with CUDA events around the whole step, median of ``--repeats`` (≥ 20) after warm-up, and reported as a
speedup over running the same model sequentially in eager PyTorch. The **ideal bound** comes from
per-segment GPU timings of a sequential run: total time over the time of the busiest resource
(compute vs memory), i.e. what perfect overlap of the two resources could reach.

    python benchmarks/overlap_gpu.py                          # full run on a GPU, writes results/
    python benchmarks/overlap_gpu.py --layers 2 --repeats 20  # quicker
    python benchmarks/overlap_gpu.py --dry-run                # tiny sizes on CPU: checks the plumbing only

Results go to ``benchmarks/results/overlap_gpu.json`` (GPU name, torch version, date, command) and a
timeline PNG of the best configuration (needs matplotlib). Nothing is written under ``--dry-run``
unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("overlap_gpu")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _results import setup  # noqa: E402
from floor_measure import median_ms  # noqa: E402


# -- the model ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    layers: int = 4
    decode: int = 256
    kv_len: int = 1024
    prefill: int = 1024

    @classmethod
    def tiny(cls) -> "Shape":
        return cls(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2, decode=6, kv_len=16,
                   prefill=10)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class MLP(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.gate_up = nn.Linear(s.hidden, 2 * s.intermediate, bias=False)
        self.down = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Layer(nn.Module):
    """One Llama-shaped decoder layer applied to decode tokens (with KV caches) and a prefill chunk."""

    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.norm1 = RMSNorm(s.hidden)
        self.qkv = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=False)
        self.o = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.norm2 = RMSNorm(s.hidden)
        self.mlp = MLP(s)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.s
        q, k, v = self.qkv(self.norm1(x)).split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                                  s.kv_heads * s.head_dim], dim=-1)
        return q, k, v

    def forward(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        # decode: one token per request against its own cache (B, kv_heads, L, D)
        q, _, _ = self._qkv(h)
        q = q.view(h.shape[0], s.heads, 1, s.head_dim)
        a = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
        h = h + self.o(a.reshape(h.shape[0], s.heads * s.head_dim))
        h = h + self.mlp(self.norm2(h))
        # prefill chunk: causal self-attention over C tokens
        c = p.shape[0]
        pq, pk, pv = self._qkv(p)
        pq = pq.view(1, c, s.heads, s.head_dim).transpose(1, 2)
        pk = pk.view(1, c, s.kv_heads, s.head_dim).transpose(1, 2)
        pv = pv.view(1, c, s.kv_heads, s.head_dim).transpose(1, 2)
        pa = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, enable_gqa=True)
        p = p + self.o(pa.transpose(1, 2).reshape(c, s.heads * s.head_dim))
        p = p + self.mlp(self.norm2(p))
        return h, p


class Step(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))

    def forward(self, h: torch.Tensor, caches: list[torch.Tensor], p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, layer in enumerate(self.layers):
            h, p = layer(h, caches[2 * i], caches[2 * i + 1], p)
        return h, p


def build(s: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, tuple[Any, ...]]:
    """The model and one step's inputs: decode hidden states, 2 KV caches per layer, the prefill chunk."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Step(s)
    for prm in model.parameters():
        prm.data.normal_(0, 0.02, generator=g) if prm.dim() > 1 else None
    model = model.to(device=device, dtype=dtype).eval()
    h = torch.randn(s.decode, s.hidden, generator=g).to(device, dtype)
    caches = [torch.randn(s.decode, s.kv_heads, s.kv_len, s.head_dim, generator=g).to(device, dtype)
              for _ in range(2 * s.layers)]
    # the prefill chunk must not share the decode batch size, or it would be taken for batch data
    assert s.prefill != s.decode, "--prefill must differ from --decode"
    p = torch.randn(s.prefill, s.hidden, generator=g).to(device, dtype)
    return model, (h, caches, p)


# -- measuring ----------------------------------------------------------------------------------------------
def ideal_bound(events: Sequence[Any]) -> dict[str, Any]:
    """From per-segment timings of a sequential run: time per resource, the busiest resource, and the ideal
    speedup (sum over resources / busiest resource). Segments without a resource count as compute."""
    per: dict[str, float] = {}
    for e in events:
        res = getattr(e, "resource", "") or "compute"
        per[res] = per.get(res, 0.0) + e.duration * 1e3
    total = sum(per.values())
    busiest = max(per.values()) if per else 0.0
    return {"per_resource_ms": per, "total_ms": total, "busiest_ms": busiest,
            "ideal_speedup": (total / busiest) if busiest else float("nan")}


def plot_timeline(timeline: Any, path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - optional dependency
        log.warning("matplotlib is not installed; no timeline PNG")
        return None
    lanes = list(timeline.lanes)
    colors = {"compute": "tab:blue", "memory": "tab:orange", "network": "tab:green"}
    fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * len(lanes)))
    t0 = min(e.start for e in timeline.events)
    for i, lane in enumerate(lanes):
        bars = [((e.start - t0) * 1e3, e.duration * 1e3) for e in timeline.of_lane(lane)]
        cols = [colors.get(e.resource, "tab:gray") for e in timeline.of_lane(lane)]
        ax.broken_barh(bars, (i - 0.4, 0.8), facecolors=cols, edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("ms")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the benchmark ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import dynaflow

    env = setup(args, "overlap_gpu.py")
    cuda, device, dtype, repeats = env.cuda, env.device, env.dtype, env.repeats
    s = Shape.tiny() if args.dry_run else Shape(layers=args.layers, decode=args.decode, kv_len=args.kv_len,
                                                  prefill=args.prefill)
    model, inputs = build(s, device, dtype)
    executor = "cuda" if cuda else "serial"

    results: list[dict[str, Any]] = []
    with torch.no_grad():
        ref = model(*inputs)
        base_ms = median_ms(lambda: model(*inputs), repeats=repeats, warmup=args.warmup, cuda=cuda)
        results.append({"name": "eager sequential", "median_ms": base_ms, "speedup": 1.0})

        # per-segment timings from a sequential dynaflow run (one lane, whole batch)
        torch._dynamo.reset()
        seq = dynaflow.compile(model, strategy="sequential", nano_batches=1, executor=executor,
                               config={"gpu_timeline": cuda})
        seq(*inputs)
        seq(*inputs)
        bound = ideal_bound(seq.last_timeline.events if seq.last_timeline else ())

        configs = [(st, n, g) for st in args.strategies for n in args.nano for g in ([False, True] if cuda else [False])]
        best: tuple[float, Any, str] | None = None
        for strategy, nano, graphs in configs:
            name = f"{strategy} nano={nano}" + (" cuda_graphs" if graphs else "")
            torch._dynamo.reset()
            opts: dict[str, Any] = {"cuda_graphs": graphs}
            if args.sm_counts and strategy == "nanoflow":
                opts["strategy_options"] = {"sm_counts": dict(args.sm_counts)}
            try:
                c = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor=executor, config=opts)
                out = c(*inputs)
                err = max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(out, ref))
                ms = median_ms(lambda: c(*inputs), repeats=repeats, warmup=args.warmup, cuda=cuda)
            except Exception as exc:  # record and go on: one failing configuration must not hide the others
                log.exception("%s failed", name)
                results.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            row = {"name": name, "strategy": strategy, "nano_batches": nano, "cuda_graphs": graphs, "median_ms": ms,
                   "speedup": base_ms / ms, "rel_err_vs_eager": err}
            if cuda:
                ex = c.graphs[0]._executors.get("cuda")
                if ex is not None and c.program is not None:
                    row["lanes"] = [repr(ls) for ls in ex.lane_streams(c.program)]
            results.append(row)
            log.info("%-40s %8.3f ms  %.3fx", name, ms, base_ms / ms)
            if best is None or ms < best[0]:
                best = (ms, (strategy, nano, opts), name)

        timeline_png = None
        if best is not None and (cuda or args.out):
            strategy, nano, opts = best[1]
            torch._dynamo.reset()
            c = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor=executor,
                                 config={**opts, "cuda_graphs": False, "gpu_timeline": cuda})
            c(*inputs)
            c(*inputs)
            if c.last_timeline is not None and c.last_timeline.events:
                out_dir = os.path.dirname(args.out) if args.out else os.path.join(HERE, "results")
                os.makedirs(out_dir, exist_ok=True)
                timeline_png = plot_timeline(c.last_timeline, os.path.join(out_dir, "overlap_gpu_timeline.png"),
                                             f"{best[2]} (eager streams, {c.last_timeline.overlap():.2f}x busy/makespan)")
                from dynaflow.timeline import to_perfetto

                to_perfetto(c.last_timeline, os.path.join(out_dir, "overlap_gpu_trace.json"))

    report = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (dry run on CPU)",
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "dry_run": bool(args.dry_run),
        "shape": asdict(s),
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "baseline": "eager PyTorch, same model and inputs, one stream",
        "ideal": bound,
        "results": results,
        "timeline_png": timeline_png,
    }
    return report


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--decode", type=int, default=256, help="decode tokens (requests) in the batch")
    ap.add_argument("--kv-len", type=int, default=1024, help="KV cache length of every decode request")
    ap.add_argument("--prefill", type=int, default=1024, help="tokens in the prefill chunk")
    ap.add_argument("--strategies", nargs="+", default=["nanoflow", "round_robin"])
    ap.add_argument("--nano", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sm-counts", type=lambda t: [tuple([kv.split("=")[0], int(kv.split("=")[1])]) for kv in t.split(",")],
                    default=None, help="SM partitions for nanoflow lanes, e.g. compute=104,memory=24")
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats per configuration (at least 20)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/overlap_gpu.json)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU; checks the plumbing, measures nothing")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    report = run(args)
    out = args.out or (None if args.dry_run else os.path.join(HERE, "results", "overlap_gpu.json"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None)
        log.info("wrote %s", out)
    else:
        log.info("%s", json.dumps(report["ideal"], indent=2))
    return report


if __name__ == "__main__":
    main()
