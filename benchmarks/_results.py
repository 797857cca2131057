"""Shared by the benchmarks: the provenance every result file carries, writing it, and the ``main`` they share."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("bench")


def provenance(benchmark: str, **extra: Any) -> dict[str, Any]:
    """What produced a result: benchmark, machine, torch/python versions, date, the exact command."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"benchmark": benchmark, "gpu": gpu, "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv), **extra}


def write(result: dict[str, Any], path: str | None) -> None:
    """Write ``result`` as indented JSON to ``path`` (nothing when ``path`` is None)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log.info("wrote %s", path)


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def common_args(ap: Any, name: str, repeats: int = 20) -> None:
    """The options every GPU benchmark takes: ``--repeats``, ``--out`` and ``--dry-run``."""
    ap.add_argument("--repeats", type=int, default=repeats, help=f"timed repeats per row (default {repeats})")
    ap.add_argument("--out", default=None, help=f"results JSON (default benchmarks/results/{name}.json)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU; checks the plumbing, measures nothing")


@dataclass(frozen=True)
class Setup:
    """Where a GPU benchmark runs: on a GPU in bf16 with at least 20 timed repeats, or (``--dry-run``) on the CPU
    in float32 with two, which checks the plumbing and measures nothing."""

    cuda: bool
    device: str
    dtype: torch.dtype
    repeats: int
    warmup: int


def setup(args: Any, script: str) -> Setup:
    """The :class:`Setup` of ``args`` (``--dry-run``, ``--repeats``); a GPU run without a GPU stops with the fix."""
    if args.dry_run:
        return Setup(False, "cpu", torch.float32, 2, 1)
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU (use --dry-run on CPU to check the plumbing).")
    return Setup(True, "cuda", torch.bfloat16, max(args.repeats, 20), 3)


def run_main(name: str, parse: Callable[[Sequence[str] | None], Any], run: Callable[[Any], dict[str, Any]],
             argv: Sequence[str] | None = None) -> dict[str, Any]:
    """A benchmark's ``main``: log to stdout, parse ``argv``, run, and write the report to ``--out`` (default
    ``results/<name>.json``; under ``--dry-run`` only to an explicit ``--out``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    report = run(args)
    write(report, args.out or (None if args.dry_run else os.path.join(RESULTS, f"{name}.json")))
    return report
