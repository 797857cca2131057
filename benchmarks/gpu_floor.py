"""The GPU-floor benchmark (issue 13): dynaflow next to hand-written baselines, per workload, in one run.

Every performance claim of the project is measured with this script. Per workload (``workloads.py``):
the baselines of ``baselines.py`` (eager, eager whole step as one CUDA graph, ``torch.compile(mode=
"reduce-overhead")``, two streams, the hand-written NanoFlow pipeline), then dynaflow ``auto`` and every
registered strategy × {eager streams, ``cuda_graphs=True``} × {plain, disjoint SM partitions}
(``floor_dynaflow.py``). Every row is timed the same way (``floor_measure.py``: CUDA-event medians of ≥ 20
after warm-up), checked against eager (relative error, bf16 tolerance 3e-2), and one failing row is
recorded with its error without stopping the run. The summary table and the must-show checks of the issue
(``floor_report.py``) are printed last.

    python benchmarks/gpu_floor.py --quick                 # one H100: ≤ 8 minutes (budget 420 s)
    python benchmarks/gpu_floor.py                         # every row of every workload (≈ 20 minutes)
    python benchmarks/gpu_floor.py --workloads a --quick   # dense decode only
    python benchmarks/gpu_floor.py --dry-run --out /tmp/floor.json   # tiny sizes on CPU: the plumbing

Time limits: on a GPU each workload runs in its own subprocess, killed when its share of ``--budget-s``
is spent (the rows it finished are kept; a CUDA error in one workload cannot poison the next); a row
that runs past ``--row-limit-s`` is interrupted and recorded as an error; a row not started for want of
time is recorded as skipped. ``--quick`` keeps the rows the checks need and the most telling others:
strategies ``auto``, ``sequential``, ``nanoflow``; ``reduce-overhead`` and dynaflow ``sequential`` with
Inductor segments in CUDA graphs on a-2L and c-b1 (check 3 compares them), SM partitions on a-2L only.

Output: one JSON (``--out``, default ``benchmarks/results/gpu_floor.json``) with GPU name, torch version,
date and command (``_results.provenance``), every row, the checks, and a timeline PNG of each workload's
best dynaflow row (re-run on eager streams with ``gpu_timeline=True``) beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

import floor_dynaflow  # noqa: E402
import floor_report  # noqa: E402
from _results import provenance, write  # noqa: E402
from baselines import BASELINES, Env, Runner, Skip  # noqa: E402
from floor_measure import median_ms, rel_err, time_limit, tolerance  # noqa: E402
from workloads import Workload, instances  # noqa: E402

log = logging.getLogger("gpu_floor")

DEFAULT_OUT = os.path.join(HERE, "results", "gpu_floor.json")
QUICK_STRATEGIES = ("auto", "sequential", "nanoflow")
QUICK_REDUCE_OVERHEAD = ("a-2L", "c-b1")
QUICK_SM = ("a-2L",)
"""Under --quick, only these instances get the reduce-overhead row (check 3 needs it on c-b1) and the
SM-partition rows (dense decode is where partitions can pay: GEMMs and attention take equal time)."""
NO_LIMIT = 1e9
WEIGHTS = {"a-2L": 1.3, "a-8L": 1.0, "b": 0.8, "c-b1": 1.2, "c-b4": 0.8, "c-b16": 0.8}
"""Share of the time budget per workload instance (others: 1.0)."""
FAMILY_BASELINES = {
    "dense_decode": ("eager", "eager graph", "reduce-overhead", "two-stream", "two-stream graph", "pipe",
                     "pipe graph", "pipe SM", "pipe SM graph"),
    "mix": ("eager", "eager graph", "reduce-overhead", "two-stream", "two-stream graph", "decode|prefill streams",
            "decode|prefill streams graph"),
    "hf_decode": ("eager", "eager graph", "reduce-overhead", "two-stream", "two-stream graph"),
}


# -- the rows of one workload -----------------------------------------------------------------------------
@dataclass
class Planned:
    order: int
    """Position in the summary: baselines first (in BASELINES order), then the dynaflow matrix."""
    name: str
    kind: str
    make: Callable[[], Runner]
    dyn: floor_dynaflow.DynaflowRow | None = None


def plan(w: Workload, env: Env, args: argparse.Namespace) -> list[Planned]:
    """The rows of ``w`` in the order they run: the rows the checks need first, so that a time limit cuts
    the least telling ones."""
    ro = not args.quick or w.name in QUICK_REDUCE_OVERHEAD
    sm = not args.quick or w.name in QUICK_SM
    rows: list[Planned] = []
    for name in FAMILY_BASELINES[w.family]:
        if (name == "reduce-overhead" and not ro) or (name.startswith("pipe SM") and not sm):
            continue
        shown = name.replace("pipe SM", f"pipe SM {env.sm_split[0]}+{env.sm_split[1]}") if env.sm_split else name
        rows.append(Planned(len(rows), shown, "baseline", lambda fn=BASELINES[name]: fn(w, env)))
    strategies = args.strategies or (list(QUICK_STRATEGIES) if args.quick else None)
    for row in floor_dynaflow.matrix(strategies, env):
        if (row.sm and not sm) or (row.inductor and not ro):  # Inductor rows go where reduce-overhead does
            continue
        if row.nano and row.nano > max(w.batch, 1):  # batch 1: one nano-batch (named as it runs)
            row = floor_dynaflow.DynaflowRow(row.strategy, max(w.batch, 1), row.graphs, row.sm)
        rows.append(Planned(len(rows), row.name, "dynaflow",
                            lambda row=row: floor_dynaflow.build(w, row, args.executor), row))

    def priority(p: Planned) -> int:
        if p.name in ("eager", "eager graph"):
            return 0 if p.name == "eager" else 1
        if p.name == "reduce-overhead":
            return 4 if w.family == "hf_decode" else 7
        if p.dyn is not None and p.dyn.inductor:  # beside reduce-overhead: check 3 compares the two
            return 4 if w.family == "hf_decode" else 7
        if p.dyn is not None:
            return {"auto": 2, "sequential": 3, "nanoflow": 5}.get(p.dyn.strategy, 8)
        return 6

    return sorted(rows, key=priority)


def _release(cuda: bool) -> None:
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _reset_of(w: Workload, runner: Runner) -> Callable[[], None] | None:
    """What runs before each call of ``runner``, untimed: the workload's reset, then the runner's own."""
    parts = [r for r in (w.reset, runner.reset) if r is not None]
    if not parts:
        return None

    def reset() -> None:
        for r in parts:
            r()

    return reset


def measure(w: Workload, name: str, kind: str, make: Callable[[], Runner], ref: Any, args: argparse.Namespace,
            cuda: bool, limit: float | None) -> dict[str, Any]:
    """Build, check against eager, time: one row's record (with ``error`` or ``skipped`` instead where so)."""
    rec: dict[str, Any] = {"type": "row", "workload": w.name, "row": name, "kind": kind}
    t0 = time.perf_counter()
    runner = None
    try:
        with time_limit(limit, f"row {name!r}"):
            runner = make()
            reset = _reset_of(w, runner)
            if reset is not None:
                reset()
            out = runner.call()
            err = rel_err(out, ref)
            tol = tolerance(w.meta["dtype"])
            rec.update(rel_err=err, tol=tol, equal=err <= tol)
            if kind == "dynaflow":
                floor_dynaflow.settle(runner, reset)  # auto's floor check decides before anything is timed
                rec["info"] = {**runner.info, **floor_dynaflow.describe(runner)}
            elif runner.info:
                rec["info"] = dict(runner.info)
            rec["ms"] = median_ms(runner.call, repeats=args.repeats, warmup=args.warmup, cuda=cuda, reset=reset)
    except Skip as exc:
        rec["skipped"] = str(exc)
    except Exception as exc:  # one failing row is recorded and the run goes on
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rec["traceback"] = traceback.format_exc()[-3000:]
        frames = traceback.extract_tb(exc.__traceback__)
        rec["raised_in"] = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None
        log.warning("%s / %s failed: %s", w.name, name, rec["error"].splitlines()[0][:300])
    finally:
        try:
            if runner is not None:
                runner.close()
            floor_dynaflow.unhook(w)  # also when the row was interrupted between enable() and its return
        except Exception as exc:  # pragma: no cover - cleanup must not hide the row
            log.warning("closing %s: %s", name, exc)
        del runner
        try:
            _release(cuda)
        except Exception as exc:  # a broken CUDA context shows up here
            rec.setdefault("error", f"after the row: {type(exc).__name__}: {exc}"[:2000])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if rec.get("ms") is not None:
        log.info("%-8s %-44s %9.3f ms  err %.1e%s", w.name, name, rec["ms"], rec["rel_err"],
                 "" if rec["equal"] else "  NOT EQUAL")
    return rec


