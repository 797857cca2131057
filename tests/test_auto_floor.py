"""``auto`` that never loses: a segment the cost model cannot price is timed instead of crashing the search, a
graph that writes its inputs is still measured (on private copies, leaving the caller's data as eager would),
and on an executor that captures CUDA graphs every measured candidate — "whole batch, one lane" included — is
also measured as a graph, and the fastest measured wins (checked with the fake CUDA harness on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynaflow
import dynaflow.planning as planning
import dynaflow.tuning_planner as tuning_planner
from dynaflow.strategies.auto import Auto, Candidate
from test_cuda_fake import fake_cuda  # noqa: F401 - the fixture
from test_graph_inputs import Reads, Writes, D, L


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(D, 4 * D)
        self.b = nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.softmax(self.a(x), dim=-1)
        return self.b(h) + x


def _auto(**kw: object) -> Auto:
    return Auto(max_nano_batches=2, measure_top_k=2, repeats=2, cache=False, **kw)


def test_segments_the_cost_model_cannot_price_are_timed_not_a_crash(monkeypatch):
    """FLOP counting fails on the GPU for some graphs (MEASURED.md: `no estimate for segment 'glue_0'`)."""
    monkeypatch.setattr(planning, "count_segments", lambda seg, inputs, batch: {})
    model = TwoLayer().eval()
    c = dynaflow.compile(model, strategy=_auto(), executor="serial")
    x = torch.randn(8, D)
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), atol=1e-5, rtol=1e-5)
    g = c.graphs[0]
    names = {s.name for s in g.segmented.segments}
    assert set(g.costs.measured[8]) == names and all(g.costs.measured[8][n] for n in names)
    (result,) = g.tuned.values()
    assert all(t.predicted is not None for t in result.trials if "not applicable" not in t.note)
    assert result.winner.measured is not None


@pytest.mark.parametrize("strategy", ["auto"])
def test_a_graph_that_writes_its_inputs_is_measured_on_copies(strategy):
    model = Writes().eval()
    c = dynaflow.compile(model, strategy=_auto(), executor="serial")
    x, cache = torch.randn(6, D), torch.randn(6, L, D)
    ref_cache = cache.clone()
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(c(x, cache), model(x, ref_cache), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache, ref_cache, atol=1e-5, rtol=1e-5)  # measuring wrote nothing here
    (result,) = c.graphs[0].tuned.values()
    assert result.winner.measured is not None  # it used to predict only when the graph writes its inputs


class Appends(nn.Module):
    """A static cache: each step writes its rows at the cache's fill level and advances the level, a tensor
    written in place (transformers' ``StaticLayer.cumulative_length``)."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        cache.index_copy_(1, torch.arange(1) + level, x.unsqueeze(1))
        level.add_(1)
        return cache.sum(1) * 2


@pytest.mark.parametrize("executor", ["serial", "cuda"])
def test_each_timed_run_starts_from_the_callers_cache_fill_level(fake_cuda, executor):
    """Timing repeats a step on private copies; each repeat must start from the caller's values. A copy stepped
    again and again advanced the level past the cache's end: a raw IndexError on a step eager runs (``generate``
    with a static cache under ``auto``, one step before the cache is full)."""
    model = Appends()
    c = dynaflow.compile(model, strategy=_auto(), executor=executor)
    x, cache, level = torch.randn(6, D), torch.zeros(6, 4, D), torch.tensor(3)
    ref_cache, ref_level = cache.clone(), level.clone()
    with torch.no_grad():
        torch.testing.assert_close(c(x, cache, level), model(x, ref_cache, ref_level))
    torch.testing.assert_close(cache, ref_cache)
    assert int(level) == int(ref_level) == 4
    (result,) = c.graphs[0].tuned.values()
    assert result.winner.measured is not None


def _fake_clock(monkeypatch, graphed_s: float, eager_s: float, passthrough_s: float = 1.0) -> list[bool]:
    """Measured time by how the candidate ran: the real executor runs (outputs are checked), the clock is fixed."""
    seen: list[bool] = []
    real = tuning_planner.median_seconds

    def median_seconds(fn, repeats, sync=None, before=None):
        real(fn, 1, sync, before)
        if getattr(median_seconds, "passthrough", False):
            return passthrough_s
        graphed = bool(getattr(median_seconds, "graphs", False))
        seen.append(graphed)
        return graphed_s if graphed else eager_s

    orig_measure = tuning_planner.GraphPlanner.measure

    def measure(self, plan, inputs, repeats, graphs=False, passthrough=False):
        median_seconds.graphs, median_seconds.passthrough = graphs, passthrough
        return orig_measure(self, plan, inputs, repeats, graphs, passthrough)

    monkeypatch.setattr(tuning_planner, "median_seconds", median_seconds)
    monkeypatch.setattr(tuning_planner.GraphPlanner, "measure", measure)
    return seen


@pytest.mark.parametrize("graph_wins", [True, False])
def test_on_a_graph_capturing_executor_each_measured_candidate_is_also_measured_as_a_graph(
        fake_cuda, monkeypatch, graph_wins):
    seen = _fake_clock(monkeypatch, graphed_s=1e-3 if graph_wins else 3e-3, eager_s=2e-3)
    model = Reads().eval()
    c = dynaflow.compile(model, strategy=_auto(), executor="cuda")
    x, cache = torch.randn(6, D), torch.randn(6, L, D)
    with torch.no_grad():
        for _ in range(5):
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=1e-5, rtol=1e-5)
    g = c.graphs[0]
    (result,) = g.tuned.values()
    measured = [t for t in result.trials if t.measured is not None]
    assert Candidate("sequential") in {t.candidate for t in measured}
    assert Candidate("sequential", graphs=True) in {t.candidate for t in measured}  # the floor, both ways
    planned = [t for t in measured if t.candidate != Candidate("eager")]  # the floor runs as is, never as a graph
    assert {t.candidate.with_graphs() for t in planned} == {t.candidate for t in planned if t.candidate.graphs}
    assert result.winner.candidate.graphs is graph_wins and seen.count(True) == seen.count(False)
    ex = g._executors["cuda"]
    assert bool(ex.graphs.captured(c.program)) is graph_wins  # the winner runs the way it was measured
    assert "+cuda-graph" in c.explain()


