"""The KV-offload benchmark's plumbing on CPU (``benchmarks/kv_offload.py --dry-run``): every row runs and
equals eager; the GPU run is what measures the transfer lane."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kv_offload  # noqa: E402


def test_dry_run_rows_equal_eager(tmp_path):
    out = tmp_path / "kv.json"
    report = kv_offload.main(["--dry-run", "--nano", "2", "--out", str(out)])
    assert out.exists() and report["dry_run"] and report["parts"]["fetch_ms"] >= 0
    names = [r["name"] for r in report["rows"]]
    assert names[0].startswith("copy-then-compute") and "dynaflow nanoflow nano=2" in names
    assert all("error" not in r and r.get("rel_err", 0.0) < 1e-5 for r in report["rows"]), report["rows"]


def test_defaults_are_the_balanced_gpu_workload():
    s = kv_offload.Shape()
    per_layer = s.batch * s.kv_len * s.kv_heads * s.head_dim * 2 * 2  # K and V in bf16
    assert 50e6 < per_layer < 100e6 and kv_offload.parse([]).repeats >= 20

