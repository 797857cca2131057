"""The simulator: hand-computed makespans on synthetic cost tables, contention, SM shares, the ``sim``
executor, and its predicted ordering of strategies against the thread executor's measured ordering."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow.frontend.aten_rules import pointwise, register_batch_rule
from dynaflow.backend.program import Launch, Program, Wait
from dynaflow.backend.sim import simulate
from dynaflow.cost import TableCost
from dynaflow.errors import BackendError
from dynaflow.ir import Lane, NanoOp, Resource, Schedule, Segment, SplitConfig
from models import grad_off

MS = 1e-3


def _seg(name: str, resource: str = "compute") -> Segment:
    return Segment(name, 0, Resource(resource))


def _program(lanes: dict[str, list[tuple[str, str, int]]], waits: dict[tuple[str, int], tuple[str, int]] = (),
             sizes=(4,), sm: dict[str, int] | None = None) -> Program:
    """A Program from lane lists of (segment, resource, nano); ``waits[(seg, nano)] = (seg, nano)`` makes the
    first launch wait on the second one's event."""
    waits = dict(waits)
    events = {src: i for i, src in enumerate(sorted(set(waits.values())))}
    lane_objs = tuple(Lane(name, sm_count=(sm or {}).get(name)) for name in lanes)
    streams = []
    order = []
    for name, ops in lanes.items():
        instrs = []
        for seg, res, nano in ops:
            if (seg, nano) in waits:
                src = waits[(seg, nano)]
                instrs.append(Wait(events[src], NanoOp(*src)))
            launch = Launch(NanoOp(seg, nano), _seg(seg, res), None, (), (), False, (), events.get((seg, nano)), name)
            instrs.append(launch)
            order.append(launch)
        streams.append(tuple(instrs))
    split = SplitConfig(tuple(sizes))
    schedule = Schedule.from_lanes("synthetic", split, {lane: [] for lane in lane_objs})
    return Program(lane_objs, tuple(streams), 0, 0, (), len(events), tuple(order), tuple(() for _ in order), None, {},
                   split.batch_size, split, schedule)


def test_one_lane_is_the_sum():
    p = _program({"main": [("a", "compute", 0), ("b", "memory", 0), ("c", "compute", 0)]})
    t = simulate(p, TableCost({"a": 3 * MS, "b": 2 * MS, "c": 1 * MS}))
    assert t.makespan == pytest.approx(6 * MS, rel=1e-12)
    assert [(e.op, round(e.start / MS, 9), round(e.end / MS, 9)) for e in t.events] == [
        ("a[nb0]", 0, 3), ("b[nb0]", 3, 5), ("c[nb0]", 5, 6)]


def test_two_lanes_different_resources_overlap_perfectly():
    p = _program({"compute": [("a", "compute", 0)], "memory": [("b", "memory", 0)]})
    t = simulate(p, TableCost({"a": 3 * MS, "b": 2 * MS}))
    assert t.makespan == pytest.approx(3 * MS, rel=1e-12)
    assert t.busy("compute") == pytest.approx(3 * MS) and t.busy("memory") == pytest.approx(2 * MS)


def test_two_compute_lanes_share_the_sms_and_take_the_sum():
    p = _program({"l0": [("a", "compute", 0)], "l1": [("b", "compute", 0)]})
    t = simulate(p, TableCost({"a": 2 * MS, "b": 2 * MS}))
    assert t.makespan == pytest.approx(4 * MS, rel=1e-12)  # each runs at half speed while both run


def test_waits_chain_lanes_like_a_flow_shop():
    # nano-batch i: a_i (compute, 2 ms) then b_i (memory, 3 ms); 3 nano-batches → a + b + 2·max(a, b) = 11 ms
    p = _program(
        {"compute": [("a", "compute", i) for i in range(3)], "memory": [("b", "memory", i) for i in range(3)]},
        waits={("b", i): ("a", i) for i in range(3)}, sizes=(1, 1, 1))
    t = simulate(p, TableCost({"a": 2 * MS, "b": 3 * MS}))
    assert t.makespan == pytest.approx(11 * MS, rel=1e-12)
    b_starts = [e.start / MS for e in t.of_lane("memory")]
    assert b_starts == pytest.approx([2, 5, 8])


def test_wait_latency_is_paid_only_when_the_lane_blocks():
    p = _program({"compute": [("a", "compute", 0)], "memory": [("b", "memory", 0)]}, waits={("b", 0): ("a", 0)})
    t = simulate(p, TableCost({"a": 2 * MS, "b": 1 * MS}), wait_latency=0.5 * MS)
    assert t.makespan == pytest.approx(3.5 * MS)
    q = _program({"compute": [("a", "compute", 0)], "memory": [("c", "memory", 0), ("b", "memory", 0)]},
                 waits={("b", 0): ("a", 0)})
    t = simulate(q, TableCost({"a": 2 * MS, "b": 1 * MS, "c": 5 * MS}), wait_latency=0.5 * MS)
    assert t.makespan == pytest.approx(6 * MS)  # a fired long before the memory lane got to its wait


