"""``auto``'s floor check: after planning, calls alternate between dynaflow and the model itself, timed whole,
and the faster path keeps them (the model itself on a tie); every call's answer equals eager."""

from __future__ import annotations

import torch

import dynaflow
from dynaflow.floor_check import SAMPLES, WARMUP, FloorCheck


class _Clock:
    """A fake ``time`` module: each path's call advances it by a set cost, so verdicts do not depend on the
    machine's timing."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _run(check: FloorCheck, floor_s: float, dynaflow_s: float, calls: int, monkeypatch) -> tuple[str, list]:
    import dynaflow.floor_check as fc

    clock = _Clock()
    monkeypatch.setattr(fc, "time", clock)
    order, verdicts = [], []

    def path(name: str, cost: float) -> None:
        order.append(name)
        clock.now += cost

    for _ in range(calls):
        _, v = check.run("k", "calls like these", lambda: path("F", floor_s), lambda: path("D", dynaflow_s), cuda=False)
        verdicts += [v] if v is not None else []
    return "".join(order), verdicts


def test_the_paths_alternate_after_dynaflows_warm_up_and_the_faster_keeps_the_calls(monkeypatch):
    check = FloorCheck()
    check.start("k")
    order, verdicts = _run(check, floor_s=4.0, dynaflow_s=1.0, calls=2 * SAMPLES + 5 + 4, monkeypatch=monkeypatch)
    probe = WARMUP["dynaflow"] + WARMUP["floor"] + 2 * SAMPLES
    assert order[:3] == "DDF" and order[3:probe] == "DF" * SAMPLES and set(order[probe:]) == {"D"}
    assert len(verdicts) == 1 and verdicts[0].keeps_dynaflow and not check.active
    check.start("k")  # a decided key is not probed again
    assert not check.active


def test_a_slower_dynaflow_path_loses_to_the_model_itself(monkeypatch):
    check = FloorCheck()
    check.start("k")
    _, verdicts = _run(check, floor_s=1.0, dynaflow_s=4.0, calls=20, monkeypatch=monkeypatch)
    assert len(verdicts) == 1 and not verdicts[0].keeps_dynaflow
    assert "the model itself runs them" in repr(verdicts[0])


def _costed(c, clock: _Clock, floor_s: float, dynaflow_s: float) -> None:
    direct, through = c._direct, c._through_dynaflow

    def _direct(*a):
        clock.now += floor_s
        return direct(*a)

    def _through(*a):
        clock.now += dynaflow_s
        return through(*a)

    c._direct, c._through_dynaflow = _direct, _through


def _auto_model(monkeypatch, floor_s: float, dynaflow_s: float):
    import dynaflow.floor_check as fc

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16)).eval()
    torch._dynamo.reset()
    # predicted only (measure_top_k=0): auto plans its best prediction, never its eager floor, so the floor check
    # is what compares the planned path with the model itself
    c = dynaflow.compile(model, strategy=dynaflow.strategies.get("auto", cache=False, measure_top_k=0),
                         executor="serial")
    clock = _Clock()
    monkeypatch.setattr(fc, "time", clock)
    _costed(c, clock, floor_s, dynaflow_s)
    return model, c


def test_auto_hands_calls_to_the_model_itself_when_the_whole_dynaflow_call_is_slower(monkeypatch):
    model, c = _auto_model(monkeypatch, floor_s=1.0, dynaflow_s=2.0)
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
        for i in range(20):
            torch.testing.assert_close(c(x), ref, rtol=0, atol=0, msg=lambda m, i=i: f"call {i}: {m}")
        assert len(c.floor_check.verdicts) == 1 and not c.floor_check.verdicts[0].keeps_dynaflow
        before, graph_calls = c.direct_calls, c.graphs[0].calls
        torch.testing.assert_close(c(x), ref, rtol=0, atol=0)
    assert c.direct_calls == before + 1 and c.graphs[0].calls == graph_calls  # no Dynamo, no executor
    assert "the model itself runs them" in c.explain()


def test_auto_keeps_its_plan_when_the_whole_dynaflow_call_is_faster(monkeypatch):
    model, c = _auto_model(monkeypatch, floor_s=2.0, dynaflow_s=1.0)
    x = torch.randn(8, 16)
    with torch.no_grad():
        for _ in range(20):
            c(x)
        assert len(c.floor_check.verdicts) == 1 and c.floor_check.verdicts[0].keeps_dynaflow
        graph_calls, direct = c.graphs[0].calls, c.direct_calls
        torch.testing.assert_close(c(x), model(x), rtol=0, atol=0)
    assert c.graphs[0].calls == graph_calls + 1 and c.direct_calls == direct
    assert "dynaflow runs them" in c.explain()


def test_a_tie_goes_to_the_model_itself(monkeypatch):
    check = FloorCheck()
    check.start("k")
    _, verdicts = _run(check, floor_s=1.0, dynaflow_s=1.0, calls=20, monkeypatch=monkeypatch)
    assert len(verdicts) == 1 and not verdicts[0].keeps_dynaflow


def test_callers_on_several_threads_share_one_probe_and_get_one_verdict():
    """Threads calling one key while it is on probation: every call returns its own path's output, the probe
    books each turn once, and exactly one call gives the verdict (before, two finishing calls raced on it)."""
    import threading
    import time as real_time

    check = FloorCheck()
    check.start("k")
    barrier = threading.Barrier(8)
    verdicts, outputs, errors = [], [], []

    def caller(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(6):
                def slow(tag: str) -> str:
                    real_time.sleep(0.001)  # the timed call: other threads' calls run meanwhile
                    return tag
                out, v = check.run("k", "calls like these", lambda: slow("F"), lambda: slow("D"), cuda=False)
                outputs.append(out)
                verdicts.extend([v] if v is not None else [])
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outputs) == 48 and set(outputs) <= {"F", "D"}
    assert len(verdicts) == 1 and len(check.verdicts) == 1 and not check.active
