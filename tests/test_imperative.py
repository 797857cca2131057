"""Imperative (DynaFlow-style) strategies and the strategy registry."""

from __future__ import annotations

import asyncio

import pytest
import torch

import dynaflow
from dynaflow import (ALL, Lane, NanoGraph, NanoOp, Resource, Schedule, ScheduleError, Segment, SegmentKind,
                      SplitConfig, StrategyError)
from dynaflow.strategies import ScheduleContext
from models import grad_off, make_coupled, make_mlp, make_transformer, mlp_input, transformer_input

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _restore_registry():
    """Strategies registered by a test do not leak into other tests."""
    saved = dict(dynaflow.strategies.registry._factories)
    yield
    dynaflow.strategies.registry._factories.clear()
    dynaflow.strategies.registry._factories.update(saved)


class PingPong(dynaflow.Strategy):
    """Even nano-batches on lane 'even', odd ones on 'odd'; a whole-batch op waits until every nano-batch
    reached it and runs on 'even'. Recorded once per bucket; counts its recordings."""

    name = "ping_pong"
    default_nano_batches = 2
    recordings = 0

    def lanes(self, graph):
        return [Lane("even", Resource.COMPUTE), Lane("odd", Resource.MEMORY)]

    async def schedule(self, ctx):
        type(self).recordings += 1
        n = ctx.num_nano_batches
        while not ctx.done():
            progressed = False
            for i in range(n):
                op = ctx.peek(i)
                if op is None:
                    continue
                if op.nano == ALL:
                    if all(ctx.peek(j) == op for j in range(n)):  # every nano-batch is at the join
                        await ctx.execute(ctx.pop(i), lane="even")
                        progressed = True
                    continue
                await ctx.execute(ctx.pop(i), lane="even" if i % 2 == 0 else "odd")
                progressed = True
            assert progressed, "PingPong made no progress"


@pytest.fixture
def ping_pong():
    PingPong.recordings = 0
    return PingPong


@pytest.mark.parametrize("executor", ["serial", "thread"])
@pytest.mark.parametrize("make, make_input", [(make_transformer, transformer_input), (make_coupled, mlp_input)],
                         ids=["transformer", "coupled"])
def test_imperative_strategy_recorded_once_per_bucket(ping_pong, executor, make, make_input):
    model = make()
    compiled = dynaflow.compile(model, strategy=ping_pong, nano_batches=3, executor=executor)
    x = make_input(7)
    with grad_off():
        ref = model(x)
        for _ in range(4):
            torch.testing.assert_close(compiled(x), ref, **TOL)
    assert ping_pong.recordings == 1  # recorded at plan time, never per step
    sched = compiled.schedule
    assert sched.strategy == "ping_pong"
    assert [lane.name for lane in sched.lanes] == ["even", "odd"]
    odd = [op for op in sched.order[1]]
    assert odd and all(op.nano % 2 == 1 for op in odd)
    assert all(op.nano in (0, 2, ALL) for op in sched.order[0])
    # a new batch size is a new bucket: recorded once more
    with grad_off():
        x5 = make_input(5)
        torch.testing.assert_close(compiled(x5), model(x5), **TOL)
        compiled(x5)
    assert ping_pong.recordings == 2
    if executor == "thread":
        assert set(compiled.last_timeline.lanes) == {"even", "odd"}


def test_imperative_strategy_by_registered_name(ping_pong):
    dynaflow.register_strategy(ping_pong)
    assert "ping_pong" in dynaflow.strategies.available()
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy="ping_pong", rules=[dynaflow.Op("linear")])
    x = mlp_input(6)
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    assert compiled.last_graph.last_plan.split.num == 2  # the strategy's default_nano_batches
    assert ping_pong.recordings == 1


