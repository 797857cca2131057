"""The prefill ∥ decode benchmark's plumbing on CPU (``benchmarks/pd_multiplex.py --dry-run``): every row runs and
equals eager, the attention op keeps whole requests, and auto searches with its decode bound. The GPU run is what
measures the partitions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pd_multiplex  # noqa: E402


def test_dry_run_rows_equal_eager(tmp_path):
    out = tmp_path / "pd.json"
    report = pd_multiplex.main(["--dry-run", "--out", str(out)])
    assert out.exists() and report["dry_run"] and report["alone"]["ideal_speedup"] >= 1.0
    names = [r["name"] for r in report["rows"]]
    assert names[0].startswith("sequential") and "dynaflow prefill_decode (shared SMs)" in names
    assert all("error" not in r and r["equal"] for r in report["rows"]), report["rows"]
    pd = next(r for r in report["rows"] if r["name"] == "dynaflow prefill_decode (shared SMs)")
    assert any("decode" in lane for lane in pd["lanes"]) and any("prefill" in lane for lane in pd["lanes"])
    auto = report["rows"][-1]
    assert auto["name"].startswith("dynaflow auto") and "winner" in auto["auto"]


def test_the_parts_together_are_the_step():
    s = pd_multiplex.Shape.tiny()
    model, inputs = pd_multiplex.build(s, "cpu", torch.float32)
    prefill, decode = pd_multiplex.parts(model, s, inputs)
    with torch.no_grad(), pd_multiplex.step_layout(s.prefill):
        whole = model(*inputs)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([prefill(), decode()]), whole, atol=1e-5, rtol=1e-5)


def test_a_launch_that_cuts_the_prefill_request_fails_loudly():
    s = pd_multiplex.Shape.tiny()
    model, (x, caches, lengths) = pd_multiplex.build(s, "cpu", torch.float32)
    with torch.no_grad(), pd_multiplex.step_layout(s.prefill), pd_multiplex._nano_rows((0, s.prefill - 2)):
        with pytest.raises(RuntimeError, match="cut the prefill request"):
            model(x[:s.prefill - 2], caches, lengths)


def test_defaults_are_the_issue_workload():
    args = pd_multiplex.parse([])
    s = pd_multiplex.Shape(layers=args.layers, decode=args.decode, kv_len=args.kv_len, prefill=args.prefill)
    assert (s.decode, s.kv_len, s.prefill, s.hidden, s.intermediate) == (256, 4096, 1024, 4096, 14336)
    assert args.repeats >= 20 and args.decode_bound == 1.2
