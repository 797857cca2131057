"""What each overlap mechanism adds on dense decode (issue 16): a ladder from pipelining alone to SM-aware kernels.

Dense decode (``workloads.dense_decode``: 2048 one-token requests, KV 512, Llama-8B-shaped layers, bf16; 8 layers by
default) runs as one CUDA graph per step in every row, so launch overhead is out of the comparison. Two
baselines, each an eager step captured as a CUDA graph:

* **stock kernels** — SDPA attention, cuBLAS GEMMs: what a user runs today;
* **same kernels, sequential** — the split-KV Triton attention (``dynaflow::decode_attention``) on all SMs: a gain
  over this one is overlap, not a faster kernel.

Then dynaflow ``nanoflow`` (2 nano-batches, pipelined across layers, ``cuda_graphs=True``), one mechanism more per
row, for each memory partition of ``--memory-sms``:

1. **pipelining** — compute and memory lanes on plain streams, sharing every SM, stock kernels;
2. **+ partitions** — the two lanes on disjoint green-context partitions, stock kernels, grids not resized
   (``DYNAFLOW_SM_CARVEOUT=0``);
3. **+ SM-limited GEMM** — every launch on a partition under torch's SM carveout, so cuBLAS sizes its persistent
   GEMMs for the lane's SMs;
4. **+ SM-efficient attention** — the split-KV kernels, whose grid follows the lane's SMs.

Last, ``auto`` on the split-KV model: what it picks by itself (its floor rows included). The ideal bound comes from
a sequential run's per-segment GPU times (busiest resource over the total). Each row is checked against eager.

    python benchmarks/overlap_ladder.py                  # a GPU; writes benchmarks/results/overlap_ladder.json
    python benchmarks/overlap_ladder.py --dry-run        # tiny sizes on CPU: checks the plumbing only
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _results import common_args, provenance, run_main, setup  # noqa: E402
from floor_measure import capture_graph, median_ms, rel_err, tolerance  # noqa: E402
from overlap_gpu import ideal_bound  # noqa: E402
from workloads import Workload, dense_decode  # noqa: E402

log = logging.getLogger("overlap_ladder")

RUNGS = ("pipelining", "+ partitions", "+ SM-limited GEMM", "+ SM-efficient attention")


def rung_config(rung: int, compute_sms: int | None, memory_sms: int | None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(model kernels, nanoflow options, knobs) of ladder rung ``rung`` (0-based, see :data:`RUNGS`)."""
    kernels = "split_kv" if rung >= 3 else "sdpa"
    options: dict[str, Any] = {"nano_batches": 2}
    if rung >= 1 and compute_sms and memory_sms:
        options["sm_counts"] = {"compute": compute_sms, "memory": memory_sms}
    knobs = {"DYNAFLOW_SM_CARVEOUT": "0"} if rung == 1 else {}
    return kernels, options, knobs


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dynaflow
    from dynaflow import knobs

    env = setup(args, "overlap_ladder.py")
    cuda, device, dtype, repeats, warmup = env.cuda, env.device, env.dtype, env.repeats, env.warmup
    tol = tolerance(dtype)
    work = {k: dense_decode(args.layers, tiny=args.dry_run, device=device, dtype=dtype, attention=k)
            for k in ("sdpa", "split_kv")}
    time = lambda fn: median_ms(fn, repeats=repeats, warmup=warmup, cuda=cuda)  # noqa: E731
    executor = "cuda" if cuda else "serial"
    rows: list[dict[str, Any]] = []
    refs: dict[str, Any] = {}
    base: dict[str, float] = {}

    def row(name: str, kernels: str, fn: Callable[[], Any], **extra: Any) -> dict[str, Any]:
        try:
            err = rel_err(fn(), refs[kernels])
            ms = time(fn)
        except Exception as exc:  # one failing row must not hide the others
            log.exception("%s failed", name)
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            return rows[-1]
        r = {"name": name, "kernels": kernels, "median_ms": ms, "rel_err": err, "equal": err <= tol, **extra}
        r.update({f"vs_{k}": v / ms for k, v in base.items()})
        rows.append(r)
        return r

    with torch.no_grad():
        for kernels, w in work.items():
            refs[kernels] = w.step()
            if cuda:
                graph, _ = capture_graph(w.step)
                fn = graph.replay
            else:
                fn = w.step
            label = "stock kernels" if kernels == "sdpa" else "same kernels, sequential"
            base[label.split(",")[0].replace(" ", "_")] = time(fn)
            row(f"eager CUDA graph ({label})" if cuda else f"eager ({label})", kernels, fn)
        total = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 0
        splits = [(total - m, m) for m in args.memory_sms] if cuda else [(None, None)]
        bound = _ideal(dynaflow, work["split_kv"], executor) if cuda else None
        for compute_sms, memory_sms in splits:
            for rung, what in enumerate(RUNGS):
                if not cuda and rung in (1, 2):
                    continue  # partitions need a GPU
                kernels, options, env = rung_config(rung, compute_sms, memory_sms)
                sms = f" (compute {compute_sms} / memory {memory_sms} SMs)" if rung and memory_sms else ""
                name = f"nanoflow {what}{sms}"
                if rung == 0 and compute_sms != splits[0][0]:
                    continue  # the shared-SM rung does not depend on the split
                with knobs.scope(**env):
                    c = _compile(dynaflow, work[kernels], "nanoflow", options, executor, cuda)
                    r = row(name, kernels, lambda c=c, w=work[kernels]: w.step(c))
                if "error" not in r and c.program is not None:
                    r["lanes"] = [repr(lane) for lane in c.program.lanes]
        c = _compile(dynaflow, work["split_kv"], dynaflow.strategies.get("auto", cache=False), {}, executor, False)
        for _ in range(64):  # auto's floor check decides (dynaflow.floor_check) before the row is timed
            work["split_kv"].step(c)
            if not c.floor_check.active:
                break
        r = row("auto (split-KV model)", "split_kv", lambda: work["split_kv"].step(c))
        tuned = [t for g in c.graphs for t in g.tuned.values()]
        if tuned and "error" not in r:
            r["auto"] = {"winner": repr(tuned[0].winner.candidate), "reason": tuned[0].reason, "table": tuned[0].table()}
    report = {**provenance("overlap_ladder", dry_run=bool(args.dry_run)), "workload": work["sdpa"].description,
              "shape": work["sdpa"].meta, "repeats": repeats, "ideal": bound, "baselines_ms": base, "rows": rows}
    _summary(report)
    return report