def timeline(w: Workload, rows: list[dict[str, Any]], planned: dict[str, Planned], args: argparse.Namespace,
             out_dir: str) -> dict[str, Any] | None:
    """Re-run the fastest dynaflow row that runs a plan (not ``eager``, the graph as is, nor ``auto``, which may
    pick it) on eager streams with ``gpu_timeline=True`` and plot its timeline."""
    import overlap_gpu

    done = [r for r in rows if r["kind"] == "dynaflow" and r.get("ms") is not None  # rows that run a plan
            and planned[r["row"]].dyn is not None and planned[r["row"]].dyn.strategy not in ("eager", "auto")]
    if not done:
        return None
    best = min(done, key=lambda r: r["ms"])
    dyn = planned[best["row"]].dyn
    assert dyn is not None
    row = floor_dynaflow.DynaflowRow(dyn.strategy, dyn.nano, False, dyn.sm)
    rec: dict[str, Any] = {"type": "timeline", "workload": w.name, "row": best["row"], "plotted": row.name}
    runner = None
    try:
        runner = floor_dynaflow.build(w, row, args.executor, timeline=True)
        for _ in range(2):
            reset = _reset_of(w, runner)
            if reset is not None:
                reset()
            runner.call()
        tl = runner.keep[-1].last_timeline
        if tl is None or not tl.events:
            rec["error"] = "no timeline recorded"
        else:
            path = os.path.join(out_dir, f"gpu_floor_{w.name}_timeline.png")
            rec["overlap"] = tl.overlap()
            rec["png"] = overlap_gpu.plot_timeline(tl, path, f"{w.name}: {row.name} ({tl.overlap():.2f}x busy/makespan)")
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    finally:
        if runner is not None:
            runner.close()
        del runner
        _release(not args.dry_run)
    return rec


