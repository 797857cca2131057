"""Launch fusion for Inductor (backend/fuse.py): runs of consecutive launches on a lane become one launch.

Fusion alone changes no op and no order, so a fused program's answer is the unfused one's bit for bit; the
end-to-end checks below run ``inductor=True`` with Inductor's compile replaced by the identity (the fused
GraphModule runs as fx code), so they compare against eager exactly, on every executor, and fast.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import dynaflow
from dynaflow.backend import SerialExecutor, ThreadExecutor
from dynaflow.backend.fuse import KEPT_APART, fuse_runs
from dynaflow.backend.inductor import InductorSegments
from dynaflow.backend.program import CONST, Launch, Wait
from models import make_mlp, make_transformer, mlp_input, transformer_input
from programs import program_of, retag
from random_models import Program as RandomProgram
from test_random_models import STRATEGIES, check_against_eager, programs

TOL = dict(atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def fused_not_compiled():
    """``inductor=True`` whose compile is the identity: what runs is fusion alone."""
    with mock.patch.object(InductorSegments, "_compile_one", lambda self, launch, args: launch.fn):
        yield


def _members(launch: Launch) -> list[str]:
    return launch.segment.name.split("+")


def test_a_one_nano_batch_step_in_program_order_is_one_launch():
    p, inputs, _ = program_of(make_transformer(), transformer_input(4), "sequential", 1)
    q = fuse_runs(p)
    assert p.num_launches > 1 and q.num_launches == 1
    assert _members(q.serial_order[0]) == [launch.segment.name for launch in p.serial_order]
    with torch.no_grad():
        assert torch.equal(SerialExecutor().run(q, inputs), SerialExecutor().run(p, inputs))


@pytest.mark.parametrize("strategy, nano", [("nanoflow", 2), ("two_batch_overlap", 2), ("round_robin", 3)])
def test_runs_end_at_waits_and_events_and_keep_every_launch_once(strategy, nano):
    p, inputs, _ = program_of(make_transformer(), transformer_input(6), strategy, nano)
    q = fuse_runs(p)
    for before, after in zip(p.streams, q.streams):
        waits = [i for i in before if isinstance(i, Wait)]
        assert [i for i in after if isinstance(i, Wait)] == waits  # every wait kept, in order
        names = [n for i in after if isinstance(i, Launch) for n in _members(i)]
        assert names == [i.segment.name for i in before if isinstance(i, Launch)]  # every launch once, in order
        events = [i.event for i in before if isinstance(i, Launch) and i.event is not None]
        assert [i.event for i in after if isinstance(i, Launch) and i.event is not None] == events
    with torch.no_grad():
        want = SerialExecutor().run(p, inputs)
        assert torch.equal(SerialExecutor().run(q, inputs), want)
        ex = ThreadExecutor()
        try:
            assert torch.equal(ex.run(q, inputs), want)
        finally:
            ex.close()


@pytest.mark.parametrize("hint", sorted(KEPT_APART))
def test_a_segment_kept_apart_is_never_fused(hint):
    p, inputs, _ = program_of(make_transformer(), transformer_input(4), "sequential", 1)
    middle = p.serial_order[len(p.serial_order) // 2].segment.name
    q = fuse_runs(retag(p, {middle}, hint))
    alone = [launch for launch in q.serial_order if middle in _members(launch)]
    assert len(alone) == 1 and _members(alone[0]) == [middle]
    assert q.num_launches == 3  # the runs before and after it, and it


def test_a_fused_launch_reads_only_values_made_outside_its_run():
    p, _, _ = program_of(make_transformer(), transformer_input(6), "nanoflow", 2)
    q = fuse_runs(p)
    made_by = {slot: launch for launch in q.serial_order for slot in launch.out_slots}
    for launch in q.serial_order:
        assert all(a.kind == CONST or made_by.get(a.slot) is not launch for a in launch.args)


def test_two_nano_batches_runs_share_one_compile():
    """The runs of two nano-batches of one size differ only in their rows: one compile serves both."""
    p, inputs, _ = program_of(make_mlp(), mlp_input(8), "sequential", 2)
    q = fuse_runs(p)
    assert q.num_launches == 1  # sequential: one lane, no waits
    p, inputs, _ = program_of(make_transformer(), transformer_input(8), "nanoflow", 2)
    compiled: list = []
    ind = InductorSegments()

    def compile_one(launch, args):
        compiled.append(launch.segment.name)
        return launch.fn

    with mock.patch.object(ind, "_compile_one", compile_one), torch.no_grad():
        r = ind.program_for(p, inputs)
        torch.testing.assert_close(SerialExecutor().run(r, inputs), SerialExecutor().run(p, inputs), **TOL)
    fused = [launch for launch in r.serial_order if "+" in launch.segment.name]
    assert fused and len(compiled) < r.num_launches  # some run's compile served another nano-batch's run
    assert len(set(compiled)) == len(compiled)


def test_fused_and_compiled_by_inductor_equals_eager():
    model = make_transformer()
    x = transformer_input(6)
    c = dynaflow.compile(model, strategy="sequential", nano_batches=1, executor="serial", config={"inductor": True})
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x), **TOL)
        assert c.last_graph._inductor.num_compiled == 1  # the whole step: one compile


def test_the_sim_executor_keeps_its_launches_apart():
    """``sim`` predicts each launch's time from its segment's cost: its programs are not fused."""
    c = dynaflow.compile(make_mlp(), strategy="sequential", nano_batches=2, executor="sim", config={"inductor": True})
    with torch.no_grad(), fused_not_compiled():
        c(mlp_input(4))
    assert not c.last_graph._inductor.fuse


FUSED_EXECUTORS = ["serial", "thread", "cuda", "cuda-graphs"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(max_ops=8), strategy=st.sampled_from(STRATEGIES), nano=st.integers(1, 4),
       executor=st.sampled_from(FUSED_EXECUTORS), batches=st.lists(st.integers(2, 11), min_size=1, max_size=3),
       requests=st.booleans())
def test_fused_random_models_equal_eager(program: RandomProgram, strategy, nano, executor, batches, requests):
    with fused_not_compiled():
        check_against_eager(program, strategy, nano, executor, batches, requests, config={"inductor": True})


def test_the_fuse_knob_compiles_segment_by_segment():
    from dynaflow import knobs

    model = make_transformer()
    x = transformer_input(6)
    with knobs.scope(DYNAFLOW_INDUCTOR_FUSE=0), torch.no_grad(), fused_not_compiled():
        c = dynaflow.compile(model, strategy="sequential", nano_batches=1, executor="serial",
                             config={"inductor": True})
        assert torch.equal(c(x), model(x))
    assert not c.last_graph._inductor.fuse and c.last_graph._inductor.num_compiled == c.program.num_launches > 1


def test_explain_shows_the_fused_program_that_runs():
    """``explain()`` prints the planned program and, under ``inductor=True``, the fused one that really runs."""
    model = make_transformer()
    with torch.no_grad(), fused_not_compiled():
        c = dynaflow.compile(model, strategy="sequential", nano_batches=1, executor="serial",
                             config={"inductor": True})
        c(transformer_input(6))
        planned = c.program.num_launches
        text = c.explain()
    assert planned > 1
    assert "compiled by Inductor as 1 launch (runs" in text and "DYNAFLOW_INDUCTOR_FUSE=0" in text
    assert "fused runs: glue_0+" in text, text[-800:]


class _SeqMix(torch.nn.Module):
    """A whole-batch mix (a mean over the batch dim, a barrier) and then row-wise layers that read the input
    again: one run reads the input whole and as each nano-batch's rows (an encoder on seq-first input)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.ln, self.ff = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x):
        y = self.ln(x + x.mean(0, keepdim=True))
        return y + self.ff(y) + x


