"""A deliberately broken program (one cross-lane event wait removed) must show up on the GPU: as a wrong
answer under a producer delay, and in torch's CUDA stream sanitizer. The intact program stays right."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.cuda

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "race_check.py")


def _run(*args, env=None, prefix=()):
    proc = subprocess.run([*prefix, sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    return proc


def test_intact_program_is_right_even_with_a_slow_producer():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import race_check

    assert race_check.main([]) == 0


def test_missing_wait_gives_a_wrong_answer():
    import race_check

    assert race_check.main(["--broken"]) == 3


def test_torch_cuda_sanitizer_reports_the_missing_wait():
    ok = _run(env={"TORCH_CUDA_SANITIZER": "1"}, )
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = _run("--broken", "--delay", "0", env={"TORCH_CUDA_SANITIZER": "1"})
    text = bad.stdout + bad.stderr
    assert bad.returncode != 0 and ("CSAN" in text or "unsynchronized" in text.lower()), text[-3000:]


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
def test_compute_sanitizer_racecheck_record(tmp_path):
    """Records what racecheck says about the broken schedule (it checks shared memory, so it may be silent)."""
    proc = _run("--broken", "--delay", "0", prefix=("compute-sanitizer", "--tool", "racecheck"))
    record = {"returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-4000:]}
    out = os.path.join(ROOT, "benchmarks", "results", "racecheck_gpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(record["tail"])
