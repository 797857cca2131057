"""Property tests: any valid schedule computes the same thing, and verify() rejects the invalid ones.

The models are exported with ``torch.export`` (dynamic batch) and compiled from the GraphModule, so the
flat program inputs are exactly the user's inputs and ``lower()`` + the executors can be driven directly.

Oracle: every nano-op computes the same function of the same rows whatever the schedule, so the outputs
of any valid schedule are *bitwise* equal to the sequential (program-order, one lane) program of the same
split; and they equal eager on the full batch within ``atol=rtol=1e-5`` (a few-row nano-batch can take a
different GEMM kernel than the full batch: observed differences <= 6e-8).
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import event, given, settings, strategies as st

import dynaflow
from dynaflow import ALL, ConfigError, Lane, NanoGraph, NanoOp, Schedule, ScheduleError, SplitConfig
from dynaflow.backend import SerialExecutor, ThreadExecutor, lower
from dynaflow.frontend.capture import flat_io
from dynaflow.verify import verify_graph, verify_schedule
from models import grad_off, make_coupled, make_mlp, make_transformer, mlp_input, split_strategies, transformer_input

BATCH = 7
TOL = dict(atol=1e-5, rtol=1e-5)


class Target:
    """A model compiled from its exported GraphModule, with its flat inputs and eager reference."""

    def __init__(self, model, x, rules):
        self.model = model
        self.x = x
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
        self.gm = ep.module()
        self.flatten, self.unflatten = flat_io(self.gm)
        self.flat = list(self.flatten(x))
        with grad_off():
            self.ref = model(x)
            self.compiled = dynaflow.compile(self.gm, strategy="round_robin", nano_batches=2, rules=rules,
                                             executor="serial")
            torch.testing.assert_close(self.compiled(x), self.ref, **TOL)
        self.cgraph = self.compiled.graphs[0]
        self.segmented = self.cgraph.segmented

    def graph(self, split: SplitConfig) -> NanoGraph:
        return NanoGraph(self.segmented.segments, self.segmented.segment_deps(), split)

    def run(self, graph: NanoGraph, schedule: Schedule, executor) -> torch.Tensor:
        program = lower(self.segmented, graph, schedule)
        with grad_off():
            return self.unflatten(executor.run(program, self.flat))


@pytest.fixture(scope="module")
def targets():
    return {
        # 5 chained split segments (glue/linear alternating)
        "mlp": Target(make_mlp(), mlp_input(BATCH), [dynaflow.Op("linear")]),
        # split -> barrier (mean over the batch) -> split: whole-batch ops join and fan out
        "coupled": Target(make_coupled(), mlp_input(BATCH), [dynaflow.Op("linear")]),
        # default rules: attention / mlp / glue segments, 2 layers
        "transformer": Target(make_transformer(), transformer_input(BATCH), None),
    }


def test_targets_have_the_expected_structure(targets):
    kinds = {name: [s.kind for s in t.segmented.segments] for name, t in targets.items()}
    assert len(kinds["mlp"]) >= 5 and all(k is dynaflow.SegmentKind.SPLIT for k in kinds["mlp"])
    assert dynaflow.SegmentKind.BARRIER in kinds["coupled"]
    names = [s.name for s in targets["transformer"].segmented.segments]
    assert "attention_0" in names and "mlp_1" in names
    # the NanoGraph the compiled model planned equals the one rebuilt here
    t = targets["transformer"]
    planned = t.cgraph.last_plan.graph
    rebuilt = t.graph(planned.split)
    assert planned.ops == rebuilt.ops and set(planned.g.edges) == set(rebuilt.g.edges)


# -- strategies for drawing ----------------------------------------------------------------------------
@st.composite
def splits(draw, batch=BATCH, max_nano=4):
    """An even split, or an arbitrary composition of ``batch`` into 1..max_nano positive sizes."""
    n = draw(st.integers(1, min(max_nano, batch)))
    if draw(st.booleans()):
        return SplitConfig.even(batch, n)
    cuts = sorted(draw(st.sets(st.integers(1, batch - 1), min_size=n - 1, max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, batch]
    return SplitConfig(tuple(b - a for a, b in zip(bounds, bounds[1:])))


def draw_linear_extension(data, graph: NanoGraph) -> list[NanoOp]:
    """A random topological order of ``graph.g``: each step picks one of the ready ops (shrinks towards
    taking the earliest-ready op, i.e. close to program order)."""
    indeg = {op: graph.g.in_degree(op) for op in graph.ops}
    ready = [op for op in graph.ops if indeg[op] == 0]
    order = []
    while ready:
        op = ready.pop(data.draw(st.integers(0, len(ready) - 1), label="pick"))
        order.append(op)
        for user in graph.users(op):
            indeg[user] -= 1
            if indeg[user] == 0:
                ready.append(user)
    assert len(order) == len(graph.ops)
    return order


def draw_schedule(data, graph: NanoGraph, name: str = "random") -> Schedule:
    """Random lane count 1..4, random lane per op; each lane's order is a subsequence of a linear extension."""
    order = draw_linear_extension(data, graph)
    k = data.draw(st.integers(1, 4), label="lanes")
    assign = data.draw(st.lists(st.integers(0, k - 1), min_size=len(order), max_size=len(order)), label="assign")
    lanes = {Lane(f"L{i}"): [op for op, a in zip(order, assign) if a == i] for i in range(k)}
    return Schedule.from_lanes(name, graph.split, lanes)


