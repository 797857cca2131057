"""The mechanism ladder's plumbing on CPU (``benchmarks/overlap_ladder.py --dry-run``): the rows that need no GPU
run and equal eager, the two attention kernels compute the same step, and the rungs add one mechanism each."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overlap_ladder  # noqa: E402
import workloads  # noqa: E402


def test_dry_run_rows_equal_eager(tmp_path):
    out = tmp_path / "ladder.json"
    report = overlap_ladder.main(["--dry-run", "--layers", "2", "--out", str(out)])
    assert out.exists() and report["dry_run"]
    names = [r["name"] for r in report["rows"]]
    assert names[:2] == ["eager (stock kernels)", "eager (same kernels, sequential)"]
    assert "nanoflow pipelining" in names and "nanoflow + SM-efficient attention" in names and names[-1].startswith("auto")
    assert all("error" not in r and r["equal"] for r in report["rows"]), report["rows"]


def test_each_rung_adds_one_mechanism():
    configs = [overlap_ladder.rung_config(i, 84, 48) for i in range(len(overlap_ladder.RUNGS))]
    assert [k for k, _, _ in configs] == ["sdpa", "sdpa", "sdpa", "split_kv"]
    assert "sm_counts" not in configs[0][1] and all(o["sm_counts"] == {"compute": 84, "memory": 48}
                                                    for _, o, _ in configs[1:])
    assert [env for _, _, env in configs] == [{}, {"DYNAFLOW_SM_CARVEOUT": "0"}, {}, {}]


def test_both_attention_kernels_compute_the_same_step():
    a = workloads.dense_decode(2, tiny=True, device="cpu", dtype=torch.float32)
    b = workloads.dense_decode(2, tiny=True, device="cpu", dtype=torch.float32, attention="split_kv")
    with torch.no_grad():
        torch.testing.assert_close(a.step(), b.step(), atol=1e-5, rtol=1e-5)
