"""The decode bound of ``auto`` (dynaflow/phase_bound.py): prefill ∥ decode partitions are sized by measurement,
the decode partition as small as keeps the decode rows within ``decode_bound`` × their standalone time.

The search runs for real on the CPU (plans, executors, outputs checked against eager); only the clock is fixed:
step times and timelines are what a GPU would have shown for each decode partition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynaflow
import dynaflow.tuning_planner as tuning_planner
from dynaflow.errors import StrategyError
from dynaflow.phase_bound import PhaseBound, busy_time, finish_time, phase_ops
from dynaflow.strategies.auto import Auto, Candidate
from dynaflow.timeline import Timeline, TimelineEvent

D = 16
LAYOUT = ([6, 1, 1, 1, 1], ["prefill", "decode", "decode", "decode", "decode"])
DECODE_SMS = (8, 16, 32, 64)
STEP_MS = {None: 2.0, 8: 1.0, 16: 1.1, 32: 1.3, 64: 1.6}
"""Measured step time by the decode lane's SMs (``None``: sequential, eager, shared lanes)."""
DECODE_FINISH = {None: 1.1, 8: 1.6, 16: 1.3, 32: 1.15, 64: 1.05}
"""When the decode rows finish, as a multiple of their standalone time (1 ms)."""


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + x


def _decode_sms(plan) -> int | None:
    return next((lane.sm_count for lane in plan.program.lanes if lane.name == "decode"), None)


@pytest.fixture
def gpu_clock(monkeypatch):
    """Each candidate still runs on the real executor once per measurement; its predicted and measured times and
    its timeline are fixed."""
    standalone: list = []
    real_measure, real_timelines = tuning_planner.GraphPlanner.measure, tuning_planner.GraphPlanner.timelines

    def measure(self, plan, inputs, repeats, graphs=False, passthrough=False):
        real_measure(self, plan, inputs, 1, graphs, passthrough)
        return STEP_MS[None if passthrough else _decode_sms(plan)] * 1e-3

    def timelines(self, plan, inputs, repeats):
        (real,) = real_timelines(self, plan, inputs, 1)  # the executor records one for real
        ops = phase_ops(plan.program, "decode")
        assert ops and ops <= {e.op for e in real.events}
        if [lane.name for lane in plan.program.lanes] == ["main"]:  # the sequential run of the same split
            standalone.append(plan.split)
            each = 1e-3 / len(ops)
            events = [TimelineEvent("main", op, i * each, (i + 1) * each) for i, op in enumerate(sorted(ops))]
        else:
            end = DECODE_FINISH[_decode_sms(plan)] * 1e-3
            events = [TimelineEvent("decode", op, 0.0, end) for op in ops]
        return [Timeline(tuple(events), "fake")] * repeats

    monkeypatch.setattr(tuning_planner.GraphPlanner, "predictor",
                        lambda self, inputs: lambda plan: STEP_MS[_decode_sms(plan)] * 1e-3 * 0.9)
    monkeypatch.setattr(tuning_planner.GraphPlanner, "measure", measure)
    monkeypatch.setattr(tuning_planner.GraphPlanner, "timelines", timelines)
    return standalone


def _search(decode_bound):
    cands = [{"strategy": "prefill_decode", "options": {"prefill_sms": 132 - n, "decode_sms": n}} for n in DECODE_SMS]
    cands.append({"strategy": "nanoflow", "options": {"nano_batches": 2}})
    model = Mlp().eval()
    c = dynaflow.compile(model, strategy=Auto(candidates=cands, measure_top_k=1, repeats=2, cache=False,
                                              decode_bound=decode_bound))
    x = torch.randn(10, D)
    with torch.no_grad(), dynaflow.requests(*LAYOUT):
        for _ in range(2):
            torch.testing.assert_close(c(x), model(x), atol=1e-6, rtol=1e-6)
    (result,) = c.graphs[0].tuned.values()
    return result