def test_a_cached_graph_winner_round_trips():
    cand = Candidate("nanoflow", (("nano_batches", 2),), graphs=True)
    assert Candidate.from_json(cand.to_json()) == cand and cand.build().graphs
    assert not Candidate("nanoflow", (("nano_batches", 2),)).build().graphs
    with pytest.raises(dynaflow.DynaflowError, match="'graphs' must be true or false"):
        Candidate.from_json({"strategy": "nanoflow", "options": {}, "graphs": "yes"})


def test_the_captured_graph_as_is_is_always_measured_and_wins_when_fastest(fake_cuda, monkeypatch):
    """The ``eager`` floor: measured in every search; when nothing beats it, the bucket runs the captured graph
    itself (no executor), so ``auto`` is never slower than what Dynamo alone would run."""
    _fake_clock(monkeypatch, graphed_s=2e-3, eager_s=2e-3, passthrough_s=1e-3)
    model = Reads().eval()
    c = dynaflow.compile(model, strategy=_auto(), executor="cuda")
    x, cache = torch.randn(6, D), torch.randn(6, L, D)
    with torch.no_grad():
        c(x, cache)
        g = c.graphs[0]
        ex = g._executors["cuda"]
        runs = []
        monkeypatch.setattr(ex, "run", lambda *a, **k: runs.append(a) or pytest.fail("the executor ran"))
        for _ in range(3):
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=1e-5, rtol=1e-5)
    (result,) = g.tuned.values()
    assert result.winner.candidate == Candidate("eager") and "captured graph as is" in result.reason
    assert not runs and Candidate("eager", graphs=True) not in {t.candidate for t in result.trials}