def test_rows_select_the_cost_table_entry():
    p = _program({"l0": [("a", "compute", 0)], "l1": [("a", "memory", 1)]}, sizes=(3, 1))
    table = TableCost({"a": {1: 1 * MS, 3: 3 * MS}})
    t = simulate(p, table)
    assert {e.op: e.duration / MS for e in t.events} == pytest.approx({"a[nb0]": 3.0, "a[nb1]": 1.0})


def test_sm_partitions_scale_compute_and_remove_contention():
    # Two compute ops, each on half the SMs: each takes twice as long alone, and they no longer contend.
    p = _program({"l0": [("a", "compute", 0)], "l1": [("b", "compute", 0)]}, sm={"l0": 66, "l1": 66})
    t = simulate(p, TableCost({"a": 2 * MS, "b": 2 * MS}), num_sms=132)
    assert t.makespan == pytest.approx(4 * MS, rel=1e-9)
    assert t.events[0].duration == pytest.approx(4 * MS)
    # A compute op on 3/4 of the SMs next to a memory op on 1/4 (bandwidth saturates at 1/4 here).
    q = _program({"c": [("a", "compute", 0)], "m": [("b", "memory", 0)]}, sm={"c": 99, "m": 33})
    t = simulate(q, TableCost({"a": 3 * MS, "b": 1 * MS}, bw_saturation=0.25), num_sms=132)
    assert t.makespan == pytest.approx(4 * MS, rel=1e-9)  # 3 ms / 0.75


def test_two_memory_bound_launches_pay_the_contention_penalty():
    p = _program({"l0": [("a", "memory", 0)], "l1": [("b", "memory", 0)]})
    table = TableCost({"a": 2 * MS, "b": 2 * MS})
    assert simulate(p, table, contention=0.0).makespan == pytest.approx(4 * MS)
    assert simulate(p, table, contention=0.1).makespan == pytest.approx(4.4 * MS)


def test_missing_cost_names_the_segment_and_the_fix():
    p = _program({"main": [("mystery", "compute", 0)]})
    with pytest.raises(BackendError, match=r"no estimate for segment 'mystery'.*dynaflow.profile"):
        simulate(p, TableCost({}))


def test_simulated_deadlock_is_reported_not_hung():
    p = _program({"l0": [("a", "compute", 0), ("b", "compute", 0)], "l1": [("c", "compute", 0), ("d", "compute", 0)]},
                 waits={("a", 0): ("d", 0), ("c", 0): ("b", 0)})
    with pytest.raises(BackendError, match="deadlocks"):
        simulate(p, TableCost({}, default=1 * MS))


# -- the sim executor through dynaflow.compile ----------------------------------------------------------
class Stages(nn.Module):
    """One marked segment per stage; each stage's resource is given by ``kinds``."""

    def __init__(self, kinds, dim: int = 8):
        super().__init__()
        self.kinds = list(kinds)
        self.lins = nn.ModuleList(nn.Linear(dim, dim) for _ in self.kinds)

    def forward(self, x):
        for i, (kind, lin) in enumerate(zip(self.kinds, self.lins)):
            dynaflow.mark(f"s{i}", tags=(kind,))
            x = lin(x)
        return x


def test_sim_executor_returns_exact_outputs_and_the_predicted_timeline():
    torch.manual_seed(0)
    model = Stages(["compute", "memory", "compute", "memory"]).eval()
    table = TableCost({f"s{i}_0": (lambda rows: rows * MS) for i in range(4)})
    compiled = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor="sim", config={"cost": table})
    x = torch.randn(8, 8)
    with grad_off():
        assert torch.equal(compiled(x), torch.cat([model(x[:4]), model(x[4:])]))
    t = compiled.last_timeline
    assert t.executor == "sim" and len(t.events) == compiled.program.num_launches == 8
    # 4 stages alternating compute/memory, 2 nano-batches of 4 rows (4 ms each): a perfect 2-stage pipeline
    # (5 slots of 4 ms), plus the CPU thread hand-off for each of the 3 waits where a lane blocks
    assert t.makespan == pytest.approx(20 * MS + 3 * dynaflow.cost.DEVICES["cpu"].wait_latency, rel=1e-9)


def test_sim_executor_uses_the_roofline_when_no_table_is_given():
    torch.manual_seed(0)
    model = Stages(["compute", "memory"], dim=64).eval()
    compiled = dynaflow.compile(model, strategy="sequential", executor="sim", config={"cost_device": "h200"})
    with grad_off():
        compiled(torch.randn(16, 64))
    t = compiled.last_timeline
    assert t.executor == "sim" and t.makespan > 0
    # two tiny GEMMs on an H200 are launch-overhead bound: 4 µs each
    assert t.makespan == pytest.approx(2 * dynaflow.cost.DEVICES["h200"].launch_overhead, rel=0.05)


