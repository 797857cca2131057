"""The per-nano-batch host-state hook (``dynaflow.nanocontext``), tested without any serving engine.

A tiny fake "engine" keeps per-step state in a module global (as vLLM's forward context does): a per-row
scale vector. An opaque custom op reads it, so running the op on a nano-batch slice under the whole-batch
state would fail (shape mismatch) or, with a compatible shape, compute the wrong rows. The hook must make
each nano-batch launch see its own rows, on every CPU executor (serial, thread, sim), for every strategy; tests/test_cuda_fake.py runs it on
the CUDA executor's host path.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow.errors import BackendError, ConfigError
from dynaflow.nanocontext import current_nano_context, nano_context

# -- the fake engine: global per-step state read by an opaque op --------------------------------------
_STATE: dict[str, torch.Tensor] = {}
_ACTIVE = {"now": 0, "max": 0}
_ACTIVE_LOCK = threading.Lock()


@torch.library.custom_op("dftest::state_scale", mutates_args=())
def state_scale(x: torch.Tensor) -> torch.Tensor:
    with _ACTIVE_LOCK:
        _ACTIVE["now"] += 1
        _ACTIVE["max"] = max(_ACTIVE["max"], _ACTIVE["now"])
    try:
        scale = _STATE["scale"]
        if scale.shape[0] != x.shape[0]:
            raise RuntimeError(f"state has {scale.shape[0]} rows but the op got {x.shape[0]}")
        return x * scale[:, None]
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE["now"] -= 1


@state_scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@contextlib.contextmanager
def engine_state(scale: torch.Tensor):
    saved = dict(_STATE)
    _STATE["scale"] = scale
    try:
        yield
    finally:
        _STATE.clear()
        _STATE.update(saved)


class StatefulModel(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.ops.dftest.state_scale(h)
        return self.mlp(h) + h


RULES = [dynaflow.Op(r"dftest\.state_scale", name="attention", tags=("memory", "nano-context", "batch-local")),
         dynaflow.Op(r"linear", name="gemm", tags=("compute",))]


def _provider(scale: torch.Tensor):
    def enter(nano: int, rows: tuple[int, int]):
        return engine_state(scale[rows[0]:rows[1]])
    return enter


def _reference(model, x, scale):
    with engine_state(scale):
        return model(x)


CPU_EXECUTORS = [name for name in dynaflow.backend.executors.available() if name != "cuda"]
"""Every registered executor that runs on CPU (serial, thread, sim): all share the step loop."""


@pytest.mark.parametrize("executor", CPU_EXECUTORS)
@pytest.mark.parametrize("strategy", dynaflow.strategies.available())
@pytest.mark.parametrize("nano", [1, 2, 3])
def test_each_nano_batch_launch_sees_its_own_state(executor, strategy, nano):
    torch.manual_seed(0)
    model = StatefulModel().eval()
    x = torch.randn(7, 8)
    scale = torch.arange(1, 8, dtype=torch.float32)
    ref = _reference(model, x, scale)
    fast = dynaflow.compile(model, strategy=strategy, nano_batches=nano, rules=RULES, executor=executor)
    _ACTIVE["max"] = 0
    with torch.no_grad(), engine_state(scale), nano_context(_provider(scale)):
        out = fast(x)
    torch.testing.assert_close(out, ref)
    seg = [s for s in fast.last_graph.segmented.segments if "nano-context" in s.hints]
    assert len(seg) == 1 and not seg[0].whole
    assert _ACTIVE["max"] == 1  # never two nano-context launches at once, even on the thread executor


def test_without_a_provider_the_op_sees_the_whole_batch_state():
    model = StatefulModel().eval()
    x = torch.randn(6, 8)
    scale = torch.ones(6)
    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=2, rules=RULES, executor="serial")
    with torch.no_grad(), engine_state(scale), pytest.raises(Exception, match="state has 6 rows but the op got 3"):
        fast(x)


def test_one_nano_batch_does_not_call_the_provider():
    model = StatefulModel().eval()
    x = torch.randn(4, 8)
    scale = torch.arange(4, dtype=torch.float32)

    def enter(nano, rows):
        raise AssertionError("the single-nano-batch fast path must not enter per-nano state")

    fast = dynaflow.compile(model, strategy="sequential", nano_batches=1, rules=RULES, executor="serial")
    with torch.no_grad(), engine_state(scale), nano_context(enter):
        torch.testing.assert_close(fast(x), _reference(model, x, scale))


def test_provider_rows_cover_the_batch_in_order():
    model = StatefulModel().eval()
    x = torch.randn(7, 8)
    scale = torch.ones(7)
    seen = []

    def enter(nano, rows):
        seen.append((nano, rows))
        return engine_state(scale[rows[0]:rows[1]])

    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=3, rules=RULES, executor="serial")
    with torch.no_grad(), engine_state(scale), nano_context(enter):
        fast(x)
    assert sorted(seen) == [(0, (0, 3)), (1, (3, 5)), (2, (5, 7))]


def test_bad_provider_results_are_backend_errors_that_name_the_segment():
    model = StatefulModel().eval()
    x = torch.randn(4, 8)
    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=2, rules=RULES, executor="serial")
    with torch.no_grad(), engine_state(torch.ones(4)), nano_context(lambda nano, rows: 42, name="bad"):
        with pytest.raises(BackendError, match=r"NanoContext\('bad'\).*nano-batch 0 \(rows 0:2 of 4\).*segment"):
            fast(x)


def test_nano_context_rejects_a_non_callable_and_restores_the_previous_one():
    with pytest.raises(ConfigError, match="enter must be a callable"):
        with nano_context(3):  # type: ignore[arg-type]
            pass
    assert current_nano_context() is None
    with nano_context(lambda n, r: contextlib.nullcontext(), name="outer") as outer:
        with nano_context(lambda n, r: contextlib.nullcontext(), name="inner"):
            assert current_nano_context().name == "inner"
        assert current_nano_context() is outer
    assert current_nano_context() is None
