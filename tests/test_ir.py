"""The IR: SplitConfig, NanoOp, Segment, Lane, NanoGraph, Schedule and the schedule/graph verifiers."""

from __future__ import annotations

import networkx as nx
import pytest
from hypothesis import given, strategies as st

import dynaflow
from dynaflow import (ALL, ConfigError, Lane, NanoGraph, NanoOp, Resource, Schedule, ScheduleError, Segment,
                      SegmentKind, SplitConfig)
from dynaflow.verify import verify_graph, verify_schedule


# -- SplitConfig -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch, n, sizes",
    [
        (7, 3, (3, 2, 2)),
        (6, 3, (2, 2, 2)),
        (5, 2, (3, 2)),
        (5, 4, (2, 1, 1, 1)),
        (7, 4, (2, 2, 2, 1)),
        (5, 1, (5,)),
        (4, 4, (1, 1, 1, 1)),
        (10, 3, (4, 3, 3)),
    ],
)
def test_split_even_sizes(batch, n, sizes):
    cfg = SplitConfig.even(batch, n)
    assert cfg.sizes == sizes
    assert cfg.num == n
    assert cfg.batch_size == batch


def test_split_even_7_into_3_boundaries_and_repr():
    cfg = SplitConfig.even(7, 3)
    assert cfg.boundaries == ((0, 3), (3, 5), (5, 7))
    assert repr(cfg) == "SplitConfig(7 → 3/2/2)"
    assert repr(SplitConfig.whole(4)) == "SplitConfig(4 → 4)"


def test_split_boundaries_uneven_explicit():
    cfg = SplitConfig((1, 4, 2))
    assert cfg.boundaries == ((0, 1), (1, 5), (5, 7))
    assert cfg.batch_size == 7 and cfg.num == 3
    assert repr(cfg) == "SplitConfig(7 → 1/4/2)"


def test_split_whole():
    cfg = SplitConfig.whole(9)
    assert cfg.sizes == (9,)
    assert cfg.boundaries == ((0, 9),)


def test_split_sizes_normalised_to_int_tuple_and_hashable():
    cfg = SplitConfig([3, 2])  # a list is accepted and frozen into a tuple
    assert cfg.sizes == (3, 2) and isinstance(cfg.sizes, tuple)
    assert cfg == SplitConfig.even(5, 2)
    assert hash(cfg) == hash(SplitConfig.even(5, 2))
    assert cfg != SplitConfig((2, 3))


@pytest.mark.parametrize("batch, n", [(3, 4), (5, 6), (1, 2), (5, 0), (5, -1)])
def test_split_even_rejects_bad_counts(batch, n):
    with pytest.raises(ConfigError) as info:
        SplitConfig.even(batch, n)
    msg = str(info.value)
    assert f"nano_batches={n}" in msg
    assert f"batch of {batch} rows" in msg
    assert f"nano_batches<= {batch}" in msg  # the fix


def test_split_rejects_empty_sizes():
    with pytest.raises(ConfigError, match=r"at least one nano-batch size"):
        SplitConfig(())


def test_split_whole_of_no_rows_is_one_empty_nano_batch():
    """A data-parallel rank left without rows still runs its peers' step (their collectives), as one nano-batch."""
    cfg = SplitConfig.whole(0)
    assert cfg.sizes == (0,) and cfg.num == 1 and cfg.batch_size == 0 and cfg.boundaries == ((0, 0),)


@pytest.mark.parametrize("sizes", [(2, 0), (0, 0), (3, -1, 2)])
def test_split_rejects_non_positive_sizes(sizes):
    with pytest.raises(ConfigError, match=r"sizes must all be >= 1") as info:
        SplitConfig(sizes)
    assert "fewer nano-batches" in str(info.value)


def test_split_config_is_a_value_error_and_dynaflow_error():
    with pytest.raises(ValueError):
        SplitConfig.even(2, 3)
    with pytest.raises(dynaflow.DynaflowError):
        SplitConfig.even(2, 3)