def test_sync_schedule_without_await_is_also_recorded():
    class Plain(dynaflow.Strategy):
        name = "plain"

        def schedule(self, ctx):  # not async: ctx.execute works without await
            for op in ctx.graph.ops:
                ctx.execute(op)  # default lane: the first declared one

    model = make_mlp()
    compiled = dynaflow.compile(model, strategy=Plain, nano_batches=2)
    x = mlp_input(4)
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    assert compiled.schedule.lanes == (Lane("main"),)
    assert list(compiled.schedule.order[0]) == list(compiled.last_graph.last_plan.graph.ops)


async def _awaits_something_else(self, ctx):
    await asyncio.sleep(0)


async def _names_an_unknown_lane(self, ctx):
    await ctx.execute(ctx.pop(0), lane="nowhere")


async def _forgets_nano_batch_1(self, ctx):
    while (op := ctx.pop(0)) is not None:  # nano-batch 0 only
        await ctx.execute(op)


@pytest.mark.parametrize("name, body, error, pattern", [
    ("sleeper", _awaits_something_else, StrategyError,
     r"Strategy 'sleeper': schedule\(ctx\) awaited .*only await ctx\.execute"),
    ("lost", _names_an_unknown_lane, StrategyError,
     r"Strategy 'lost'.*lane='nowhere'.*declared lanes: \['main'\].*lanes\(\)"),
    ("lazy", _forgets_nano_batch_1, ScheduleError, r"Strategy 'lazy'.*never scheduled"),
], ids=["awaits-other", "unknown-lane", "forgets-ops"])
def test_broken_imperative_strategies_are_rejected_with_the_fix(name, body, error, pattern):
    broken = type(name.title(), (dynaflow.Strategy,), {"name": name, "schedule": body})
    compiled = dynaflow.compile(make_mlp(), strategy=broken, nano_batches=2)
    with pytest.raises(error, match=pattern):
        compiled(mlp_input(4))


def test_depth_first_across_a_barrier_fails_verification():
    """Running nano-batch 0 to completion on ONE lane puts the barrier before nano-batch 1 reached it."""

    class DepthFirst(dynaflow.Strategy):
        name = "naive"

        async def schedule(self, ctx):
            for i in range(ctx.num_nano_batches):
                while (op := ctx.pop(i)) is not None:
                    await ctx.execute(op)

    compiled = dynaflow.compile(make_coupled(), strategy=DepthFirst, nano_batches=2)
    with pytest.raises(ScheduleError, match=r"Strategy 'naive'.*dependency violated") as info:
        compiled(mlp_input(4))
    assert "[all]" in str(info.value) and "[nb1]" in str(info.value)


# -- ScheduleContext directly ---------------------------------------------------------------------------
def _graph(n=2):
    segs = [Segment("a", 0, Resource.COMPUTE), Segment("b", 1, Resource.MEMORY, SegmentKind.BARRIER),
            Segment("c", 2, Resource.COMPUTE)]
    return NanoGraph(segs, [("a", "b"), ("b", "c"), ("a", "c")], SplitConfig.even(5, n))


def test_context_pop_returns_whole_ops_once():
    g = _graph(2)
    ctx = ScheduleContext(dynaflow.strategies.Sequential(), g, [Lane("x"), Lane("y")])
    assert ctx.num_nano_batches == 2
    assert ctx.pop(0) == NanoOp("a", 0)
    assert ctx.peek(0) == NanoOp("b", ALL)
    assert ctx.pop(0) == NanoOp("b", ALL)
    assert ctx.pop(1) == NanoOp("a", 1)
    assert ctx.pop(1) == NanoOp("c", 1)  # b[all] was already taken by nano-batch 0
    assert ctx.pop(1) is None and ctx.done(1) and not ctx.done()
    assert ctx.pop(0) == NanoOp("c", 0)
    assert ctx.done()
    with pytest.raises(StrategyError, match=r"ctx\.pop\(5\) but nano-batches are numbered 0\.\.1"):
        ctx.pop(5)


