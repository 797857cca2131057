"""The CUDA executor's eager path on CPU, with torch.cuda's streams and events replaced by fakes that check
the host-side protocol: every lane forks from the caller's stream and joins back, every event is recorded
before any stream waits on it, cross-lane values are ``record_stream``-ed before they are freed, merge
buffers move into one arena after the first step. (Real streams run on the GPU under ``pytest -m cuda``.)"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

import dynaflow
from dynaflow.backend import SerialExecutor
from dynaflow.backend import cuda as cuda_mod
from dynaflow.backend.streams import LaneStream
from models import make_transformer, transformer_input
from programs import program_of


class FakeEvent:
    def __init__(self, enable_timing: bool = False, **_: object) -> None:
        self.recorded = False
        self.t = 0.0

    def record(self, stream=None):
        self.recorded = True
        self.t = time.perf_counter()
        if stream is not None:
            stream.log.append(("record", id(self)))

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class FakeStream:
    def __init__(self, name: str, journal: list) -> None:
        self.name = name
        self.log: list = []
        self.journal = journal

    def wait_event(self, ev):
        assert ev.recorded, f"{self.name} waits on an event that was never recorded (host issue order is wrong)"
        self.log.append(("wait", id(ev)))

    def wait_stream(self, other):
        self.journal.append((self.name, "wait_stream", other.name))

    def __repr__(self):
        return f"FakeStream({self.name})"


@pytest.fixture
def fake_cuda(monkeypatch):
    journal: list = []
    caller = FakeStream("caller", journal)
    current = [caller]
    frees: list = []

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    def lane_streams(lanes, device=None):
        return tuple(LaneStream(l.name, FakeStream(l.name, journal), l.sm_count, None,
                                "fallback" if l.sm_count else "stream") for l in lanes)

    monkeypatch.setattr(cuda_mod, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(cuda_mod, "make_lane_streams", lane_streams)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: frees.append(s.name), raising=False)
    return type("Fake", (), {"journal": journal, "caller": caller, "frees": frees})


@pytest.mark.parametrize("strategy,nano", [("sequential", 1), ("round_robin", 2), ("nanoflow", 2), ("nanoflow", 3)])
def test_eager_cuda_path_matches_serial_and_follows_the_stream_protocol(fake_cuda, strategy, nano):
    p, inputs, _ = program_of(make_transformer(), transformer_input(7), strategy, nano)
    ex = cuda_mod.CudaExecutor()
    with torch.no_grad():
        ref = SerialExecutor().run(p, inputs)
        for step in range(3):
            fake_cuda.journal.clear()
            out = ex.run(p, inputs)
            assert torch.equal(out, ref)
            lanes = {l.name for l in p.lanes}
            if step == 0:  # the first step probes buffer shapes on the caller's stream alone
                assert not fake_cuda.journal
                continue
            assert {(n, "wait_stream", "caller") for n in lanes} <= set(fake_cuda.journal)  # fork
            assert {("caller", "wait_stream", n) for n in lanes} <= set(fake_cuda.journal)  # join
    state = ex._state(p)
    assert state.buffers is not None and set(state.buffers) == set(p.buffers)
    if p.buffers:
        assert state.arena is not None and state.arena.dtype == torch.uint8
        assert out.data_ptr() != state.arena.data_ptr()  # copy_outputs=True: a fresh tensor
    if len(p.lanes) > 1 and any(w for s in p.streams for w in s if not hasattr(w, "fn")):
        assert fake_cuda.frees, "cross-lane values must be record_stream-ed on their reading lanes before freeing"


def test_views_of_static_buffers_when_copy_outputs_is_false(fake_cuda):
    p, inputs, _ = program_of(make_transformer(), transformer_input(6), "nanoflow", 2)
    ex = cuda_mod.CudaExecutor(copy_outputs=False)
    with torch.no_grad():
        ex.run(p, inputs)
        out = ex.run(p, inputs)
    arena = ex._state(p).arena
    assert arena is not None
    assert arena.data_ptr() <= out.data_ptr() < arena.data_ptr() + arena.numel()


def test_gpu_timeline_records_every_launch(fake_cuda):
    p, inputs, _ = program_of(make_transformer(), transformer_input(6), "nanoflow", 2)
    ex = cuda_mod.CudaExecutor(gpu_timeline=True)
    with torch.no_grad():
        ex.run(p, inputs)
    tl = ex.last_timeline
    assert tl is not None and len(tl.events) == p.num_launches and set(tl.lanes) == {l.name for l in p.lanes}
    assert all(e.end >= e.start >= 0 for e in tl.events)
    assert cuda_mod.CudaExecutor().last_timeline is None


def test_compile_with_cuda_executor_uses_the_config(fake_cuda):
    model = make_transformer()
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor="cuda", config={"gpu_timeline": True})
    x = transformer_input(5)
    with torch.no_grad():
        out = c(x)
        assert torch.equal(out, model(x))
    ex = c.graphs[0]._executors["cuda"]
    assert ex.config.gpu_timeline and c.last_timeline is not None and c.last_timeline.executor == "cuda"


def test_sm_partitioned_lanes_fall_back_and_still_compute_the_same(fake_cuda):
    model = make_transformer()
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor="cuda",
                         config={"strategy_options": {"sm_counts": {"compute": 96, "memory": 36}}})
    x = transformer_input(5)
    with torch.no_grad():
        assert torch.equal(c(x), model(x))
    streams = c.graphs[0]._executors["cuda"].lane_streams(c.program)
    assert {ls.requested_sms for ls in streams} == {96, 36}