@given(st.integers(1, 64).flatmap(lambda b: st.tuples(st.just(b), st.integers(1, b))))
def test_split_even_properties(bn):
    batch, n = bn
    cfg = SplitConfig.even(batch, n)
    assert sum(cfg.sizes) == batch and cfg.num == n
    assert max(cfg.sizes) - min(cfg.sizes) <= 1
    assert list(cfg.sizes) == sorted(cfg.sizes, reverse=True)  # larger parts first
    # boundaries tile [0, batch) without gaps or overlaps
    assert cfg.boundaries[0][0] == 0 and cfg.boundaries[-1][1] == batch
    for (a, b), (c, _), size in zip(cfg.boundaries, cfg.boundaries[1:] + ((batch, batch),), cfg.sizes):
        assert b == c and b - a == size


# -- small IR objects --------------------------------------------------------------------------------
def test_nano_op_repr_and_order():
    assert repr(NanoOp("attn_1", 2)) == "attn_1[nb2]"
    assert repr(NanoOp("glue_0", ALL)) == "glue_0[all]"
    assert ALL == -1
    assert NanoOp("a", 0) == NanoOp("a", 0)
    assert NanoOp("a", 0) != NanoOp("a", 1)
    assert sorted([NanoOp("b", 0), NanoOp("a", 1), NanoOp("a", 0)]) == [NanoOp("a", 0), NanoOp("a", 1), NanoOp("b", 0)]
    assert len({NanoOp("a", 0), NanoOp("a", 0)}) == 1


def test_segment_repr_and_whole():
    s = Segment("mlp_0", 3, Resource.COMPUTE)
    assert repr(s) == "Segment('mlp_0', compute)"
    assert not s.whole
    b = Segment("glue_1", 1, Resource.MEMORY, SegmentKind.BARRIER, frozenset({"no-inductor", "barrier"}))
    assert repr(b) == "Segment('glue_1', memory, barrier, hints={barrier, no-inductor})"
    assert b.whole
    assert Segment("w", 0, Resource.MEMORY, SegmentKind.SHARED).whole


def test_lane_repr_and_validation():
    assert repr(Lane("main")) == "Lane('main')"
    assert repr(Lane("compute", Resource.COMPUTE, 66, priority=1)) == "Lane('compute', compute, sm=66, priority=1)"
    with pytest.raises(ConfigError, match=r"sm_count must be >= 1"):
        Lane("bad", sm_count=0)


def test_input_info_repr():
    assert repr(dynaflow.InputInfo(8)) == "InputInfo(batch=8, cpu, float32)"
    assert repr(dynaflow.InputInfo(8, requested_nano_batches=2)) == "InputInfo(batch=8, cpu, float32, nano_batches=2)"


# -- NanoGraph ---------------------------------------------------------------------------------------
def _segments() -> list[Segment]:
    """a (split) -> b (barrier) -> c (split) -> e (split); w (shared) -> c."""
    return [
        Segment("a", 0, Resource.COMPUTE),
        Segment("b", 1, Resource.MEMORY, SegmentKind.BARRIER),
        Segment("w", 2, Resource.MEMORY, SegmentKind.SHARED),
        Segment("c", 3, Resource.COMPUTE),
        Segment("e", 4, Resource.MEMORY),
    ]


DEPS = [("a", "b"), ("b", "c"), ("w", "c"), ("c", "e"), ("a", "c")]


def _graph(n: int = 3, batch: int = 7) -> NanoGraph:
    return NanoGraph(_segments(), DEPS, SplitConfig.even(batch, n))


def test_nanograph_ops_in_program_order():
    g = _graph(3)
    assert g.ops == (
        NanoOp("a", 0), NanoOp("a", 1), NanoOp("a", 2),
        NanoOp("b", ALL),
        NanoOp("w", ALL),
        NanoOp("c", 0), NanoOp("c", 1), NanoOp("c", 2),
        NanoOp("e", 0), NanoOp("e", 1), NanoOp("e", 2),
    )
    assert len(g) == 11
    assert list(g) == list(g.ops)
    assert NanoOp("c", 1) in g and NanoOp("c", 3) not in g and NanoOp("b", 0) not in g