def test_a_run_reads_each_outside_value_through_one_input():
    """An input the run reads whole and as nano-batch rows is passed once, whole, and cut inside the fused graph:
    views of one tensor as separate inputs of one compile made Dynamo fakify their common base with a batch dim
    the caller's mark left dynamic, and Inductor failed ('sources must not be empty for symbol')."""
    x = torch.randn(6, 4, 16)
    p, inputs, _ = program_of(_SeqMix(), x, "sequential", 2)
    q = fuse_runs(p)
    fused = [launch for launch in q.serial_order if "+" in launch.segment.name]
    assert fused
    for launch in fused:
        slots = [a.slot for a in launch.args if a.kind != CONST]
        assert len(slots) == len(set(slots)), launch.args
    with torch.no_grad():
        assert torch.equal(SerialExecutor().run(q, inputs), SerialExecutor().run(p, inputs))
    with fused_not_compiled(), torch.no_grad():
        model = _SeqMix()
        c = dynaflow.compile(model, strategy="sequential", nano_batches=2, executor="serial", config={"inductor": True})
        assert torch.equal(c(x), model(x))


def test_a_fused_run_that_inductor_fails_on_compiles_segment_by_segment(caplog):
    """Fusion is an optimisation: when Inductor fails on a fused run, the program's segments compile one by one
    (with a warning naming the run) and the call still gives eager's answer."""
    def compile_one(self, launch, args):
        if getattr(launch.fn, "fuse_key", None) is None:
            return launch.fn

        def broken(*a):
            raise RuntimeError("an Inductor failure on the fused graph")
        return broken

    model = make_transformer()
    x = transformer_input(6)
    with mock.patch.object(InductorSegments, "_compile_one", compile_one), torch.no_grad(), \
            caplog.at_level("WARNING", logger="dynaflow.backend.inductor"):
        c = dynaflow.compile(model, strategy="sequential", nano_batches=1, executor="serial",
                             config={"inductor": True})
        assert torch.equal(c(x), model(x))
        assert torch.equal(c(x), model(x))
    assert "compiled as one" in caplog.text and "one by one instead" in caplog.text
    assert c.last_graph._inductor.num_compiled == c.program.num_launches > 1