def test_no_floor_runs_as_is_when_every_step_is_a_configured_cuda_graph(fake_cuda, monkeypatch):
    _fake_clock(monkeypatch, graphed_s=2e-3, eager_s=2e-3, passthrough_s=1e-3)
    c = dynaflow.compile(Reads().eval(), strategy=_auto(), executor="cuda", config={"cuda_graphs": True})
    with torch.no_grad():
        for _ in range(3):
            c(torch.randn(6, D), torch.randn(6, L, D))
    (result,) = c.graphs[0].tuned.values()
    assert Candidate("eager") not in {t.candidate for t in result.trials}


@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_the_eager_strategy_runs_the_captured_graph_and_equals_eager(executor):
    model = Writes().eval()
    c = dynaflow.compile(model, strategy="eager", executor=executor)
    x, cache = torch.randn(5, D), torch.randn(5, L, D)
    ref_cache = cache.clone()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(c(x, cache), model(x, ref_cache), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(cache, ref_cache, atol=1e-6, rtol=1e-6)
    g = c.graphs[0]
    assert g.last_plan.split.num == 1 and not g._executors and c.last_timeline is None  # no executor ran


@torch.library.custom_op("dftest::hidden_state", mutates_args=())
def _hidden_state(x: torch.Tensor) -> torch.Tensor:
    _HIDDEN.append(1)  # state outside the op's arguments, as an engine's KV-cache write through its context
    return x * 2


@_hidden_state.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_HIDDEN: list[int] = []


class Hidden(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dftest.hidden_state(x) + 1


def test_a_graph_with_ops_whose_effects_are_unseen_is_not_run_again_to_time_it():
    from dynaflow.frontend.aten_rules import register_batch_rule, rows

    register_batch_rule("dftest::hidden_state", rows(x=0))
    _HIDDEN.clear()
    c = dynaflow.compile(Hidden(), strategy=_auto(), executor="serial")
    with torch.no_grad():
        c(torch.randn(6, 4))
    (result,) = c.graphs[0].tuned.values()
    assert all(t.measured is None for t in result.trials) and result.reason.endswith("nothing measured")


def test_ops_tagged_pure_are_run_again_to_time_them():
    """The user's word that an op writes nothing hidden (the ``pure`` hint on its segment) lets auto measure."""
    from dynaflow.frontend.aten_rules import register_batch_rule, rows

    register_batch_rule("dftest::hidden_state", rows(x=0))
    rules = [dynaflow.Op("dftest.hidden_state", tags=("pure",))]
    c = dynaflow.compile(Hidden(), strategy=_auto(), executor="serial", config={"rules": rules})
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(c(x), x * 2 + 1)
    (result,) = c.graphs[0].tuned.values()
    assert any(t.measured is not None for t in result.trials)
    assert any("pure" in s.hints for s in c.graphs[0].segmented.segments)


def test_a_bucket_the_floor_wins_runs_the_model_itself_without_dynamo(monkeypatch):
    """Once a call of a model captured whole ran as is (the ``eager`` strategy, or ``auto``'s floor winning), later
    calls of that batch size skip Dynamo's guards and run the model itself; another batch size, or another
    request layout, goes through Dynamo (and the planner) first."""
    model = Writes().eval()
    c = dynaflow.compile(model, strategy="eager")
    x, cache = torch.randn(5, D), torch.randn(5, L, D)
    ref_cache = cache.clone()
    with torch.no_grad():
        torch.testing.assert_close(c(x, cache), model(x, ref_cache), atol=1e-6, rtol=1e-6)
        assert c.direct_calls == 0
        dynamo = c._compiled
        monkeypatch.setattr(c, "_compiled", lambda *a, **k: pytest.fail("Dynamo ran for a bucket the floor won"))
        for _ in range(2):
            torch.testing.assert_close(c(x, cache), model(x, ref_cache), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(cache, ref_cache, atol=1e-6, rtol=1e-6)
        assert c.direct_calls == 2 and c.graphs[0].calls == 1
        monkeypatch.setattr(c, "_compiled", dynamo)
        x3, cache3 = torch.randn(3, D), torch.randn(3, L, D)
        torch.testing.assert_close(c(x3, cache3.clone()), model(x3, cache3.clone()), atol=1e-6, rtol=1e-6)
        assert c.direct_calls == 2 and c.graphs[0].calls == 2  # a new batch size: through Dynamo first
        with dynaflow.requests([2, 3]):
            c(x, cache.clone())
        assert c.direct_calls == 2 and c.graphs[0].calls == 3  # a new request layout: likewise
        longer = torch.randn(5, L + 2, D)
        torch.testing.assert_close(c(x, longer.clone()), model(x, longer.clone()), atol=1e-6, rtol=1e-6)
        assert c.direct_calls == 2  # the same batch with another shape elsewhere (decode after prefill): Dynamo
        c(x, longer.clone())
        assert c.direct_calls == 3  # and then it is known too


class _Breaks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1


def test_a_model_with_graph_breaks_never_skips_dynamo():
    c = dynaflow.compile(_Breaks(), strategy="eager")
    x = torch.randn(4, D)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(c(x), x * 2 + 1)
    assert c.direct_calls == 0 and c.graph_breaks and len(c.graphs) == 2


def test_other_strategies_never_skip_dynamo():
    model = Writes().eval()
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2)
    with torch.no_grad():
        for _ in range(3):
            c(torch.randn(4, D), torch.randn(4, L, D))
    assert c.direct_calls == 0 and c.graphs[0].calls == 3


def test_auto_on_a_graph_with_nothing_to_time_never_divides_by_zero():
    """A graph holding only a marker predicts 0 s for every candidate (found by the random-model search: a
    ZeroDivisionError escaped ``auto`` when a split happened to measure fastest)."""
    from dynaflow.ir import SplitConfig
    from dynaflow.strategies.auto import Candidate
    from dynaflow.tune import autotune

    seq, split = (Candidate.from_json({"strategy": s, "options": o})
                  for s, o in (("sequential", {}), ("round_robin", {"nano_batches": 2})))
    result = autotune([seq, split], "b", lambda c: (SplitConfig.whole(4), 0.0), {seq: 2e-6, split: 1e-6}.get)
    assert result.winner.candidate == split and "1.00x predicted" in result.reason


def test_a_bucket_auto_runs_as_a_graph_repeats_without_planning_and_a_new_bucket_is_planned(fake_cuda, monkeypatch):
    """A decode loop's step in a bucket ``auto`` measured fastest as a graph skips planning, as a
    ``cuda_graphs=True`` call does; another batch is planned (and tuned) anew, and every answer equals eager."""
    _fake_clock(monkeypatch, graphed_s=1e-3, eager_s=2e-3)
    model = Reads().eval()
    c = dynaflow.compile(model, strategy=_auto(), executor="cuda")
    x, cache = torch.randn(6, D), torch.randn(6, L, D)
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=1e-5, rtol=1e-5)
        g = c.graphs[0]
        planned: list[int] = []
        real = g.plan_for
        monkeypatch.setattr(g, "plan_for", lambda inputs, *rest: planned.append(1) or real(inputs, *rest))
        for _ in range(3):
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=1e-5, rtol=1e-5)
        assert not planned and g.last_capture is not None
        torch.testing.assert_close(c(x[:4], cache[:4]), model(x[:4], cache[:4]), atol=1e-5, rtol=1e-5)
        assert planned and g.last_plan.split.batch_size == 4
        assert len(g.tuned) == 2