def test_nanograph_edges():
    g = _graph(3)
    a = [NanoOp("a", i) for i in range(3)]
    c = [NanoOp("c", i) for i in range(3)]
    e = [NanoOp("e", i) for i in range(3)]
    b, w = NanoOp("b", ALL), NanoOp("w", ALL)
    expected = set()
    expected |= {(x, b) for x in a}            # split -> barrier: every nano-batch joins
    expected |= {(b, x) for x in c}            # barrier -> split: fans out
    expected |= {(w, x) for x in c}            # shared -> split: every nano-batch reads it
    expected |= {(a[i], c[i]) for i in range(3)}  # split -> split: same nano-batch only
    expected |= {(c[i], e[i]) for i in range(3)}
    assert set(g.g.edges) == expected
    assert g.deps(c[1]) == [a[1], b, w]  # sorted by program order
    assert g.users(a[0]) == [b, c[0]]
    assert g.users(e[2]) == []
    assert repr(g) == "NanoGraph(5 segments × SplitConfig(7 → 3/2/2), 11 ops, 15 edges)"
    verify_graph(g)  # a well-formed graph passes


def test_nanograph_segment_lookup_and_ops_of_nano():
    g = _graph(2, batch=4)
    assert g.segment(NanoOp("c", 1)).name == "c"
    assert g.segment("b").kind is SegmentKind.BARRIER
    assert g.index("e") == 4
    assert g.ops_of_nano(1) == [NanoOp("a", 1), NanoOp("b", ALL), NanoOp("w", ALL), NanoOp("c", 1), NanoOp("e", 1)]


def test_nanograph_single_nano_batch():
    g = NanoGraph(_segments(), DEPS, SplitConfig.whole(5))
    assert [op.nano for op in g.ops] == [0, ALL, ALL, 0, 0]
    assert (NanoOp("a", 0), NanoOp("c", 0)) in g.g.edges


def test_nanograph_segment_deps_are_deduplicated_and_ordered():
    g = NanoGraph(_segments(), DEPS + [("a", "b"), ("c", "e")], SplitConfig.even(4, 2))
    assert len(g.segment_deps) == len(set(DEPS))
    cons_index = [g.index(c) for _, c in g.segment_deps]
    assert cons_index == sorted(cons_index)


def test_verify_graph_rejects_cross_nano_edge():
    g = _graph(2, batch=4)
    g.g = nx.DiGraph(g.g)  # a thawed copy (a NanoGraph's own is frozen)
    g.g.add_edge(NanoOp("a", 0), NanoOp("c", 1))
    with pytest.raises(ScheduleError, match=r"crosses nano-batches"):
        verify_graph(g)


def test_verify_graph_rejects_cycle():
    g = _graph(2, batch=4)
    g.g = nx.DiGraph(g.g)
    g.g.add_edge(NanoOp("e", 0), NanoOp("a", 0))
    with pytest.raises(ScheduleError, match=r"cycle"):
        verify_graph(g)


# -- Schedule ----------------------------------------------------------------------------------------
def _two_lane_schedule(g: NanoGraph, name: str = "mine") -> Schedule:
    """Split ops of nano 0 and whole ops on lane 'x', other nano-batches on lane 'y', program order each."""
    x, y = Lane("x"), Lane("y")
    lanes = {x: [op for op in g.ops if op.nano in (0, ALL)], y: [op for op in g.ops if op.nano not in (0, ALL)]}
    return Schedule.from_lanes(name, g.split, lanes, notes=["two lanes"])


def test_schedule_from_lanes_basics():
    g = _graph(2, batch=4)
    s = _two_lane_schedule(g)
    assert s.lanes == (Lane("x"), Lane("y"))
    assert s.num_ops == len(g)
    assert s.lane_of(NanoOp("b", ALL)) == Lane("x")
    assert s.lane_of(NanoOp("c", 1)) == Lane("y")
    with pytest.raises(KeyError):
        s.lane_of(NanoOp("zzz", 0))
    assert repr(s) == "Schedule('mine', SplitConfig(4 → 2/2), 2 lanes, 8 ops)"
    assert s.notes == ("two lanes",)
    # notes do not take part in equality
    assert s == Schedule.from_lanes("mine", g.split, dict(zip(s.lanes, s.order)))
    verify_schedule(s, g)


