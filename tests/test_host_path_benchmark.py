"""``benchmarks/host_path.py --dry-run`` on CPU: every configuration that needs no GPU runs, is timed both ways,
and names its top host functions (the GPU run adds the CUDA runtime calls and the graphed rows)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import host_path  # noqa: E402


def test_dry_run_times_every_cpu_configuration(tmp_path):
    out = tmp_path / "host_path.json"
    assert host_path.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"eager", "Dynamo alone (graph as is)", "dynaflow eager strategy", "dynaflow sequential"}
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("traceback"))
        assert r["gpu_ms"] > 0 and r["host_us"] > 0 and "function calls" in r["top_functions"]
    assert report["dry_run"] and report["gpu"] is None


def test_pre_replay_time_is_the_wait_before_the_first_replay(monkeypatch):
    """Measured with a stand-in graph class and a fake clock: the host time up to the first replay, not the
    work after it; a call that replays nothing has none."""

    class Clock:
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(host_path, "time", clock)

    class Graph:
        def replay(self) -> None:
            pass

    g, original = Graph(), Graph.replay

    def call() -> None:
        clock.now += 0.004  # the host path before the replay
        g.replay()
        clock.now += 0.05  # after it: overlaps the GPU's work, not counted
        g.replay()

    assert host_path._pre_replay_us(call, False, graph_cls=Graph, repeats=3) == pytest.approx(4000.0)
    assert Graph.replay is original  # the stamp is taken off again
    assert host_path._pre_replay_us(lambda: None, False, graph_cls=Graph, repeats=2) is None
    assert host_path._pre_replay_us(call, False) is None  # no GPU, no graph class: nothing to time
