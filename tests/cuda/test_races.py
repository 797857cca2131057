"""A deliberately broken program (one cross-lane event wait removed) must show up on the GPU: as a wrong
answer under a producer delay, and in torch's CUDA stream sanitizer. The intact program stays right."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

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
def test_compute_sanitizer_racecheck_runs_the_schedule(tmp_path):
    """racecheck checks shared-memory hazards inside kernels, so it may be silent about a missing event
    between streams (the sanitizer above is the one built for that); this checks that the schedule runs under
    it. ``benchmarks/gpu_verify.py --only races`` records its report with the GPU results."""
    proc = _run("--broken", "--delay", "0", prefix=("compute-sanitizer", "--tool", "racecheck"))
    text = proc.stdout + proc.stderr
    (tmp_path / "racecheck.log").write_text(text)
    assert "COMPUTE-SANITIZER" in text and '"broken": true' in text, text[-3000:]