def test_schedule_table_without_graph_is_lane_by_step():
    g = _graph(2, batch=4)
    s = _two_lane_schedule(g)
    lines = str(s).splitlines()
    assert lines[0] == repr(s)
    assert lines[1].startswith("step | Lane('x')") and "Lane('y')" in lines[1]
    assert set(lines[2]) == {"-"}
    rows = lines[3:]
    assert len(rows) == max(len(o) for o in s.order)  # one row per step of the longest lane
    assert rows[0].split("|")[1].strip() == "a[nb0]" and rows[0].split("|")[2].strip() == "a[nb1]"
    assert rows[1].split("|")[1].strip() == "b[all]"


def test_schedule_table_with_graph_uses_dependency_levels():
    g = _graph(2, batch=4)
    s = _two_lane_schedule(g)
    levels = s.levels(g)
    assert levels[NanoOp("a", 0)] == 0 and levels[NanoOp("a", 1)] == 0
    assert levels[NanoOp("b", ALL)] == 1
    assert levels[NanoOp("w", ALL)] == 2   # after b on lane x
    assert levels[NanoOp("c", 0)] == 3 and levels[NanoOp("c", 1)] == 3
    assert levels[NanoOp("e", 1)] == 4
    table = s.table(g)
    row3 = [ln for ln in table.splitlines() if ln.strip().startswith("3 |")][0]
    assert "c[nb0]" in row3 and "c[nb1]" in row3


def test_schedule_levels_of_cyclic_schedule_are_minus_one():
    g = _graph(2, batch=4)
    ops = list(g.ops)
    s = Schedule.from_lanes("cyc", g.split, {Lane("m"): ops[::-1]})
    assert set(s.levels(g).values()) == {-1}
    s.table(g)  # still renders


# -- verify_schedule ---------------------------------------------------------------------------------
def test_verify_accepts_every_builtin_strategy_plan():
    g = _graph(3)
    for name in dynaflow.strategies.available():
        strat = dynaflow.strategies.get(name)
        sched = strat.plan(g, g.split)
        verify_schedule(sched, g)
        assert sorted(op for ops in sched.order for op in ops) == sorted(g.ops)


def test_verify_rejects_wrong_split():
    g = _graph(2, batch=4)
    s = Schedule.from_lanes("oops", SplitConfig((3, 1)), {Lane("m"): list(g.ops)})
    with pytest.raises(ScheduleError, match=r"Strategy 'oops'.*planned for SplitConfig\(4 → 3/1\)"):
        verify_schedule(s, g)


def test_verify_rejects_lane_order_count_mismatch():
    g = _graph(2, batch=4)
    s = Schedule("oops", g.split, (Lane("a"), Lane("b")), (tuple(g.ops),))
    with pytest.raises(ScheduleError, match=r"2 lanes but 1 op lists"):
        verify_schedule(s, g)


def test_verify_rejects_repeated_lane_names():
    g = _graph(2, batch=4)
    s = Schedule("oops", g.split, (Lane("a"), Lane("a", priority=1)), (tuple(g.ops[:3]), tuple(g.ops[3:])))
    with pytest.raises(ScheduleError, match=r"lane names repeat"):
        verify_schedule(s, g)


def test_verify_rejects_duplicate_op():
    g = _graph(2, batch=4)
    ops = list(g.ops)
    s = Schedule.from_lanes("dup", g.split, {Lane("x"): ops, Lane("y"): [ops[0]]})
    with pytest.raises(ScheduleError, match=r"Strategy 'dup'.*more than once: \[a\[nb0\]\]"):
        verify_schedule(s, g)


def test_verify_rejects_unknown_op():
    g = _graph(2, batch=4)
    s = Schedule.from_lanes("unk", g.split, {Lane("x"): list(g.ops) + [NanoOp("ghost", 0)]})
    with pytest.raises(ScheduleError, match=r"not in the graph: \[ghost\[nb0\]\]"):
        verify_schedule(s, g)


def test_verify_rejects_missing_op():
    g = _graph(2, batch=4)
    ops = [op for op in g.ops if op != NanoOp("e", 1)]
    s = Schedule.from_lanes("miss", g.split, {Lane("x"): ops})
    with pytest.raises(ScheduleError, match=r"Strategy 'miss'.*1 op\(s\) never scheduled.*e\[nb1\]"):
        verify_schedule(s, g)