# -- predicted ordering vs the thread executor's ordering ---------------------------------------------
# Wall-clock comparisons (predicted vs measured milliseconds) live in benchmarks/sim_accuracy.py: on a busy
# machine they are noise. Here the busy op advances an injected clock instead of sleeping, so the profile is
# exact, and the thread executor is checked for running what the simulator predicted, lane by lane.
_LIB = torch.library.Library("dynaflow_test", "FRAGMENT")
_LIB.define("busy(Tensor x, float fixed_s, float per_row_s) -> Tensor")


class _Clock:
    """A virtual ``time.perf_counter``: the busy op advances it by its cost."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


_CLOCK: list[_Clock] = []


@torch.library.impl(_LIB, "busy", "CompositeExplicitAutograd")
def _busy(x, fixed_s, per_row_s):
    seconds = fixed_s + per_row_s * x.shape[0]
    if _CLOCK:
        _CLOCK[-1].advance(seconds)
    else:
        time.sleep(seconds)  # releases the GIL, like a kernel running on its own unit
    return x + 1


@torch.library.register_fake("dynaflow_test::busy")
def _busy_fake(x, fixed_s, per_row_s):
    return torch.empty_like(x)


# a user kernel needs a batch rule to split (without one it is a barrier): ``busy`` is elementwise in its rows
register_batch_rule("dynaflow_test::busy", pointwise)


class Sleepy(nn.Module):
    """Stages that take ``fixed + per_row · rows`` seconds (of the injected clock, or of wall time)."""

    def __init__(self, kinds, fixed: float, per_row: float):
        super().__init__()
        self.kinds, self.fixed, self.per_row = list(kinds), fixed, per_row

    def forward(self, x):
        for i, kind in enumerate(self.kinds):
            dynaflow.mark(f"s{i}", tags=(kind,))
            x = torch.ops.dynaflow_test.busy(x, self.fixed, self.per_row)
        return x


def _per_lane(timeline) -> dict[str, list[str]]:
    lanes: dict[str, list[str]] = {}
    for e in sorted(timeline.events, key=lambda e: (e.lane, e.start)):
        lanes.setdefault(e.lane, []).append(e.op)
    return lanes


def test_predicted_ordering_matches_the_thread_executor(tmp_path, monkeypatch):
    """Profile on the serial executor (under an injected clock, so the profile is exact), predict three
    candidates with the simulator, run them on the thread executor. Stages alternate compute/memory and take
    ``f + r·rows`` (f = 20 ms, r = 5 ms, 8 rows); by hand: nanoflow with 2 nano-batches is a 5-slot pipeline of
    40 ms = 200 ms, sequential is 4 × 60 = 240 ms, sequential with 4 nano-batches 16 × 30 = 480 ms. The thread
    executor runs the same ops on the same lanes in the predicted per-lane order, with the eager answer."""
    clock = _Clock()
    _CLOCK.append(clock)
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setenv("DYNAFLOW_VERIFY_SPLITS", "0")  # its extra runs of the busy op would advance the clock
    try:
        model = Sleepy(["compute", "memory", "compute", "memory"], fixed=20 * MS, per_row=5 * MS)
        x = torch.zeros(8, 4)
        prof = dynaflow.profile(model, x, sizes=[2, 4, 8], repeats=3)
        path = prof.save(tmp_path / "profile.json")
        device = dataclasses.replace(dynaflow.cost.DEVICES["cpu"], wait_latency=0.0)
        candidates = {"nanoflow/2": ("nanoflow", 2), "sequential/1": ("sequential", 1), "sequential/4": ("sequential", 4)}
        predicted = {}
        for label, (strategy, nano) in candidates.items():
            torch._dynamo.reset()
            sim = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor="sim",
                                   config={"profile": path, "cost_device": device})
            sim(x)
            predicted[label] = sim.last_timeline.makespan
            torch._dynamo.reset()
            real = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor="thread")
            assert torch.equal(real(x), x + 4)
            assert _per_lane(real.last_timeline) == _per_lane(sim.last_timeline), label
    finally:
        _CLOCK.remove(clock)
    order = sorted(predicted, key=predicted.get)
    assert order == ["nanoflow/2", "sequential/1", "sequential/4"], predicted
    assert predicted["nanoflow/2"] == pytest.approx(200 * MS, rel=0.1)  # plus the simulator's contention model
    assert predicted["sequential/1"] == pytest.approx(240 * MS, rel=1e-6)
    assert predicted["sequential/4"] == pytest.approx(480 * MS, rel=1e-6)
