"""Fakes of torch.cuda's streams, events and CUDA graphs that check the host-side protocol on CPU tensors.

A fake stream asserts every event it waits on was recorded first; a fake graph records the launches issued
while it is captured, undoes what the capture ran (a real capture runs nothing) and re-runs them on replay,
writing the results into the tensors the capture left in the env (what a real replay does at fixed addresses).
``faked_cuda()`` installs them for a block; ``test_cuda_fake.fake_cuda`` is the fixture form.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import pytest
import torch

from dynaflow.backend import cuda as cuda_mod
from dynaflow.backend import launch as launch_mod
from dynaflow.backend.streams import LaneStream


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


class FakeGraph:
    """Records the launches issued during a fake capture; ``replay`` re-runs them and writes the results into
    the tensors the capture left in the env (what a real replay does at fixed addresses)."""

    active: "FakeGraph | None" = None

    def __init__(self) -> None:
        self.recorded: list = []
        self.env: list | None = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        scratch = list(self.env)
        for launch, step, captured in self.recorded:
            REAL_RUN_LAUNCH(launch, step.with_env(scratch))
            for s, old in zip(launch.out_slots, captured):  # what the capture made, even if its slot was freed
                if isinstance(old, torch.Tensor) and old is not scratch[s]:
                    _distinct(old).copy_(_distinct(scratch[s]))
                    scratch[s] = old  # later launches read (and write) the captured address, as on the device


REAL_RUN_LAUNCH = launch_mod.run_launch


def _distinct(t: torch.Tensor) -> torch.Tensor:
    """``t`` with each broadcast dim (stride 0) narrowed to one element: the memory an expanded output really
    has, which a replay writes once (``copy_`` refuses a destination whose elements share memory)."""
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:
            t = t.narrow(d, 0, 1)
    return t


@contextlib.contextmanager
def faked_cuda() -> Iterator[Any]:
    """torch.cuda's streams, events and graphs replaced by the fakes above for the duration of the block; yields
    the journal of stream joins, the caller's stream and the streams cross-lane values were recorded on."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _install(monkeypatch)


def _install(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
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
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: current.__setitem__(-1, s))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(cuda_mod, "make_lane_streams", lane_streams)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: frees.append(s.name), raising=False)

    @contextlib.contextmanager
    def graph(g, stream=None, **_):
        assert FakeGraph.active is None, "nested capture"
        FakeGraph.active = g
        current.append(stream)
        rng = torch.random.get_rng_state()
        try:
            yield
        finally:
            current.pop()
            FakeGraph.active = None
            for t, saved in getattr(g, "saved", ()):  # a real capture runs nothing: undo what the fake ran
                t.copy_(saved)
            torch.random.set_rng_state(rng)  # nor draws: a replay draws from the generator's state at the time

    def run_launch(launch, step):
        g = FakeGraph.active
        if g is not None:
            assert g.env is None or g.env is step.env, "one env per captured piece"
            if g.env is None:
                g.saved = [(t, t.clone()) for t in step.env[:step.program.num_inputs] if isinstance(t, torch.Tensor)]
            g.env = step.env
            out = REAL_RUN_LAUNCH(launch, step)
            g.recorded.append((launch, step, [step.env[s] for s in launch.out_slots]))
            return out
        return REAL_RUN_LAUNCH(launch, step)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: FakeStream("capture", journal))
    monkeypatch.setattr(launch_mod, "run_launch", run_launch)
    FakeGraph.active = None
    yield type("Fake", (), {"journal": journal, "caller": caller, "frees": frees})
