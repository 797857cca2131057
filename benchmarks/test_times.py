"""Wall time of the README's commands on this machine: the demo and each test tier, with their outcome.

    python benchmarks/test_times.py --out benchmarks/results/test_times_cpu.json
    python benchmarks/test_times.py --tiers core,demo      # a subset

The load average before and after each command is recorded too: on a shared machine it explains a slow run.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _results import provenance, write  # noqa: E402

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]
TIERS = {
    "demo": [sys.executable, "-m", "dynaflow", "demo", "--trace", ""],
    "core": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
    "slow": [sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider"],
    "distributed": [sys.executable, "-m", "pytest", "-q", "-m", "distributed", "-p", "no:cacheprovider"],
}


def run_tier(name: str) -> dict:
    """Run one command from the repository root; its wall time, exit status and pytest's summary line."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(TIERS[name], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    summary = [ln for ln in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    failed = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED ")]
    log.info("%s: %.0f s, rc %d, %s", name, wall, proc.returncode, summary[-1] if summary else "")
    return {"tier": name, "command": " ".join(["python"] + TIERS[name][1:]), "wall_s": round(wall, 1),
            "returncode": proc.returncode, "summary": summary[-1] if summary else None, "failed": failed,
            "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiers", default="demo,core,slow", help=f"comma-separated, from {sorted(TIERS)}")
    p.add_argument("--out", default=None, help="result JSON path")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rows = [run_tier(t) for t in args.tiers.split(",")]
    write({**provenance("test_times"), "tiers": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
