"""The decode-attention bandwidth benchmark's plumbing on CPU (``benchmarks/decode_attention_bw.py --dry-run``: tiny
sizes, the reference path) and how it scores the target; the GPU run is what measures the bandwidth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode_attention_bw  # noqa: E402


def test_dry_run_writes_every_row(tmp_path):
    report = decode_attention_bw.main(["--dry-run", "--budgets", "132", "52", "--out", str(tmp_path / "bw.json")])
    names = [r["name"] for r in report["rows"]]
    assert names[0].startswith("device copy") and names[1].startswith("torch SDPA")
    assert [n for n in names if n.startswith("split-KV")] == ["split-KV, sm_budget 132 (plain stream)",
                                                              "split-KV, sm_budget 52 (plain stream)"]
    assert all("error" not in r for r in report["rows"]), report["rows"]
    assert all(r["rel_err"] < 1e-5 for r in report["rows"][1:])
    saved = json.loads((tmp_path / "bw.json").read_text())
    assert saved["dry_run"] and saved["command"].startswith("python") and saved["torch"] and saved["date"]


def test_the_target_counts_confined_rows_on_at_most_40_percent_of_the_sms():
    rows = [{"kind": "split-kv", "sms": 132, "of_copy_bw": 0.95, "partition": None, "name": "all"},
            {"kind": "split-kv", "sms": 52, "of_copy_bw": 0.9, "partition": None, "name": "plain 52"},
            {"kind": "split-kv", "sms": 52, "of_copy_bw": 0.7, "partition": "cuda-python-green-context", "name": "g52"},
            {"kind": "sdpa", "sms": 40, "of_copy_bw": 0.99, "partition": "cuda-python-green-context", "name": "s"}]
    t = decode_attention_bw._target(rows, 132)
    assert t["best"] == "g52" and t["met"] is False and t["on_green_context"]
    t = decode_attention_bw._target(rows[:2], 132)  # no partition could be made: the plain-stream rows count
    assert t["best"] == "plain 52" and t["met"] is True and not t["on_green_context"]
    assert decode_attention_bw._target(rows[:1], 132)["met"] is None
