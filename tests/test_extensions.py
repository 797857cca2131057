"""Adding an executor or a strategy is one class plus one registration line, from outside the package, and
``strategy="auto"`` searches a registered strategy with no edit to dynaflow (issue 12)."""

from __future__ import annotations

import pytest
import torch

import dynaflow
from dynaflow.backend import Executor, executors
from dynaflow.backend.launch import run_serial
from dynaflow.errors import ConfigError
from dynaflow.ir import Lane, Schedule
from dynaflow.nanocontext import nano_context
from models import make_mlp, mlp_input


class CountingExecutor(Executor):
    """A toy executor: the shared serial step loop, counting the launches it ran."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0

    def run(self, program, inputs, *, capture=False):
        step = self.begin_step(program, inputs)
        run_serial(step)
        self.launches += program.num_launches
        return self.outputs(program, step.env)


class Reversed(dynaflow.Strategy):
    """A toy strategy: nano-batches on one lane, later nano-batches of each segment first."""

    name = "toy_reversed"

    @classmethod
    def search_candidates(cls, space):
        return [{"nano_batches": n} for n in space.nano_counts]

    def plan(self, graph, split):
        ops = sorted(graph.ops, key=lambda op: (graph.index(op.segment), -op.nano))
        return Schedule.from_lanes(self.name, split, {Lane("main"): ops})


@pytest.fixture
def registries(monkeypatch):
    """Registrations made by a test are undone after it."""
    from dynaflow.strategies import registry

    monkeypatch.setattr(executors, "_factories", dict(executors._factories))
    monkeypatch.setattr(registry, "_factories", dict(registry._factories))


def test_a_toy_executor_is_one_class_and_one_registration_line(registries):
    with pytest.raises(ConfigError, match=r"executor='counting' is not one of"):
        dynaflow.compile(make_mlp(), executor="counting")
    executors.register("counting", CountingExecutor)  # the one line
    model = make_mlp().eval()
    x = mlp_input(6)
    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor="counting")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    ex = fast.last_graph._executors["counting"]
    assert isinstance(ex, CountingExecutor) and ex.launches == fast.program.num_launches


def test_a_toy_executor_honours_the_engine_context(registries):
    """The step context carries the engine's nano-batch provider to every executor built on the seam."""
    from test_nanocontext import RULES, StatefulModel, _provider, _reference, engine_state

    executors.register("counting", CountingExecutor)
    model = StatefulModel().eval()
    x = torch.randn(6, 8)
    scale = torch.arange(1, 7, dtype=torch.float32)
    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=3, rules=RULES, executor="counting")
    with torch.no_grad(), engine_state(scale), nano_context(_provider(scale)):
        torch.testing.assert_close(fast(x), _reference(model, x, scale))


def test_auto_searches_a_strategy_registered_from_outside(registries, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAFLOW_CACHE_DIR", str(tmp_path))
    dynaflow.register_strategy(Reversed)  # the one line
    model = make_mlp().eval()
    x = mlp_input(8)
    fast = dynaflow.compile(model, strategy=dynaflow.strategies.get("auto", measure_top_k=0, cache=False),
                            executor="serial")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    (result,) = fast.last_graph.tuned.values()
    tried = [t for t in result.trials if t.candidate.strategy == "toy_reversed"]
    assert [dict(t.candidate.options)["nano_batches"] for t in tried] == [2, 3, 4]
    assert all(t.predicted is not None for t in tried)


def test_auto_limited_to_named_strategies_skips_the_others(registries):
    from dynaflow.ir import InputInfo, Resource

    dynaflow.register_strategy(Reversed)
    auto = dynaflow.strategies.get("auto", strategies=["round_robin"])
    names = {c.strategy for c in auto.candidates(InputInfo(8), {Resource.COMPUTE})}
    assert names == {"sequential", "eager", "round_robin"}  # the two floors are always searched