def _compile(dynaflow: Any, w: Workload, strategy: Any, options: dict[str, Any], executor: str, graphs: bool) -> Any:
    torch._dynamo.reset()
    return dynaflow.compile(w.model, strategy=strategy, executor=executor,
                            config={"strategy_options": options, "cuda_graphs": graphs, "static_inputs": ["ks", "vs"]})


def _ideal(dynaflow: Any, w: Workload, executor: str) -> dict[str, Any] | None:
    """The ideal bound from a sequential run's per-launch GPU times (busiest resource over the total)."""
    try:
        torch._dynamo.reset()
        c = dynaflow.compile(w.model, strategy="sequential", executor=executor, config={"gpu_timeline": True})
        for _ in range(3):
            w.step(c)
        return ideal_bound(c.last_timeline.events if c.last_timeline else ())
    except Exception:  # noqa: BLE001 - the bound is context, not a row
        log.exception("ideal bound failed")
        return None


def _summary(report: dict[str, Any]) -> None:
    ideal = report.get("ideal") or {}
    lines = [report["workload"], f"ideal overlap bound: {ideal.get('ideal_speedup', float('nan')):.2f}x",
             f"{'row':<78} {'ms':>9} {'vs stock':>8} {'vs same':>8} {'rel err':>8}"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['name']:<78} error: {r['error'][:80]}")
            continue
        lines.append(f"{r['name']:<78} {r['median_ms']:9.3f} {r.get('vs_stock_kernels', 1):7.2f}x "
                     f"{r.get('vs_same_kernels', 1):7.2f}x {r['rel_err']:8.1e}")
        if "auto" in r:
            lines.append(f"    auto picked {r['auto']['winner']}: {r['auto']['reason']}")
    print("\n".join(lines))  # noqa: T201 - the summary table is the script's output


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--memory-sms", type=int, nargs="+", default=[48, 64],
                    help="SMs of the memory lane's partition (the compute lane gets the rest)")
    common_args(ap, "overlap_ladder")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_main("overlap_ladder", parse, run, argv)


if __name__ == "__main__":
    main()