def test_context_to_schedule_keeps_lane_order():
    g = _graph(2)
    ctx = ScheduleContext(dynaflow.strategies.Sequential(), g, [Lane("x"), Lane("y")])
    ctx.execute(NanoOp("a", 1), lane="y")
    ctx.execute(NanoOp("a", 0), lane=Lane("x"))
    ctx.execute(NanoOp("b", ALL))  # default: first lane
    with pytest.raises(StrategyError, match=r"needs a NanoOp"):
        ctx.execute("c[nb0]", lane="x")
    sched = ctx.to_schedule(notes=["n"])
    assert isinstance(sched, Schedule)
    assert sched.order == ((NanoOp("a", 0), NanoOp("b", ALL)), (NanoOp("a", 1),))
    assert sched.strategy == "sequential" and sched.notes == ("n",)
    # executed ops are no longer offered by pop()
    assert ctx.pop(1) == NanoOp("c", 1)


# -- registry ---------------------------------------------------------------------------------------------
def test_get_by_name_class_instance_and_module_string():
    reg = dynaflow.strategies
    assert type(reg.get("nanoflow")) is reg.NanoFlow
    assert type(reg.get("NanoFlow")) is reg.NanoFlow  # names are case-insensitive
    assert type(reg.get(reg.RoundRobin)) is reg.RoundRobin
    inst = reg.Sequential(nano_batches=3)
    assert reg.get(inst) is inst
    assert type(reg.get("dynaflow.strategies:RoundRobin")) is reg.RoundRobin
    assert type(reg.get("dynaflow.strategies.round_robin:RoundRobin")) is reg.RoundRobin
    assert type(reg.get("test_imperative:PingPong")) is PingPong
    rr = reg.get("round_robin", lanes=3, nano_batches=4)
    assert rr.num_lanes == 3 and rr.nano_batches == 4
    assert repr(rr) == "RoundRobin(nano_batches=4, lanes=3)"


def test_strategy_options_through_compile_config():
    model = make_mlp()
    compiled = dynaflow.compile(model, config={"strategy": "round_robin", "strategy_options": {"lanes": 3},
                                               "nano_batches": 3, "executor": "thread"})
    x = mlp_input(7)
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    assert len(compiled.schedule.lanes) == 3
    assert compiled.strategy.num_lanes == 3


def test_register_strategy_decorator_forms():
    @dynaflow.register_strategy
    class Alpha(dynaflow.Strategy):
        name = "alpha_test"

    @dynaflow.register_strategy("beta_alias")
    class Beta(dynaflow.Strategy):
        name = "beta_test"

    class Gamma(dynaflow.Strategy):
        name = "gamma_test"

    assert dynaflow.register_strategy(Gamma) is Gamma
    names = dynaflow.strategies.available()
    assert {"alpha_test", "beta_alias", "gamma_test"} <= set(names)
    assert "beta_test" not in names  # registered under the alias only
    assert type(dynaflow.strategies.get("beta_alias")) is Beta
    assert type(dynaflow.strategies.get("ALPHA_TEST")) is Alpha
    # registering the same class again is harmless
    dynaflow.register_strategy(Alpha)
    # registered strategies can be used by name in compile
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy="gamma_test", nano_batches=2)
    x = mlp_input(4)
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    assert compiled.schedule.strategy == "gamma_test"


def test_register_strategy_conflicts_and_replace():
    class One(dynaflow.Strategy):
        name = "clash_test"

    class Two(dynaflow.Strategy):
        name = "clash_test"

    dynaflow.register_strategy(One)
    with pytest.raises(StrategyError, match=r"'clash_test' is already registered; pass replace=True"):
        dynaflow.register_strategy(Two)
    dynaflow.register_strategy(Two, replace=True)
    assert type(dynaflow.strategies.get("clash_test")) is Two
    with pytest.raises(StrategyError, match=r"needs a Strategy subclass"):
        dynaflow.register_strategy("not_a_class")(object)


def test_registry_is_restored_between_tests():
    assert "ping_pong" not in dynaflow.strategies.available()
    assert "clash_test" not in dynaflow.strategies.available()
