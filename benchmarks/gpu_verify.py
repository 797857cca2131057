"""Every GPU check of the CUDA executor in one command, for a GPU machine lent for a short while.

Steps (each a subprocess with its own time limit, so one hang cannot eat the lease; run a subset with
``--only`` to fit one call of a time-limited remote runner):

* ``tests``   — ``pytest -m cuda``: every strategy equal to eager on the GPU (fp32/bf16, ± Inductor,
  ± CUDA graphs, SM lanes), peak memory, and the race tests;
* ``races``   — ``race_check.py`` intact and with one event wait removed, under torch's CUDA sanitizer,
  and under ``compute-sanitizer --tool racecheck`` where it is on PATH;
* ``floor``   — ``gpu_floor.py --quick``: dynaflow next to the hand-written baselines on the three workloads
  of issue 13, with the must-show checks (JSON, timeline PNGs; ≤ 8 minutes on one H100);
* ``host``    — ``host_path.py``: where a dense-decode step's host time goes (eager, Dynamo alone, dynaflow with
  and without CUDA graphs): the per-call time that keeps ``auto`` under eager on workload (a);
* ``ladder``  — ``overlap_ladder.py``: dense decode, 8 layers, what each overlap mechanism adds (pipelining,
  partitions, SM-limited GEMMs, SM-efficient attention) over the eager CUDA graph with stock kernels and with
  the same kernels (issue 16);
* ``overlap`` — ``overlap_gpu.py``: measured speedups and the ideal bound (JSON + timeline PNG);
* ``offload`` — ``kv_offload.py``: KV-offload decode, the transfer lane next to copy-then-compute and a
  hand-written double-buffered prefetch (issue 16);
* ``attnbw``  — ``decode_attention_bw.py``: the split-KV decode-attention kernel's HBM bandwidth against the
  SMs it gets, next to the copy bandwidth and SDPA (issue 16);
* ``pd``      — ``pd_multiplex.py``: prefill ∥ decode on disjoint SM partitions, the decode rows' time against
  their standalone time, next to hand-written streams and partitions (issue 16);
* ``sim``     — ``sim_accuracy.py --device cuda --models llama8b``: predicted vs measured.

Everything lands in ``--out`` (default ``$OUT`` when set, else ``benchmarks/results/gpu-<date>``) with a
``gpu_verify.json`` summary: what ran, its exit code, seconds and the log tail. ``--dry-run`` runs the same
steps at CPU sizes to check the plumbing (the cuda tests then skip, and say why).

    python benchmarks/gpu_verify.py --only tests,races          # one remote call
    python benchmarks/gpu_verify.py --only floor                # the next one (≤ 8 minutes)
    python benchmarks/gpu_verify.py --only ladder,pd                # the overlap that pays (issue 16)
    python benchmarks/gpu_verify.py --only overlap,offload,attnbw,sim  # and the one after
    python benchmarks/gpu_verify.py --dry-run --out /tmp/gv     # on a CPU machine
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _results import provenance, write  # noqa: E402

log = logging.getLogger("bench")

STEPS = ("tests", "races", "floor", "host", "ladder", "overlap", "offload", "attnbw", "pd", "sim")

FLOOR_TIMEOUT_S = 480
"""The floor step's limit: ``gpu_floor.py --quick`` spends a 420 s budget on its workloads (each in a
subprocess with its own share), plus start-up and the summary."""


@dataclass(frozen=True)
class Step:
    """One command of the verification, with the time it may take and the log it writes."""

    name: str
    argv: tuple[str, ...]
    timeout_s: int
    env: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env)
        return f"{self.name}: {env + ' ' if env else ''}{' '.join(self.argv)} (≤ {self.timeout_s} s)"


def steps(names: Sequence[str], out: str, dry_run: bool) -> list[Step]:
    """The commands for ``names``, writing into ``out``."""
    py = sys.executable
    bench = lambda script: os.path.join(HERE, script)  # noqa: E731
    dry = ("--dry-run",) if dry_run else ()
    plan: list[Step] = []
    for name in names:
        if name == "tests":
            plan.append(Step(name, (py, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                                    "--junitxml", os.path.join(out, "cuda_tests.xml"), os.path.join(ROOT, "tests")),
                             540))
        elif name == "races":
            if dry_run:  # race_check needs a GPU stream to race on
                log.info("races: skipped under --dry-run (needs CUDA)")
                continue
            race = (py, bench("race_check.py"))
            plan.append(Step("races-intact", race, 120))
            plan.append(Step("races-broken", race + ("--broken",), 120))
            plan.append(Step("races-torch-sanitizer", race + ("--broken", "--delay", "0"), 180,
                             (("TORCH_CUDA_SANITIZER", "1"),)))
            sanitizer = shutil.which("compute-sanitizer")
            if sanitizer:
                plan.append(Step("races-compute-sanitizer",
                                 (sanitizer, "--tool", "racecheck", *race, "--broken", "--delay", "0"), 300))
        elif name == "floor":
            plan.append(Step(name, (py, bench("gpu_floor.py"), "--quick", "--out", os.path.join(out, "gpu_floor.json"),
                                    *dry), FLOOR_TIMEOUT_S))
        elif name == "host":
            plan.append(Step(name, (py, bench("host_path.py"), "--out", os.path.join(out, "host_path.json"), *dry), 120))
        elif name == "ladder":
            plan.append(Step(name, (py, bench("overlap_ladder.py"), "--out", os.path.join(out, "overlap_ladder.json"),
                                    *dry), 480))
        elif name == "overlap":
            plan.append(Step(name, (py, bench("overlap_gpu.py"), "--out", os.path.join(out, "overlap_gpu.json"),
                                    *dry), 540))
        elif name == "offload":
            plan.append(Step(name, (py, bench("kv_offload.py"), "--out", os.path.join(out, "kv_offload.json"), *dry),
                             180))
        elif name == "attnbw":
            plan.append(Step(name, (py, bench("decode_attention_bw.py"), "--out",
                                    os.path.join(out, "decode_attention_bw.json"), *dry), 180))
        elif name == "pd":
            plan.append(Step(name, (py, bench("pd_multiplex.py"), "--out", os.path.join(out, "pd_multiplex.json"),
                                    *dry), 300))
        elif name == "sim":
            device = ("--dry-run",) if dry_run else ("--device", "cuda")
            plan.append(Step(name, (py, bench("sim_accuracy.py"), *device, "--models", "llama8b",
                                    "--out", os.path.join(out, "sim_accuracy.json")), 540))
        else:
            raise SystemExit(f"unknown step {name!r}; choose from {', '.join(STEPS)}")
    return plan


def run_step(step: Step) -> dict[str, object]:
    """Run one step, never longer than its limit; return its record (exit code, seconds, log tail)."""
    env = {**os.environ, **dict(step.env), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(step.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout_s)
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        text = f"{exc.stdout or ''}{exc.stderr or ''}\n[gpu_verify] killed after {step.timeout_s} s"
    except OSError as exc:
        rc, text = 127, f"[gpu_verify] could not start: {exc}"
    seconds = time.perf_counter() - t0
    log.info("%s: rc %d in %.1f s", step.name, rc, seconds)
    return {"step": step.name, "command": repr(step), "rc": rc, "seconds": round(seconds, 1),
            "log_tail": text if isinstance(text, str) else str(text)}


def as_expected(record: dict[str, object]) -> bool:
    """Did a step end the way a working CUDA executor makes it end? The broken schedule must be caught: a
    wrong answer (exit 3), a torch sanitizer report; racecheck (shared-memory hazards only) must just run."""
    rc, text = record["rc"], str(record["log_tail"])
    step = record["step"]
    if step == "races-broken":
        return rc == 3
    if step == "races-torch-sanitizer":
        return rc != 0 and ("CSAN" in text or "unsynchronized" in text.lower())
    if step == "races-compute-sanitizer":
        return "COMPUTE-SANITIZER" in text and rc != 124
    if step == "tests":  # on a GPU machine the cuda tests must run, not skip for want of a GPU
        return rc == 0 and (bool(record.get("dry_run")) or "needs a CUDA GPU" not in text)
    return rc == 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    ap.add_argument("--out", default=None, help="folder for every result (default $OUT, else results/gpu-<date>)")
    ap.add_argument("--dry-run", action="store_true", help="CPU sizes: checks the plumbing, measures nothing")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)
    out = args.out or os.environ.get("OUT") or os.path.join(HERE, "results", f"gpu-{datetime.date.today()}")
    os.makedirs(out, exist_ok=True)
    plan = steps([n.strip() for n in args.only.split(",") if n.strip()], out, args.dry_run)
    if args.list:
        for step in plan:
            print(repr(step))
        return 0
    records = []
    for step in plan:
        record = run_step(step)
        record["dry_run"] = args.dry_run
        record["as_expected"] = as_expected(record)
        record["log_tail"] = str(record["log_tail"])[-4000:]
        records.append(record)
    ok = all(as_expected(r) for r in records)
    summary = provenance("gpu_verify", dry_run=args.dry_run, steps=records, all_as_expected=ok)
    write(summary, os.path.join(out, "gpu_verify.json"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
