"""KV-offload decode: each layer's KV cache lives in pinned host memory and is brought in every step, so the
copy engines (PCIe) and the SMs can work at once. Issue 16's transfer-lane workload.

Rows, side by side in one run (CUDA-event medians), each checked against the eager output:

* ``copy-then-compute`` — eager: every layer fetches its KV on the compute stream, then computes;
* ``hand-written prefetch`` — double buffering: a copy stream fetches layer l+1's KV while layer l computes
  (events order the two), what an engineer writes by hand;
* ``dynaflow <strategy> nano=N`` — the same eager model compiled: the fetches are ``transfer`` segments
  (host <-> device copies found by the default rules) on their own lane.

The sizes default to a balanced step (fetch time close to compute time), where overlap can pay up to 2x;
the ideal bound printed is (fetch + compute) / max(fetch, compute) from the two parts timed alone.

    python benchmarks/kv_offload.py                 # on a GPU; writes benchmarks/results/kv_offload.json
    python benchmarks/kv_offload.py --dry-run       # tiny sizes on CPU: the plumbing only, nothing measured
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _results import common_args, provenance, run_main, setup  # noqa: E402
from floor_measure import median_ms  # noqa: E402

log = logging.getLogger("kv_offload")


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    layers: int = 4
    batch: int = 2048
    kv_len: int = 8
    """Offloaded KV positions per request and layer (8 at batch 2048: ~67 MB per layer, about one layer's GEMMs)."""

    @classmethod
    def tiny(cls) -> "Shape":
        return cls(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=64, layers=2, batch=6, kv_len=5)


class Layer(nn.Module):
    """A Llama-shaped decode layer whose KV cache arrives from the host: fetch, attend, MLP."""

    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.qkv = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=False)
        self.o = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.up = nn.Linear(s.hidden, 2 * s.intermediate, bias=False)
        self.down = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, h: torch.Tensor, k_host: torch.Tensor, v_host: torch.Tensor) -> torch.Tensor:
        s = self.s
        k = k_host.to(h.device, non_blocking=True)  # (B, L, Hkv, D): the transfer
        v = v_host.to(h.device, non_blocking=True)
        q = self.qkv(h)[:, : s.heads * s.head_dim].view(-1, s.heads, 1, s.head_dim)
        k = k.transpose(1, 2).repeat_interleave(s.heads // s.kv_heads, dim=1)
        v = v.transpose(1, 2).repeat_interleave(s.heads // s.kv_heads, dim=1)
        a = F.scaled_dot_product_attention(q, k, v).reshape(-1, s.heads * s.head_dim)
        h = h + self.o(a)
        g, u = self.up(h).chunk(2, dim=-1)
        return h + self.down(F.silu(g) * u)


class Step(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))

    def forward(self, h: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
        for layer, k, v in zip(self.layers, ks, vs):
            h = layer(h, k, v)
        return h


def build(s: Shape, device: str, dtype: torch.dtype) -> tuple[Step, tuple[Any, ...]]:
    torch.manual_seed(0)
    model = Step(s).to(device, dtype).eval()
    pin = device == "cuda"
    h = torch.randn(s.batch, s.hidden, device=device, dtype=dtype)
    host = [torch.randn(s.batch, s.kv_len, s.kv_heads, s.head_dim, dtype=dtype) for _ in range(2 * s.layers)]
    host = [t.pin_memory() if pin else t for t in host]
    return model, (h, host[: s.layers], host[s.layers:])


def prefetch_step(model: Step, h: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """The hand-written double-buffered version: layer l+1's KV is fetched on a copy stream during layer l."""
    compute, copy = torch.cuda.current_stream(), _copy_stream()
    fetched = []
    for k, v in zip(ks, vs):
        with torch.cuda.stream(copy):
            copy.wait_stream(compute)  # the previous step is done with the device buffers
            kd, vd = k.to("cuda", non_blocking=True), v.to("cuda", non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(copy)
        fetched.append((kd, vd, ev))
    for layer, (kd, vd, ev) in zip(model.layers, fetched):
        compute.wait_event(ev)
        kd.record_stream(compute)
        vd.record_stream(compute)
        h = layer(h, kd, vd)  # .to() of a device tensor is a no-op
    return h


_COPY: list[Any] = []


def _copy_stream() -> Any:
    if not _COPY:
        _COPY.append(torch.cuda.Stream())
    return _COPY[0]


def _parts_ms(model: Step, inputs: tuple[Any, ...], repeats: int, cuda: bool) -> dict[str, float]:
    """Fetch alone and compute alone (KV already on the device), for the ideal bound."""
    h, ks, vs = inputs
    dev = h.device
    fetch = median_ms(lambda: [t.to(dev, non_blocking=True) for t in ks + vs], repeats=repeats, warmup=3, cuda=cuda)
    kd, vd = [t.to(dev) for t in ks], [t.to(dev) for t in vs]
    compute = median_ms(lambda: model(h, kd, vd), repeats=repeats, warmup=3, cuda=cuda)
    return {"fetch_ms": fetch, "compute_ms": compute,
            "ideal_speedup": (fetch + compute) / max(fetch, compute, 1e-9)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dynaflow

    env = setup(args, "kv_offload.py")
    cuda, device, dtype, repeats = env.cuda, env.device, env.dtype, env.repeats
    s = Shape.tiny() if args.dry_run else Shape(layers=args.layers, batch=args.batch, kv_len=args.kv_len)
    model, inputs = build(s, device, dtype)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        ref = model(*inputs)
        base = median_ms(lambda: model(*inputs), repeats=repeats, warmup=3, cuda=cuda)
        rows.append({"name": "copy-then-compute (eager)", "median_ms": base, "speedup": 1.0})
        if cuda:
            ms = median_ms(lambda: prefetch_step(model, *inputs), repeats=repeats, warmup=3, cuda=cuda)
            err = _rel_err(prefetch_step(model, *inputs), ref)
            rows.append({"name": "hand-written prefetch", "median_ms": ms, "speedup": base / ms, "rel_err": err})
        parts = _parts_ms(model, inputs, repeats, cuda)
        for strategy, nano in [("sequential", 1)] + [(st, n) for st in args.strategies for n in args.nano]:
            rows.append(_dynaflow_row(dynaflow, model, inputs, ref, strategy, nano, base, repeats, cuda))
    report = {**provenance("kv_offload", dry_run=bool(args.dry_run)), "shape": asdict(s),
              "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "parts": parts, "rows": rows}
    _summary(report)
    return report


def _dynaflow_row(dynaflow: Any, model: Step, inputs: tuple[Any, ...], ref: torch.Tensor, strategy: str, nano: int,
                  base: float, repeats: int, cuda: bool) -> dict[str, Any]:
    name = f"dynaflow {strategy} nano={nano}"
    torch._dynamo.reset()
    try:
        c = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor="cuda" if cuda else "serial")
        err = _rel_err(c(*inputs), ref)
        ms = median_ms(lambda: c(*inputs), repeats=repeats, warmup=3, cuda=cuda)
        lanes = sorted({l.name for l in c.program.lanes}) if c.program is not None else []
    except Exception as exc:  # one failing row must not hide the others
        log.exception("%s failed", name)
        return {"name": name, "error": f"{type(exc).__name__}: {exc}"}
    return {"name": name, "median_ms": ms, "speedup": base / ms, "rel_err": err, "lanes": lanes}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _summary(report: dict[str, Any]) -> None:
    p = report["parts"]
    lines = [f"KV offload: fetch {p['fetch_ms']:.3f} ms, compute {p['compute_ms']:.3f} ms alone; "
             f"ideal {p['ideal_speedup']:.2f}x",
             f"{'row':<36} {'ms':>9} {'vs copy-then-compute':>21} {'rel err':>9}"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['name']:<36} error: {r['error'][:80]}")
        else:
            lines.append(f"{r['name']:<36} {r['median_ms']:9.3f} {r['speedup']:20.2f}x {r.get('rel_err', 0.0):9.1e}")
    print("\n".join(lines))  # noqa: T201 - the summary table is the script's output


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2048, help="decode requests (one token each)")
    ap.add_argument("--kv-len", type=int, default=8, help="offloaded KV positions per request and layer")
    ap.add_argument("--strategies", nargs="+", default=["nanoflow"])
    ap.add_argument("--nano", type=int, nargs="+", default=[2, 4])
    common_args(ap, "kv_offload")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_main("kv_offload", parse, run, argv)


if __name__ == "__main__":
    main()