def test_the_decode_partition_is_the_smallest_that_keeps_the_bound(gpu_clock):
    result = _search(1.2)
    assert result.winner.candidate == Candidate.from_json(
        {"strategy": "prefill_decode", "options": {"prefill_sms": 100, "decode_sms": 32}})
    trials = {dict(t.candidate.options).get("decode_sms"): t for t in result.trials
              if t.candidate.strategy == "prefill_decode"}
    assert all(t.measured is not None for t in trials.values())  # every bounded candidate measured, not top-k only
    for n in (8, 16):
        assert f"decode finished at {DECODE_FINISH[n]:.2f}x of its standalone time (bound 1.2x)" in trials[n].note
    assert not trials[32].note and not trials[64].note
    assert "broke a phase bound" in result.reason and "bound 1.2x" in result.table()
    assert len(set(gpu_clock)) == 1  # the standalone time is measured once per split


def test_without_a_bound_the_fastest_step_wins(gpu_clock):
    result = _search(None)
    assert dict(result.winner.candidate.options).get("decode_sms") == 8
    assert not gpu_clock and "phase bound" not in result.reason


def test_a_bound_below_one_is_refused_by_name():
    with pytest.raises(StrategyError, match="decode_bound=0.9 must be a number >= 1.0"):
        Auto(decode_bound=0.9)


def test_finish_and_busy_times_are_medians_over_runs():
    ops = frozenset({"attn[nb1]", "mlp[nb1]"})
    runs = [Timeline((TimelineEvent("decode", "attn[nb1]", 0.0, 1.0), TimelineEvent("decode", "mlp[nb1]", 1.0, t),
                      TimelineEvent("prefill", "mlp[nb0]", 0.0, 9.0))) for t in (2.0, 3.0, 5.0)]
    assert finish_time(runs, ops) == 3.0 and busy_time(runs, ops) == 3.0
    bound = PhaseBound("decode", 1.2)
    assert bound.verdict(1.2, 1.0) is None and "1.50x" in bound.verdict(1.5, 1.0)
    assert repr(bound) == "PhaseBound(decode <= 1.2x standalone)"


def test_the_sm_splits_of_the_best_predictions_are_searched_by_measurement():
    """``autotune`` measures every SM split of its best predictions, not only the best-predicted split (the
    roofline's SM shares are a guess; the device decides)."""
    from dynaflow.ir import SplitConfig
    from dynaflow.tune import autotune, sm_family

    def cand(strategy, **options):
        return Candidate.from_json({"strategy": strategy, "options": options})

    seq, flat = cand("sequential"), cand("nanoflow", nano_batches=2)
    parts = [cand("nanoflow", nano_batches=2, sm_counts={"compute": 132 - m, "memory": m}) for m in (32, 64, 96)]
    other = cand("round_robin", nano_batches=2)
    predicted = {seq: 10.0, parts[0]: 5.0, flat: 6.0, other: 7.0, parts[1]: 8.0, parts[2]: 9.0}
    measured_ms = {seq: 10.0, parts[0]: 9.0, flat: 8.0, other: 7.5, parts[1]: 4.0, parts[2]: 6.0}
    seen = []

    def measure(c):
        seen.append(c)
        return measured_ms[c]

    result = autotune(list(predicted), "b", lambda c: (SplitConfig.whole(8), predicted[c]), measure, top_k=1)
    assert set(seen) == {seq, *parts, flat}  # the top prediction's family (its SM splits and none), and the floor
    assert other not in seen and result.winner.candidate == parts[1]
    assert sm_family(parts[0]) == sm_family(flat) != sm_family(other)


def test_a_bound_that_cannot_be_measured_is_not_kept(gpu_clock, monkeypatch):
    def broken(self, plan, inputs, repeats):
        raise dynaflow.DynaflowError("the timeline executor failed")

    monkeypatch.setattr(tuning_planner.GraphPlanner, "timelines", broken)
    result = _search(1.2)
    assert result.winner.candidate.strategy != "prefill_decode"
    assert all("decode time not measured (the timeline executor failed)" in t.note for t in result.trials
               if t.candidate.strategy == "prefill_decode")
