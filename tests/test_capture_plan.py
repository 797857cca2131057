"""Capture plan (backend/graphs.py) and program checks (backend/checks.py): graph pieces around
``no-cudagraph`` launches, and the missing-wait program that must be caught."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dynaflow
from dynaflow.backend import SerialExecutor, ThreadExecutor
from dynaflow.backend.checks import check_program, drop_wait, map_launches
from dynaflow.backend.graphs import capture_plan, waits_before
from dynaflow.backend.program import Launch, Wait
from dynaflow.errors import BackendError
from models import make_transformer, transformer_input
from programs import program_of, retag

_CACHE: dict = {}


def _prog(strategy="nanoflow", nano=2, batch=6):
    key = (strategy, nano, batch)
    if key not in _CACHE:
        torch._dynamo.reset()
        _CACHE[key] = program_of(make_transformer(), transformer_input(batch), strategy, nano)
    return _CACHE[key]


def _check_plan(p, plan, tagged):
    flat = [l for piece in plan.pieces for l in piece.order]
    assert [id(l) for l in flat] == [id(l) for l in p.serial_order]  # every launch once, in serial order
    for piece in plan.pieces:
        recorded = {l.event for l in piece.order if l.event is not None}
        for lane in piece.lanes:
            for ins in lane:
                if isinstance(ins, Wait):
                    assert ins.event in recorded  # cross-piece waits are covered by the join
        assert all((l.segment.name in tagged) != piece.graph for l in piece.order)
        # per lane, the piece keeps the program's lane order
        for li, lane in enumerate(piece.lanes):
            mine = [i for i in lane if isinstance(i, Launch)]
            full = [i for i in p.streams[li] if isinstance(i, Launch)]
            pos = [full.index(x) for x in mine]
            assert pos == sorted(pos)
    for a, b in zip(plan.pieces, plan.pieces[1:]):
        assert a.graph != b.graph  # maximal runs


def test_untagged_program_is_one_whole_graph_with_all_its_waits():
    p, _, _ = _prog()
    plan = capture_plan(p)
    assert plan.whole and plan.num_graphs == 1
    waits = sum(isinstance(i, Wait) for lane in p.streams for i in lane)
    assert sum(isinstance(i, Wait) for lane in plan.pieces[0].lanes for i in lane) == waits
    _check_plan(p, plan, set())


def test_graphs_off_is_one_eager_piece():
    p, _, _ = _prog()
    plan = capture_plan(p, graphs=False)
    assert len(plan.pieces) == 1 and not plan.pieces[0].graph and plan.num_graphs == 0


def test_no_cudagraph_segment_splits_the_program():
    p, _, _ = _prog()
    tagged = {"attention_0"}
    q = retag(p, tagged, "no-cudagraph")
    plan = capture_plan(q)
    assert not plan.whole and len(plan.pieces) >= 3 and plan.pieces[0].graph
    assert [piece.graph for piece in plan.pieces].count(False) >= 1
    _check_plan(q, plan, tagged)
    assert "eager" in repr(plan)


@pytest.mark.slow  # 20 random captures; the fixed cases above and below run in the default tier
@settings(max_examples=20)
@given(strategy=st.sampled_from(["nanoflow", "round_robin", "sequential"]), nano=st.integers(1, 3),
       mask=st.integers(0, 2 ** 12 - 1))
def test_capture_plan_properties(strategy, nano, mask):
    p, _, _ = _prog(strategy, nano)
    names = sorted({l.segment.name for l in p.serial_order})
    tagged = {n for i, n in enumerate(names) if (mask >> i) & 1}
    q = retag(p, tagged, "no-cudagraph")
    _check_plan(q, capture_plan(q), tagged)


def test_waits_before_partitions_all_waits():
    p, _, _ = _prog()
    before = waits_before(p)
    assert sum(len(w) for w in before.values()) == sum(isinstance(i, Wait) for s in p.streams for i in s)


# -- the deliberately broken program -------------------------------------------------------------------
def test_lowered_programs_pass_the_check():
    for strategy in dynaflow.strategies.available():
        for nano in (1, 2, 3):
            p, _, _ = _prog(strategy, nano)
            check_program(p)


def test_missing_wait_is_caught_by_check_program():
    p, _, _ = _prog()
    broken, removed = drop_wait(p)
    with pytest.raises(BackendError, match=r"reads %\d+, written by .* nothing orders the write before the read"):
        check_program(broken)
    assert removed.op.segment in str(broken.listing()) and len(broken.serial_order) == len(p.serial_order)


def _delayed(program, slow):
    """``program`` with the launch of ``slow`` 0.3 s late."""
    def f(launch):
        if launch.op != slow:
            return launch
        fn = launch.fn

        def late(*args):
            time.sleep(0.3)
            return fn(*args)

        return map_launches_replace(launch, late)
    return map_launches(program, f)


@pytest.mark.parametrize("timeout", [float("inf"), 1e12])
def test_a_wait_timeout_of_forever_waits_on_the_thread_executor(timeout):
    """``wait_timeout=float('inf')`` (what the ConfigError suggests for "forever") and values past the OS's
    longest wait: the lanes and the caller wait as long as they can, never an OverflowError from the lock."""
    p, inputs, _ = _prog()
    with torch.no_grad():
        ref = SerialExecutor().run(p, inputs)
        got = ThreadExecutor(wait_timeout=timeout).run(_delayed(p, drop_wait(p)[1].op), inputs)
    assert torch.equal(got, ref)


def test_missing_wait_gives_a_wrong_answer_or_a_failure_on_the_thread_executor():
    """Drop the wait in front of a cross-lane consumer and slow its producer down: the consumer then runs on
    a value that is not there yet, which the thread executor must expose (a failed lane or a wrong output),
    while the intact program with the same delay is right."""
    p, inputs, _ = _prog()
    broken, removed = drop_wait(p)
    with torch.no_grad():
        ref = SerialExecutor().run(p, inputs)
        ok = ThreadExecutor(wait_timeout=10).run(_delayed(p, removed.op), inputs)
        assert torch.equal(ok, ref) if isinstance(ok, torch.Tensor) else True
        try:
            bad = ThreadExecutor(wait_timeout=10).run(_delayed(broken, removed.op), inputs)
        except BackendError as exc:
            assert "waited" in str(exc), exc
        except TypeError as exc:  # the consumer's segment ran on a value not there yet
            assert any(n.startswith("dynaflow: raised by") for n in exc.__notes__), exc
        else:
            assert not torch.equal(bad, ref), "the race went unnoticed"


def map_launches_replace(launch, fn):
    import dataclasses

    return dataclasses.replace(launch, fn=fn)


def test_verify_option_checks_lowered_programs(monkeypatch):
    import dynaflow.planning as planning

    seen = []
    monkeypatch.setattr(planning, "check_program", lambda p: seen.append(p))
    c = dynaflow.compile(make_transformer(), strategy="nanoflow", nano_batches=2, executor="serial", verify=True)
    with torch.no_grad():
        c(transformer_input(4))
    assert seen and seen[-1] is c.program
