"""The GPU overlap benchmark's CPU-runnable parts: model construction at tiny size, the ideal-bound
arithmetic, and a ``--dry-run`` end to end (which measures nothing meaningful and claims nothing)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import overlap_gpu  # noqa: E402
from dynaflow.timeline import TimelineEvent  # noqa: E402


def test_ideal_bound_is_total_over_busiest_resource():
    ev = [TimelineEvent("main", "a", 0.0, 0.003, "compute"), TimelineEvent("main", "b", 0.003, 0.004, "memory"),
          TimelineEvent("main", "c", 0.004, 0.006, "memory"), TimelineEvent("main", "d", 0.006, 0.007, "")]
    b = overlap_gpu.ideal_bound(ev)
    assert b["per_resource_ms"] == pytest.approx({"compute": 4.0, "memory": 3.0})
    assert b["total_ms"] == pytest.approx(7.0) and b["busiest_ms"] == pytest.approx(4.0)
    assert b["ideal_speedup"] == pytest.approx(7.0 / 4.0)


def test_tiny_model_shapes():
    s = overlap_gpu.Shape.tiny()
    model, (h, caches, p) = overlap_gpu.build(s, "cpu", torch.float32)
    assert len(caches) == 2 * s.layers and caches[0].shape == (s.decode, s.kv_heads, s.kv_len, s.head_dim)
    with torch.no_grad():
        oh, op = model(h, caches, p)
    assert oh.shape == h.shape and op.shape == p.shape and torch.isfinite(oh).all()


def test_full_size_defaults_are_llama_8b_shaped():
    s = overlap_gpu.Shape()
    assert (s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate) == (4096, 32, 8, 128, 14336)
    assert overlap_gpu.parse([]).repeats >= 20


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    overlap_gpu.main(["--dry-run", "--strategies", "nanoflow", "--nano", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["gpu"].startswith("none") and {"torch", "date", "command", "ideal", "results"} <= set(r)
    names = [row["name"] for row in r["results"]]
    assert names[0] == "eager sequential" and "nanoflow nano=2" in names
    row = next(x for x in r["results"] if x["name"] == "nanoflow nano=2")
    assert row["rel_err_vs_eager"] < 1e-5
