"""How well does the simulator predict the real executor? Profile a model on the serial executor, predict
each candidate strategy with ``executor="sim"``, measure its dynaflow programs on the thread (or cuda)
executor, report both side by side (medians of repeats, interleaved) and whether the orderings agree.

Models: ``pipeline`` — stages that sleep ``fixed + per_row·rows`` (a stand-in for kernels on separate
units, so overlap is real even on 2 cores); ``llama`` — the demo's transformers Llama on CPU, where the
lanes compete for the same cores and the CPU cost model is rough; ``llama8b`` — two Llama-3-8B-shaped
decoder layers (hidden 4096, 32 heads, 8 KV heads, FFN 14336) in bf16, for a GPU (issue 4's GPU item:
profile on the cuda executor, predict each strategy, measure it, report the error).

    python benchmarks/sim_accuracy.py --out benchmarks/results/sim_accuracy_cpu.json
    python benchmarks/sim_accuracy.py --device cuda --models llama8b --out benchmarks/results/sim_accuracy_h200.json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

import dynaflow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _results  # noqa: E402

log = logging.getLogger("bench.sim_accuracy")

_LIB = torch.library.Library("dynaflow_bench", "FRAGMENT")
_LIB.define("busy(Tensor x, float fixed_s, float per_row_s) -> Tensor")


@torch.library.impl(_LIB, "busy", "CompositeExplicitAutograd")
def _busy(x, fixed_s, per_row_s):
    time.sleep(fixed_s + per_row_s * x.shape[0])
    return x + 1


@torch.library.register_fake("dynaflow_bench::busy")
def _busy_fake(x, fixed_s, per_row_s):
    return torch.empty_like(x)


class Pipeline(nn.Module):
    def __init__(self, kinds, fixed, per_row):
        super().__init__()
        self.kinds, self.fixed, self.per_row = kinds, fixed, per_row

    def forward(self, x):
        for i, kind in enumerate(self.kinds):
            dynaflow.mark(f"s{i}", tags=(kind,))
            x = torch.ops.dynaflow_bench.busy(x, self.fixed, self.per_row)
        return x


CANDIDATES = [("sequential", 1), ("sequential", 4), ("nanoflow", 2), ("nanoflow", 3), ("nanoflow", 4),
              ("round_robin", 2), ("two_batch_overlap", 2)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _graph_step(compiled, call):
    """A callable that runs the compiled model's dynaflow programs on the flat inputs of one recorded call:
    exactly what the simulator predicts (no Dynamo guards, no Python between graphs), and safe to
    interleave with other candidates' compiles."""
    store: dict[int, tuple] = {}
    for g in compiled.graphs:
        g._record = store
    try:
        compiled(*call)
    finally:
        for g in compiled.graphs:
            g._record = None
    ran = [g for g in compiled.graphs if id(g) in store]
    return lambda: [g(*store[id(g)]) for g in ran]


def _run(model, call, label: str, repeats: int, device: str = "cpu") -> dict:
    executor = "cuda" if device == "cuda" else "thread"
    with tempfile.TemporaryDirectory() as tmp:
        prof = dynaflow.profile(model, *call, repeats=3, executor="cuda" if device == "cuda" else "serial")
        path = prof.save(os.path.join(tmp, "p.json"))
        rows = []
        predicted, steps = {}, {}
        for strategy, nano in CANDIDATES:
            torch._dynamo.reset()
            sim = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor="sim",
                                   config={"profile": path})
            sim(*call)
            predicted[(strategy, nano)] = sum(g.last_timeline.makespan for g in sim.graphs if g.last_timeline)
            torch._dynamo.reset()
            c = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor=executor)
            c(*call)
            c(*call)  # the cuda executor's first step per program only measures its buffers
            steps[(strategy, nano)] = _graph_step(c, call)
        times: dict[tuple, list[float]] = {k: [] for k in CANDIDATES}
        for _ in range(repeats):  # interleaved so machine noise hits every candidate alike
            for key, step in steps.items():
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times[key].append(time.perf_counter() - t0)
        for key in CANDIDATES:
            rows.append({"strategy": key[0], "nano_batches": key[1], "predicted_ms": predicted[key] * 1e3,
                         "measured_ms": statistics.median(times[key]) * 1e3})
    pred_order = [f"{r['strategy']}/{r['nano_batches']}" for r in sorted(rows, key=lambda r: r["predicted_ms"])]
    meas_order = [f"{r['strategy']}/{r['nano_batches']}" for r in sorted(rows, key=lambda r: r["measured_ms"])]
    base = next(r for r in rows if r["strategy"] == "sequential" and r["nano_batches"] == 1)
    for r in rows:
        r["predicted_speedup"] = base["predicted_ms"] / r["predicted_ms"]
        r["measured_speedup"] = base["measured_ms"] / r["measured_ms"]
        r["error_pct"] = 100 * (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
    return {"model": label, "executor": executor, "rows": rows, "predicted_order": pred_order, "measured_order": meas_order,
            "best_agrees": pred_order[0] == meas_order[0],
            "median_abs_error_pct": statistics.median(abs(r["error_pct"]) for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--models", default="pipeline,llama", help="comma list of pipeline, llama, llama8b")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dry-run", action="store_true", help="llama8b at a tiny size (checks the script on CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    torch.manual_seed(0)
    with torch.no_grad():
        if "pipeline" in args.models:
            model = Pipeline(["compute", "memory"] * 2, fixed=0.01, per_row=0.0025)
            results.append(_run(model, (torch.zeros(8, 4),), "pipeline (sleeping stages, 8 rows)", args.repeats))
        if "llama" in args.models:
            from dynaflow.models import llama_from_config

            model = llama_from_config(hidden=256, layers=2)
            ids = torch.randint(0, 1024, (8, 64))
            wrapper = lambda x: model(input_ids=x, use_cache=False).logits  # noqa: E731
            results.append(_run(wrapper, (ids,), "transformers Llama hidden 256, 2 layers, batch 8x64", args.repeats))
        if "llama8b" in args.models:
            from dynaflow.models import llama_from_config

            shape = dict(hidden=64, heads=4, kv_heads=2, intermediate=128) if args.dry_run else \
                dict(hidden=4096, heads=32, kv_heads=8, intermediate=14336)
            dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
            model8 = llama_from_config(layers=2, vocab=1024, **shape).to(device=args.device, dtype=dtype)
            ids8 = torch.randint(0, 1024, (8, 32 if args.dry_run else 512), device=args.device)
            wrapper8 = lambda x: model8(input_ids=x, use_cache=False).logits  # noqa: E731
            label = f"Llama-3-8B-shaped, 2 layers, {dtype}, batch {tuple(ids8.shape)}{' (dry run)' if args.dry_run else ''}"
            results.append(_run(wrapper8, (ids8,), label, args.repeats, args.device))
    for res in results:
        log.info("\n%s\n%-24s %12s %12s %8s %8s", res["model"], "candidate", "predicted ms", "measured ms", "pred x",
                 "meas x")
        for r in res["rows"]:
            log.info("%-24s %12.2f %12.2f %8.2f %8.2f", f"{r['strategy']}/{r['nano_batches']}", r["predicted_ms"],
                     r["measured_ms"], r["predicted_speedup"], r["measured_speedup"])
        log.info("best agrees: %s; median |error| %.0f%%", res["best_agrees"], res["median_abs_error_pct"])
    _results.write(_results.provenance("sim_accuracy", device=args.device, repeats=args.repeats, results=results),
                   args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