def test_verify_rejects_dependency_later_on_same_lane():
    g = _graph(2, batch=4)
    ops = list(g.ops)
    i, j = ops.index(NanoOp("c", 0)), ops.index(NanoOp("e", 0))
    ops[i], ops[j] = ops[j], ops[i]  # e[nb0] now runs before its producer c[nb0]
    s = Schedule.from_lanes("late", g.split, {Lane("m"): ops})
    with pytest.raises(ScheduleError) as info:
        verify_schedule(s, g)
    msg = str(info.value)
    assert "Strategy 'late'" in msg and "dependency violated on lane Lane('m')" in msg
    assert "e[nb0]" in msg and "c[nb0]" in msg and "Put c[nb0] before e[nb0]" in msg


def test_verify_rejects_cross_lane_cycle():
    g = _graph(2, batch=4)
    y_ops = [NanoOp("a", 1), NanoOp("c", 1)]
    # Valid: lane x runs nano 0 and the whole ops, then e[nb1] (which waits on c[nb1] from lane y).
    x_ok = [NanoOp("a", 0), NanoOp("b", ALL), NanoOp("w", ALL), NanoOp("c", 0), NanoOp("e", 0), NanoOp("e", 1)]
    verify_schedule(Schedule.from_lanes("ok", g.split, {Lane("x"): x_ok, Lane("y"): y_ops}), g)
    # Deadlock: lane x runs e[nb1] (needs c[nb1] on y) before b[all]; lane y's c[nb1] needs b[all] from x.
    # No dependency sits later on its *own* lane, so only the cycle check can catch it.
    x_bad = [NanoOp("a", 0), NanoOp("e", 1), NanoOp("b", ALL), NanoOp("w", ALL), NanoOp("c", 0), NanoOp("e", 0)]
    s_bad = Schedule.from_lanes("deadlock", g.split, {Lane("x"): x_bad, Lane("y"): y_ops})
    with pytest.raises(ScheduleError) as info:
        verify_schedule(s_bad, g)
    msg = str(info.value)
    assert "Strategy 'deadlock'" in msg and "cycle (a deadlock)" in msg
    assert "@x" in msg and "@y" in msg
    assert "dependency violated" not in msg


# -- Timeline ----------------------------------------------------------------------------------------
def test_timeline_statistics_and_perfetto_export(tmp_path):
    import json

    from dynaflow.timeline import Timeline, TimelineEvent, to_perfetto

    events = (
        TimelineEvent("a", "x[nb0]", 0.0, 2.0, "compute"),
        TimelineEvent("b", "y[nb1]", 1.0, 3.0, "memory"),
        TimelineEvent("a", "x[nb1]", 2.0, 4.0, "compute"),
    )
    tl = Timeline(events, "thread")
    assert tl.lanes == ("a", "b")
    assert tl.makespan == 4.0
    assert tl.busy("a") == 4.0 and tl.busy("b") == 2.0
    assert tl.overlap() == pytest.approx(1.5)  # 6 busy seconds over a 4 s makespan
    assert tl.of_lane("b") == (events[1],)
    assert repr(tl).startswith("Timeline(thread: 3 launches on 2 lanes")
    assert Timeline((), "serial").makespan == 0.0 and Timeline(()).overlap() == 0.0
    path = to_perfetto(tl, tmp_path / "sub" / "trace.json")
    data = json.loads(open(path).read())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in spans] == ["x[nb0]", "y[nb1]", "x[nb1]"]
    assert {e["tid"] for e in spans} == {0, 1}
    assert spans[1]["ts"] == pytest.approx(1e6) and spans[1]["dur"] == pytest.approx(2e6)
    names = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"a", "b"}


# -- DynaflowConfig ----------------------------------------------------------------------------------
def test_config_hash_and_replace():
    a = dynaflow.DynaflowConfig(nano_batches=2)
    assert a.compute_hash() == dynaflow.DynaflowConfig(nano_batches=2).compute_hash()
    assert a.compute_hash() != a.replace(nano_batches=3).compute_hash()
    assert a.replace(strategy="sequential").strategy == "sequential" and a.strategy == "nanoflow"
    assert dynaflow.DynaflowConfig.from_dict({"nano_batches": 4, "executor": "serial"}).nano_batches == 4
    with pytest.raises(ConfigError, match=r"nano_batches=0"):
        a.replace(nano_batches=0)
