"""The call-overhead benchmark's plumbing (``benchmarks/call_overhead.py --dry-run``): every path runs, equals
eager, and the floor's paths really skip Dynamo after their first calls."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import call_overhead  # noqa: E402


def test_dry_run_every_path_and_the_floor_skips_dynamo(tmp_path):
    report = call_overhead.main(["--dry-run", "--out", str(tmp_path / "co.json")])
    assert [r["path"] for r in report["rows"]][0] == "eager" and len(report["rows"]) == 5
    assert report["direct_calls"]["dynaflow eager"] > 0 and report["direct_calls"]["dynaflow auto"] > 0
    assert report["direct_calls"]["dynaflow sequential"] == 0 and (tmp_path / "co.json").exists()
    if "decode" in report:  # transformers installed: the decode paths ran (and gave eager's tokens)
        assert len(report["decode"]["rows"]) == 3 and all(r["median_us_per_token"] > 0 for r in report["decode"]["rows"])
    if "graphed_step" in report:  # the graphed decode step's host path ran (and equalled eager) at batch 1 and 4
        rows = report["graphed_step"]["rows"]
        assert {(r["batch"], r["layers"], r["path"]) for r in rows} == {(b, n, p) for b, n in ((1, 2), (4, 2), (1, 32)) for p in (
            "Dynamo alone (memo backend)", "dynaflow sequential +graphs", "dynaflow nanoflow +graphs")}
        assert all(r["median_us"] > 0 and r["before_replay_us"] > 0 for r in rows)  # (medians of separate samples:
        # their ratio is a measurement, for the benchmark's report, not for a test)
    if "inductor_step" in report:  # the Inductor paths ran (and equalled eager): fused, one compile for the step
        compiles = {r["path"]: r["compiles"] for r in report["inductor_step"]["rows"]}
        assert compiles["dynaflow sequential +inductor, runs fused"] == 1
        assert compiles["dynaflow sequential +inductor, per segment"] > 1