def pairs(w: Workload, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (dynaflow row, baseline) pairs a check compares, among the rows that ran and equal eager: every
    ``auto`` row against eager, and on dense decode ``sequential`` + graphs against the eager graph. Not on the
    transformers workload, whose dynaflow rows hook the model's forward (a baseline beside it would run the hook)."""
    if w.family == "hf_decode":
        return []
    ok = {r["row"] for r in rows if r.get("ms") is not None and r.get("equal")}
    out = [(r, "eager") for r in sorted(ok) if r.startswith("dynaflow auto") and "eager" in ok]
    if w.family == "dense_decode" and floor_report.SEQ_GRAPHS in ok and "eager graph" in ok:
        out.append((floor_report.SEQ_GRAPHS, "eager graph"))
    return out


def paired(w: Workload, rows: tuple[Planned, Planned], args: argparse.Namespace, cuda: bool,
           limit: float | None) -> dict[str, Any]:
    """Time two rows again, alternating blocks of calls (A B B A ...), so that clock and thermal drift between
    the rows' own slots in the run cannot decide a ratio a check reads: ``ratio`` is the baseline's median over
    the dynaflow row's (> 1: dynaflow is faster)."""
    dyn, base = rows
    rec: dict[str, Any] = {"type": "paired", "workload": w.name, "row": dyn.name, "baseline": base.name}
    runners: list[Runner] = []
    t0 = time.perf_counter()
    try:
        with time_limit(limit, f"paired {dyn.name!r} / {base.name!r}"):
            resets = []
            for p in rows:
                runner = p.make()
                runners.append(runner)
                reset = _reset_of(w, runner)
                resets.append(reset)
                if reset is not None:
                    reset()
                runner.call()
                if p.kind == "dynaflow":
                    floor_dynaflow.settle(runner, reset)
            times: list[list[float]] = [[], []]
            block = max(5, args.repeats // 3)
            for k in range(args.pair_rounds):
                for i in ((0, 1) if k % 2 == 0 else (1, 0)):
                    times[i].append(median_ms(runners[i].call, repeats=block, warmup=2, cuda=cuda, reset=resets[i]))
            dyn_ms, base_ms = statistics.median(times[0]), statistics.median(times[1])
            rec.update(ms=dyn_ms, baseline_ms=base_ms, ratio=base_ms / dyn_ms, rounds=args.pair_rounds, block=block,
                       blocks_ms=[[round(t, 4) for t in ts] for ts in times])
    except Exception as exc:  # recorded; the checks then read the rows' own times
        rec["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    finally:
        for runner in runners:
            with contextlib.suppress(Exception):
                runner.close()
        floor_dynaflow.unhook(w)
        runners.clear()
        _release(cuda)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if rec.get("ratio") is not None:
        log.info("%-8s paired %s / %s: %.3f ms vs %.3f ms = %.3fx", w.name, dyn.name, base.name, rec["ms"],
                 rec["baseline_ms"], rec["ratio"])
    return rec


def _env(args: argparse.Namespace) -> Env:
    cuda = not args.dry_run
    if not cuda:
        return Env(cuda=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if args.sm_split:
        c, m = (int(v) for v in args.sm_split.split(","))
    else:  # ~60% for the GEMM lane, in the multiples of 8 Hopper grants (H100, 132 SMs: 80 + 52)
        c = max(8, round(0.6 * sms / 8) * 8)
        m = sms - c
    return Env(cuda=True, num_sms=sms, sm_split=(c, m))


def run_workload(name: str, builder: Callable[..., Workload], args: argparse.Namespace, deadline: float,
                 emit: Callable[[dict[str, Any]], None], out_dir: str) -> None:
    """Every row of one workload, each record passed to ``emit`` as soon as it exists."""
    cuda = not args.dry_run
    env = _env(args)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        w = builder(device=device, dtype=dtype)
        emit({"type": "workload", "name": w.name, "family": w.family, "batch": w.batch, "description": w.description,
              "meta": w.meta, "build_s": round(time.perf_counter() - t0, 2),
              "sm_split": list(env.sm_split) if env.sm_split else None})
        log.info("%s: %s", w.name, w.description)
        for _ in range(max(args.warmup, 2)):  # first calls pay one-time costs (kernel selection, allocator)
            w.step()
        ref = tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, w.step())
        rows: list[dict[str, Any]] = []
        planned = plan(w, env, args)
        broken = None
        for p in planned:
            left = deadline - time.perf_counter()
            if broken or left < args.min_row_s:
                why = broken or f"workload time limit reached ({left:.0f} s left, a row needs {args.min_row_s:.0f} s)"
                rec = {"type": "row", "workload": w.name, "row": p.name, "kind": p.kind, "skipped": why}
            else:
                row_limit = args.row_limit_s * (2 if p.name == "reduce-overhead" else 1)  # Inductor compiles
                limit = min(row_limit, left) if row_limit else left
                rec = measure(w, p.name, p.kind, p.make, ref, args, cuda, limit)
                if "CUDA error" in rec.get("error", "") or "cudaError" in rec.get("error", ""):
                    broken = f"not run: the CUDA context broke in row {p.name!r}"
            rec["order"] = p.order
            rows.append(rec)
            emit(rec)
        by_name = {p.name: p for p in planned}
        for dyn, base in ([] if broken else pairs(w, rows)):
            left = deadline - time.perf_counter()
            if left < args.min_row_s:
                break
            emit(paired(w, (by_name[dyn], by_name[base]), args, cuda, min(args.row_limit_s or left, left)))
        if not broken and deadline - time.perf_counter() > args.min_row_s:
            tl = timeline(w, rows, {p.name: p for p in planned}, args, out_dir)
            if tl is not None:
                emit(tl)


# -- running workloads: in this process or one subprocess each --------------------------------------------
def _worker_argv(args: argparse.Namespace, name: str, out: str, deadline_s: float) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-out", out,
            "--deadline-s", f"{deadline_s:.1f}", "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--executor", args.executor, "--row-limit-s", str(args.row_limit_s), "--min-row-s", str(args.min_row_s),
            "--pair-rounds", str(args.pair_rounds),
            "--out", args.out_path]
    for flag, on in (("--dry-run", args.dry_run), ("--quick", args.quick)):
        if on:
            argv.append(flag)
    if args.strategies:
        argv += ["--strategies", ",".join(args.strategies)]
    if args.sm_split:
        argv += ["--sm-split", args.sm_split]
    return argv


def run_isolated(name: str, args: argparse.Namespace, allowance: float, tmp: str) -> tuple[list[dict[str, Any]], str | None]:
    """One workload in a subprocess, killed after ``allowance`` seconds; returns its records (also those of a
    killed run) and what went wrong, if anything."""
    out = os.path.join(tmp, f"{name}.jsonl")
    limited = allowance < NO_LIMIT
    reserve = min(20.0, allowance * 0.1) if limited else 0.0  # time to write the last row and exit
    argv = _worker_argv(args, name, out, max(allowance - reserve, 1.0))
    problem = None
    # its own process group: a worker past its limit is killed with the compile workers Inductor started
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(HERE), start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=allowance if limited else None)
        if proc.returncode != 0:
            problem = f"worker exited {proc.returncode}: {text[-1500:]}"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        problem = f"killed after its time limit of {allowance:.0f} s"
    sys.stderr.write((text or "")[-20000:])
    records = []
    if os.path.exists(out):
        with open(out) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return records, problem


def assemble(records: list[dict[str, Any]], name: str, problem: str | None, seconds: float) -> dict[str, Any]:
    """One workload's entry of the report from its records: the rows in display order (baselines, then
    dynaflow), its timeline, and what stopped it."""
    head = next((r for r in records if r["type"] == "workload"), {"name": name, "family": None})
    rows = sorted((r for r in records if r["type"] == "row"), key=lambda r: r["order"])
    entry = {k: v for k, v in head.items() if k != "type"}
    entry.update(rows=rows, seconds=round(seconds, 1), status=problem or "complete")
    entry["paired"] = [{k: v for k, v in r.items() if k != "type"} for r in records if r["type"] == "paired"]
    tl = next((r for r in records if r["type"] == "timeline"), None)
    entry["timeline"] = {k: v for k, v in tl.items() if k != "type"} if tl else None
    for r in rows:
        r.pop("type", None)
        r.pop("order", None)
    return entry


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torch._dynamo", "torch._inductor", "dynaflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_floor.py needs a CUDA GPU (use --dry-run on CPU to check the plumbing).")
    threads = torch.get_num_threads()
    if args.dry_run:  # tiny ops: one intra-op thread, so that a busy shared CPU cannot stall OpenMP barriers
        torch.set_num_threads(1)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any] | None:
    os.environ.setdefault("DYNAFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="gpu_floor_cache_"))  # auto measures afresh
    out_dir = os.path.dirname(os.path.abspath(args.out_path))
    os.makedirs(out_dir, exist_ok=True)
    todo = dict(instances(args.workloads, tiny=args.dry_run))

    if args.worker:  # one workload, records appended to a file as they come (a killed worker keeps its rows)
        with open(args.worker_out, "a") as f:
            def emit(rec: dict[str, Any]) -> None:
                f.write(json.dumps(rec, default=str) + "\n")
                f.flush()

            run_workload(args.worker, todo[args.worker], args, time.perf_counter() + args.deadline_s, emit, out_dir)
        return None

    start = time.perf_counter()
    isolate = args.isolate if args.isolate is not None else not args.dry_run
    weights = {n: WEIGHTS.get(n, 1.0) for n in todo}
    entries = []
    with tempfile.TemporaryDirectory(prefix="gpu_floor_") as tmp:
        for name, builder in todo.items():
            left = args.budget_s - (time.perf_counter() - start) if args.budget_s else None
            pending = sum(weights[n] for n in todo if n not in {e["name"] for e in entries})
            allowance = left * weights[name] / pending if left is not None else NO_LIMIT
            t0 = time.perf_counter()
            log.info("== %s (time limit %s)", name, f"{allowance:.0f} s" if left is not None else "none")
            if left is not None and allowance < args.min_row_s * 2:
                records, problem = [], f"not run: {left:.0f} s of the budget left"
            elif isolate:
                records, problem = run_isolated(name, args, allowance, tmp)
            else:
                records, problem = [], None
                try:
                    run_workload(name, builder, args, time.perf_counter() + allowance, records.append, out_dir)
                except Exception as exc:  # a workload that cannot even be built
                    problem = f"{type(exc).__name__}: {exc}"
                    log.exception("workload %s", name)
            entries.append(assemble(records, name, problem, time.perf_counter() - t0))
            if not isolate:
                _release(not args.dry_run)
    for e in entries:
        floor_report.annotate(e)
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), os.path.dirname(HERE)),
                          *(sys.argv[1:] if argv is None else argv)])
    report = provenance("gpu_floor", command=command, dry_run=args.dry_run, quick=args.quick, cuda_runtime=torch.version.cuda,
                        transformers=hf_version, commit=_commit(),
                        settings={"repeats": args.repeats, "warmup": args.warmup, "executor": args.executor,
                                  "budget_s": args.budget_s, "row_limit_s": args.row_limit_s,
                                  "timing": "CUDA-event median" if not args.dry_run else "perf_counter median (CPU)",
                                  "tolerance": "relative error vs eager, max over outputs; bf16 3e-2, fp32 1e-4"},
                        skipped_on_cpu=None if not args.dry_run else
                        "CUDA rows (CUDA graphs, reduce-overhead, SM partitions, cuda executor) need a GPU; the dry "
                        "run times tiny float32 models on the CPU with the serial executor",
                        seconds=round(time.perf_counter() - start, 1), workloads=entries)
    report["checks"] = floor_report.checks(entries)
    report["best_dynaflow"] = floor_report.best_dynaflow(entries)
    write(report, args.out_path)
    print(floor_report.render(report), flush=True)
    return report


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="a,b,c", help="comma list of a (dense decode), b (mix), c (transformers)")
    ap.add_argument("--quick", action="store_true", help="the rows the checks need and a few more: fits 8 minutes")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, no CUDA rows: checks the plumbing")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/gpu_floor.json; "
                    "--dry-run: gpu_floor_dry_run.json in the temp folder); timeline PNGs go beside it")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per row (at least 20 on a GPU)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--pair-rounds", type=int, default=8,
                    help="alternating blocks per side when a check's two rows are timed again side by side")
    ap.add_argument("--strategies", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                    help="dynaflow strategies (default: auto and every registered one; --quick: auto,sequential,nanoflow)")
    ap.add_argument("--executor", default=None, help="dynaflow executor (default cuda; serial on --dry-run)")
    ap.add_argument("--sm-split", default=None, help="compute,memory SMs of the partitioned rows (default ~60%%/40%%)")
    ap.add_argument("--budget-s", type=float, default=None, help="time for all workloads (default 420 --quick, 1500 full, none dry run)")
    ap.add_argument("--row-limit-s", type=float, default=60.0,
                    help="a row running longer is stopped and recorded as an error (reduce-overhead: twice that)")
    ap.add_argument("--min-row-s", type=float, default=None, help="a row is not started with less time left")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one subprocess per workload (default on a GPU)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.repeats, args.warmup = min(args.repeats, 5), min(args.warmup, 2)
        args.pair_rounds = min(args.pair_rounds, 2)
    elif args.repeats < 20:
        ap.error("--repeats must be at least 20 on a GPU (medians of fewer are noise)")
    args.executor = args.executor or ("serial" if args.dry_run else "cuda")
    if args.budget_s is None and not args.dry_run:
        args.budget_s = 420.0 if args.quick else 1500.0
    if args.min_row_s is None:
        args.min_row_s = 0.0 if args.dry_run else 8.0
    args.out_path = args.out or (os.path.join(tempfile.gettempdir(), "gpu_floor_dry_run.json") if args.dry_run
                                 else DEFAULT_OUT)
    return args


if __name__ == "__main__":
    main()