def _sequential(graph: NanoGraph) -> Schedule:
    return Schedule.from_lanes("sequential", graph.split, {Lane("main"): list(graph.ops)})


def _assert_same(out, oracle, ref):
    assert torch.equal(out, oracle), f"max diff vs sequential program {(out - oracle).abs().max().item()}"
    torch.testing.assert_close(out, ref, **TOL)


# -- random valid schedules ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "coupled", "transformer"])
@given(data=st.data())
def test_random_valid_schedule_matches_eager(targets, name, data):
    t = targets[name]
    split = data.draw(splits(), label="split")
    graph = t.graph(split)
    verify_graph(graph)
    schedule = draw_schedule(data, graph)
    verify_schedule(schedule, graph)  # every lane assignment of a linear extension is valid
    oracle = t.run(graph, _sequential(graph), SerialExecutor())
    serial = t.run(graph, schedule, SerialExecutor())
    _assert_same(serial, oracle, t.ref)
    threaded_ex = ThreadExecutor(wait_timeout=30)
    try:
        threaded = t.run(graph, schedule, threaded_ex)
    finally:
        threaded_ex.close()
    _assert_same(threaded, oracle, t.ref)
    # the thread executor really ran every launch on the lane the schedule asked for
    tl = threaded_ex.last_timeline
    assert sorted(e.op for e in tl.events) == sorted(repr(op) for op in graph.ops)
    for ev in tl.events:
        lane = next(l for l, ops in zip(schedule.lanes, schedule.order) if any(repr(o) == ev.op for o in ops))
        assert ev.lane == lane.name


@given(data=st.data())
def test_program_serial_order_respects_lanes_and_dependencies(targets, data):
    t = targets[data.draw(st.sampled_from(sorted(targets)), label="target")]
    graph = t.graph(data.draw(splits(), label="split"))
    schedule = draw_schedule(data, graph)
    program = lower(t.segmented, graph, schedule)
    order = [launch.op for launch in program.serial_order]
    assert sorted(order) == sorted(graph.ops)
    pos = {op: i for i, op in enumerate(order)}
    for u, v in graph.g.edges:
        assert pos[u] < pos[v]
    for ops in schedule.order:
        assert [pos[op] for op in ops] == sorted(pos[op] for op in ops)
    # every cross-lane dependency is covered by a wait (directly or by a later op of the same lane)
    lane_of = {op: li for li, ops in enumerate(schedule.order) for op in ops}
    for li, instrs in enumerate(program.streams):
        waited = {}  # lane -> max position waited on so far
        for ins in instrs:
            if isinstance(ins, dynaflow.backend.Wait):
                lj = lane_of[ins.op]
                waited[lj] = max(waited.get(lj, -1), schedule.order[lj].index(ins.op))
                continue
            for dep in graph.deps(ins.op):
                lj = lane_of[dep]
                if lj != li:
                    assert waited.get(lj, -1) >= schedule.order[lj].index(dep), f"{ins.op} does not wait for {dep}"


# -- invalid schedules ---------------------------------------------------------------------------------
@given(data=st.data())
def test_dependency_later_on_same_lane_is_rejected(targets, data):
    t = targets[data.draw(st.sampled_from(sorted(targets)), label="target")]
    graph = t.graph(data.draw(splits(), label="split"))
    schedule = draw_schedule(data, graph)
    edges = sorted(graph.g.edges, key=lambda e: (graph.ops.index(e[0]), graph.ops.index(e[1])))
    u, v = data.draw(st.sampled_from(edges), label="edge")
    # move the producer u onto v's lane, right after v
    order = [list(ops) for ops in schedule.order]
    for ops in order:
        if u in ops:
            ops.remove(u)
    lane = next(ops for ops in order if v in ops)
    lane.insert(lane.index(v) + 1, u)
    bad = Schedule("late_dep", graph.split, schedule.lanes, tuple(tuple(o) for o in order))
    with pytest.raises(ScheduleError, match=r"Strategy 'late_dep'.*(dependency violated|cycle)"):
        verify_schedule(bad, graph)


