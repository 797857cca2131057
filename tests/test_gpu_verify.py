"""The one-command GPU verification runner (benchmarks/gpu_verify.py): its plan, its time limits, what
counts as the expected outcome of each step, and a ``--dry-run`` of the tests step on CPU."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_verify  # noqa: E402


def test_plan_covers_every_gpu_check_and_writes_into_out(tmp_path):
    plan = gpu_verify.steps(gpu_verify.STEPS, str(tmp_path), dry_run=False)
    names = [s.name for s in plan]
    assert names[:4] == ["tests", "races-intact", "races-broken", "races-torch-sanitizer"]
    assert names[-8:] == ["floor", "host", "ladder", "overlap", "offload", "attnbw", "pd", "sim"]  # the floor benchmark after the tests and races, before overlap
    assert all(s.timeout_s <= 540 for s in plan)  # each fits one 10-minute remote call
    assert dict(plan[3].env) == {"TORCH_CUDA_SANITIZER": "1"} and "--broken" in plan[3].argv
    for s in plan:
        outs = [a for a in s.argv if a.startswith(str(tmp_path))]
        assert all(os.path.dirname(a) == str(tmp_path) for a in outs)
    assert "--device" in plan[-1].argv and "cuda" in plan[-1].argv
    floor = plan[-8]
    assert "--quick" in floor.argv and floor.timeout_s <= 480  # gpu_floor.py --quick fits 8 minutes on one H100
    assert floor.argv[1].endswith("gpu_floor.py") and os.path.join(str(tmp_path), "gpu_floor.json") in floor.argv


def test_dry_run_plan_skips_the_races_and_shrinks_the_benchmarks(tmp_path):
    plan = gpu_verify.steps(gpu_verify.STEPS, str(tmp_path), dry_run=True)
    assert [s.name for s in plan] == ["tests", "floor", "host", "ladder", "overlap", "offload", "attnbw", "pd", "sim"]
    assert all("--dry-run" in s.argv for s in plan[1:])


def test_unknown_step_names_the_choices(tmp_path):
    try:
        gpu_verify.steps(["tests", "overlpa"], str(tmp_path), dry_run=False)
    except SystemExit as exc:
        assert "unknown step 'overlpa'" in str(exc) and "overlap" in str(exc)
    else:
        raise AssertionError("an unknown step was accepted")


def test_a_step_past_its_limit_is_killed_and_recorded():
    step = gpu_verify.Step("slow", (sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"), 1)
    record = gpu_verify.run_step(step)
    assert record["rc"] == 124 and record["seconds"] < 10 and "killed after 1 s" in record["log_tail"]


def test_expected_outcomes():
    ok = gpu_verify.as_expected
    assert ok({"step": "races-broken", "rc": 3, "log_tail": ""})
    assert not ok({"step": "races-broken", "rc": 0, "log_tail": ""})  # a missed race is a failure
    assert ok({"step": "races-torch-sanitizer", "rc": 1, "log_tail": "CSAN detected a possible data race"})
    assert not ok({"step": "races-torch-sanitizer", "rc": 1, "log_tail": "ImportError"})
    assert not ok({"step": "tests", "rc": 0, "log_tail": "SKIPPED [4] needs a CUDA GPU: ..."})
    assert ok({"step": "tests", "rc": 0, "log_tail": "SKIPPED needs a CUDA GPU", "dry_run": True})
    assert ok({"step": "overlap", "rc": 0, "log_tail": ""}) and not ok({"step": "sim", "rc": 1, "log_tail": ""})
    assert ok({"step": "floor", "rc": 0, "log_tail": "FAIL  1. dynaflow auto"})  # checks are measurements, not asserts
    assert not ok({"step": "floor", "rc": 124, "log_tail": ""})


@pytest.mark.slow  # runs pytest in a subprocess
def test_dry_run_of_the_tests_step_writes_a_summary(tmp_path):
    assert gpu_verify.main(["--dry-run", "--only", "tests", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu_verify.json").read_text())
    assert summary["benchmark"] == "gpu_verify" and summary["dry_run"] and summary["all_as_expected"]
    (record,) = summary["steps"]
    assert record["step"] == "tests" and record["rc"] == 0 and (tmp_path / "cuda_tests.xml").exists()