@given(data=st.data())
def test_cross_lane_cycle_is_rejected(targets, data):
    """Two edges u1->v1 (nano i) and u2->v2 (nano j != i) of split ops; lane A = [v1, u2], lane B = [v2, u1]:
    v1 waits for u1 behind v2, which waits for u2 behind v1. All other ops on lane C in program order."""
    t = targets[data.draw(st.sampled_from(sorted(targets)), label="target")]
    n = data.draw(st.integers(2, 4), label="nano")
    graph = t.graph(SplitConfig.even(BATCH, n))
    split_edges = [(u, v) for u, v in graph.g.edges if u.nano != ALL and v.nano != ALL]
    e1 = data.draw(st.sampled_from(sorted(split_edges)), label="e1")
    others = sorted((u, v) for u, v in split_edges if u.nano != e1[0].nano)
    e2 = data.draw(st.sampled_from(others), label="e2")
    (u1, v1), (u2, v2) = e1, e2
    lane_a, lane_b = [v1, u2], [v2, u1]
    rest = [op for op in graph.ops if op not in lane_a + lane_b]
    bad = Schedule.from_lanes("crossed", graph.split, {Lane("A"): lane_a, Lane("B"): lane_b, Lane("C"): rest})
    with pytest.raises(ScheduleError) as info:
        verify_schedule(bad, graph)
    msg = str(info.value)
    assert "Strategy 'crossed'" in msg and "cycle (a deadlock)" in msg


@given(data=st.data())
def test_verify_agrees_with_acyclicity_oracle(targets, data):
    """A linear extension disturbed by 0..3 random transpositions, dealt over 1..3 lanes: verify() accepts
    exactly the schedules whose lane orders plus dependencies are acyclic (deadlock-free)."""
    t = targets[data.draw(st.sampled_from(sorted(targets)), label="target")]
    graph = t.graph(data.draw(splits(max_nano=3), label="split"))
    ops = draw_linear_extension(data, graph)
    for _ in range(data.draw(st.integers(0, 3), label="swaps")):
        i = data.draw(st.integers(0, len(ops) - 1), label="i")
        j = data.draw(st.integers(0, len(ops) - 1), label="j")
        ops[i], ops[j] = ops[j], ops[i]
    k = data.draw(st.integers(1, 3), label="lanes")
    assign = data.draw(st.lists(st.integers(0, k - 1), min_size=len(ops), max_size=len(ops)), label="assign")
    lanes = {Lane(f"L{i}"): [op for op, a in zip(ops, assign) if a == i] for i in range(k)}
    schedule = Schedule.from_lanes("perm", graph.split, lanes)
    combined = nx.DiGraph(graph.g)
    for lane_ops in schedule.order:
        combined.add_edges_from(zip(lane_ops, lane_ops[1:]))
    if nx.is_directed_acyclic_graph(combined):
        event("deadlock-free")
        verify_schedule(schedule, graph)
        out = t.run(graph, schedule, SerialExecutor())
        torch.testing.assert_close(out, t.ref, **TOL)
    else:
        event("deadlock")
        with pytest.raises(ScheduleError, match=r"Strategy 'perm'.*(dependency violated|cycle)"):
            verify_schedule(schedule, graph)


# -- batch sizes and nano-batch counts through dynaflow.compile ----------------------------------------
@settings(max_examples=15)
@given(
    model_name=st.sampled_from(["mlp", "transformer"]),
    strategy=st.sampled_from(split_strategies()),
    nano=st.integers(1, 4),
    batches=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    executor=st.sampled_from(["serial", "thread", "sim"]),
    mode=st.sampled_from(["no_grad", "inference"]),
)
def test_compile_any_batch_and_nano_count(model_name, strategy, nano, batches, executor, mode):
    torch._dynamo.reset()  # each example compiles afresh: stay below Dynamo's recompile limit
    make, make_input = {"mlp": (make_mlp, mlp_input), "transformer": (make_transformer, transformer_input)}[model_name]
    model = make()
    compiled = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor=executor)
    with grad_off(mode):
        for batch in batches:
            x = make_input(batch)
            if nano > batch:
                with pytest.raises(ConfigError, match=rf"nano_batches={nano}.*batch of {batch} rows"):
                    compiled(x)
                continue
            out = compiled(x)
            ref = model(x)
            # the graph that serves this batch (a batch of 1 runs its own static capture)
            split = next(g for g in compiled.graphs if batch in g.plans).plans[batch].split
            assert split == SplitConfig.even(batch, nano)
            if nano == 1:
                assert torch.equal(out, ref)
            else:
                torch.testing.assert_close(out, ref, **TOL)
                sliced = torch.cat([model(x[s:e]) for s, e in split.boundaries])
                assert torch.equal(out, sliced)
