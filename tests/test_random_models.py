"""Random models against eager: Hypothesis draws a program of ops (``random_models``), a strategy, a nano-batch
count, an executor and a sequence of batch sizes; dynaflow's outputs, the inputs it wrote, the model's buffers
and the random generator's next draw must all equal eager's.

The oracle is eager PyTorch, not dynaflow's own rules: whatever the analysis decides, the answer must not
change. This search found the stale-copy, alias, random-draw and layout bugs that ``test_effects.py`` pins.
The executors include the CUDA executor's lowering on CPU (``tests/fake_cuda.py``: eager streams, CUDA graphs,
padded capture sizes), the strategies a random valid schedule, and calls may declare a request layout. A
second search trains (every executor): outputs and every gradient must equal eager's. The default tier draws 25 + 15
programs; ``pytest -m slow`` draws hundreds.
"""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch
from torch import nn
from hypothesis import HealthCheck, given, settings, strategies as st

import dynaflow
from dynaflow import CaptureError, ConfigError
from dynaflow.strategies.auto import Auto
from dynaflow.ir import Lane, NanoGraph, Schedule, SplitConfig
from dynaflow.strategies.base import Strategy
from dynaflow.strategies.nanoflow import NanoFlow
from fake_cuda import faked_cuda
from models import grad_off, split_strategies
from random_models import BINARY, SPECIAL, UNARY, D, Op, Program, RandomModel

TOL = dict(atol=1e-4, rtol=1e-4)
"""A GEMM over fewer rows may pick another kernel (README: results agree within the dtype's tolerance)."""

NAMES = sorted(UNARY) + sorted(BINARY) + list(SPECIAL)


@st.composite
def programs(draw: st.DrawFn, max_ops: int = 8) -> Program:
    inputs = draw(st.integers(1, 2), label="inputs")
    ops = []
    for i in range(draw(st.integers(1, max_ops), label="ops")):
        values = inputs + i
        name = draw(st.sampled_from(NAMES), label="op")
        a = draw(st.integers(max(0, values - 3), values - 1), label="a")  # mostly recent values: deep chains
        b = draw(st.integers(0, values - 1), label="b")
        ops.append(Op(name, a, b, train=name == "batch_norm" and draw(st.booleans(), label="train")))
    made = range(inputs, inputs + len(ops))
    outputs = draw(st.lists(st.sampled_from(made), min_size=1, max_size=2, unique=True), label="outputs")
    return Program(inputs, tuple(ops), tuple(sorted(outputs)))


GRAPH_EXECUTORS = {
    # the CUDA executor's lowering on CPU tensors, with torch.cuda's streams, events and graphs faked
    "cuda": {},
    "cuda-graphs": {"cuda_graphs": True},
    "cuda-graphs-padded": {"cuda_graphs": True, "capture_sizes": (4, 8, 12), "over_capture": "eager"},
}
GRAPH_CALLS = 4
"""Under CUDA graphs each batch size is called ``GRAPH_CALLS`` times in a row (two eager warm-ups, a capture,
replays), odd sizes into the same input tensors (read in place once stable), even ones into fresh ones."""


def check_against_eager(program: Program, strategy: str, nano: int, executor: str, batches: list[int],
                        requests: bool = False, config: dict | None = None) -> None:
    """Run ``program`` compiled and eager on each batch size of ``batches`` and compare everything a step leaves;
    ``requests``: calls declare a request layout (one long request, then one-token ones); ``config``: more
    config options."""
    with faked_cuda() if executor in GRAPH_EXECUTORS else contextlib.nullcontext():
        _check(program, strategy, nano, executor, batches, requests or strategy == "prefill_decode", config or {})


class RandomSchedule(Strategy):
    """Any valid schedule: a random linear extension of the nano-op graph dealt onto one to three lanes (seeded
    by the program, so Hypothesis replays it). Whatever order the dependencies allow must equal eager."""

    name = "random_schedule"

    def __init__(self, nano_batches: int, seed: str) -> None:
        super().__init__(nano_batches)
        self.seed = seed

    def plan(self, graph: NanoGraph, split: SplitConfig) -> Schedule:
        rng = random.Random(self.seed)
        indeg = {op: graph.g.in_degree(op) for op in graph.ops}
        ready, order = [op for op in graph.ops if indeg[op] == 0], []
        while ready:
            op = ready.pop(rng.randrange(len(ready)))
            order.append(op)
            for user in graph.users(op):
                indeg[user] -= 1
                if indeg[user] == 0:
                    ready.append(user)
        lanes = [Lane(f"L{i}") for i in range(rng.randint(1, 3))]
        dealt = [rng.randrange(len(lanes)) for _ in order]
        return Schedule.from_lanes(self.name, split, {l: [op for op, d in zip(order, dealt) if d == i]
                                                      for i, l in enumerate(lanes)})


def _strategy(strategy: str, nano: int, program: Program) -> dict:
    if strategy == "random_schedule":
        return dict(strategy=RandomSchedule(nano, f"{program}/{nano}"))
    if strategy == "auto":
        return dict(strategy=Auto(cache=False, repeats=1))
    if strategy.startswith("nanoflow-staged-"):  # one resource's segments re-split into nano + 1
        return dict(strategy=NanoFlow(nano_batches=nano, stage_nano_batches={strategy.rsplit("-", 1)[1]: nano + 1}))
    return dict(strategy=strategy, nano_batches=nano)


def _layout(batch: int) -> contextlib.AbstractContextManager:
    lengths = [batch - batch // 3] + [1] * (batch // 3)
    return dynaflow.requests(lengths, ["prefill" if n > 1 else "decode" for n in lengths])


def _check(program: Program, strategy: str, nano: int, executor: str, batches: list[int], requests: bool,
           config: dict) -> None:
    torch._dynamo.reset()  # every program is the same forward code: a fresh cache, no recompile limit
    reference = RandomModel(program).eval()
    model = copy.deepcopy(reference)
    if executor in GRAPH_EXECUTORS:
        options = dict(executor="cuda", config={**GRAPH_EXECUTORS[executor], **config} or None)
        batches = [b for b in batches for _ in range(GRAPH_CALLS)]
    else:
        options = dict(executor=executor, config=config or None)
    compiled = dynaflow.compile(model, **_strategy(strategy, nano, program), **options)
    held: dict[int, list[torch.Tensor]] = {}  # per batch size: the tensors a stable caller passes every time
    for step, batch in enumerate(batches):
        g = torch.Generator().manual_seed(step)
        xs = [torch.randn(batch, D, generator=g) for _ in range(program.inputs)]
        theirs = [x.clone() for x in xs]
        if executor in GRAPH_EXECUTORS and batch % 2:
            mine = held.setdefault(batch, [torch.empty_like(x) for x in xs])
            for m, x in zip(mine, xs):
                m.copy_(x)
        else:
            mine = [x.clone() for x in xs]
        with grad_off():
            torch.manual_seed(step)
            want, next_want = reference(*theirs), torch.rand(4)
            torch.manual_seed(step)
            try:
                with _layout(batch) if requests else contextlib.nullcontext():
                    got = compiled(*mine)
            except ConfigError as exc:  # more nano-batches than rows: refused by name, never run wrong
                assert nano > batch and f"nano_batches={nano}" in str(exc), exc
                return
            except CaptureError as exc:  # a graph break before any op: Dynamo captured nothing to split
                assert any(op.name == "graph_break" for op in program.ops) and "graph_break()" in str(exc), exc
                return
            next_got = torch.rand(4)
        layout = " with a request layout" if requests else ""
        where = f"{program} with {strategy}, nano_batches={nano}, {executor} executor, batch {batch}{layout}"
        for i, (g_out, w_out) in enumerate(zip(got, want)):
            torch.testing.assert_close(g_out, w_out, **TOL, msg=lambda m, i=i: f"output {i} of {where}: {m}")
        for i, (g_in, w_in) in enumerate(zip(mine, theirs)):
            torch.testing.assert_close(g_in, w_in, **TOL, msg=lambda m, i=i: f"input {i} after {where}: {m}")
        for (name, g_buf), w_buf in zip(model.named_buffers(), reference.buffers()):
            torch.testing.assert_close(g_buf, w_buf, **TOL, msg=lambda m, name=name: f"buffer {name} after {where}: {m}")
        assert torch.equal(next_got, next_want), f"the random generator moved differently in {where}"


STRATEGIES = split_strategies() + ["auto", "prefill_decode", "nanoflow-staged-memory", "nanoflow-staged-compute",
                                   "random_schedule"]
EXECUTORS = ["serial", "thread", "sim", *GRAPH_EXECUTORS]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), strategy=st.sampled_from(STRATEGIES), nano=st.integers(1, 4),
       executor=st.sampled_from(EXECUTORS), batches=st.lists(st.integers(2, 11), min_size=1, max_size=3),
       requests=st.booleans())
def test_random_models_equal_eager(program, strategy, nano, executor, batches, requests):
    check_against_eager(program, strategy, nano, executor, batches, requests)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(max_ops=10), strategy=st.sampled_from(STRATEGIES), nano=st.integers(1, 4),
       executor=st.sampled_from(EXECUTORS), batches=st.lists(st.integers(2, 11), min_size=1, max_size=3),
       requests=st.booleans())
def test_many_random_models_equal_eager(program, strategy, nano, executor, batches, requests):
    check_against_eager(program, strategy, nano, executor, batches, requests)


def _backward(model: nn.Module, xs: list[torch.Tensor], fn) -> tuple[list, list]:
    """Outputs of ``fn`` on non-leaf copies of ``xs`` (leaves cannot be written in place), and the gradients of
    a weighted sum of them with respect to the inputs and the model's parameters."""
    leaves = [x.clone().requires_grad_(True) for x in xs]
    outs = fn(*[x * 1.0 for x in leaves])
    loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs) if o.requires_grad)
    if isinstance(loss, torch.Tensor):
        loss.backward()
    return list(outs), [x.grad for x in leaves] + [p.grad for p in model.parameters()]


def check_gradients_against_eager(program: Program, strategy: str, nano: int, executor: str, batch: int) -> None:
    """Training: the outputs and every gradient (inputs and weights) equal eager's, on each of a few calls."""
    with faked_cuda() if executor in GRAPH_EXECUTORS else contextlib.nullcontext():
        _check_gradients(program, strategy, nano, executor, batch)


def _check_gradients(program: Program, strategy: str, nano: int, executor: str, batch: int) -> None:
    torch._dynamo.reset()
    reference = RandomModel(program).eval()
    model = copy.deepcopy(reference)
    options = dict(executor="cuda", config=GRAPH_EXECUTORS[executor] or None) if executor in GRAPH_EXECUTORS \
        else dict(executor=executor)
    compiled = dynaflow.compile(model, **_strategy(strategy, nano, program), **options)
    for call in range(GRAPH_CALLS if executor in GRAPH_EXECUTORS else 1):
        xs = [torch.randn(batch, D, generator=torch.Generator().manual_seed(10 * call + i))
              for i in range(program.inputs)]
        reference.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(call)
        try:
            want, want_grads = _backward(reference, xs, reference)
        except RuntimeError:  # eager refuses it too (an in-place write autograd needs the old value of)
            return
        torch.manual_seed(call)
        try:
            got, got_grads = _backward(model, xs, compiled)
        except ConfigError as exc:
            assert nano > batch, exc
            return
        except CaptureError as exc:
            assert "graph_break()" in str(exc), exc
            return
        where = f"{program} with {strategy}, nano_batches={nano}, {executor} executor, batch {batch}, training call {call}"
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"output {i} of {where}: {m}")
        for i, (g, w) in enumerate(zip(got_grads, want_grads)):
            if w is None or g is None:  # no gradient flows there in one: none, or zeros, in the other
                assert (g if w is None else w) is None or not (g if w is None else w).any(), f"gradient {i} of {where}"
            else:
                torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"gradient {i} of {where}: {m}")


TRAIN_EXECUTORS = ["serial", "thread", "cuda", "cuda-graphs"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(max_ops=6), strategy=st.sampled_from([s for s in STRATEGIES if s != "auto"]),
       nano=st.integers(1, 3), executor=st.sampled_from(TRAIN_EXECUTORS), batch=st.integers(2, 9))
def test_random_models_train_like_eager(program, strategy, nano, executor, batch):
    check_gradients_against_eager(program, strategy, nano, executor, batch)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(max_ops=8), strategy=st.sampled_from([s for s in STRATEGIES if s != "auto"]),
       nano=st.integers(1, 4), executor=st.sampled_from(TRAIN_EXECUTORS), batch=st.integers(2, 11))
def test_many_random_models_train_like_eager(program, strategy, nano, executor, batch):
    check_gradients_against_eager(program, strategy, nano, executor, batch)


@pytest.mark.parametrize("program", [
    # the shapes of the bugs the search found (kept as examples so they run on every seed)
    Program(1, (Op("column_major", 0), Op("write_input", 0), Op("norm_over_rows", 2)), (1, 2)),
    Program(1, (Op("dropout_eval", 0), Op("flip_rows", 0), Op("write_earlier_row", 1), Op("cross_rows", 2, 0)), (3, 4)),
    Program(1, (Op("set_row0", 0), Op("cross_rows", 1, 0), Op("gather_cols", 1), Op("add", 2, 1)), (1, 2)),
    Program(2, (Op("dropout_train", 1), Op("write_earlier", 0), Op("linear", 3), Op("roll_rows", 3)), (5,)),
    Program(1, (Op("column_major", 0), Op("add_rows_below", 1), Op("write_earlier_row", 2),
                Op("dropout_train", 3), Op("layer_norm", 4)), (3, 5)),
    Program(1, (Op("linear", 0), Op("batch_norm", 1, train=True), Op("sum_rows", 2)), (3,)),
    Program(1, (Op("view_of", 0), Op("linear", 0), Op("write_earlier_row", 1), Op("median_mask", 2)), (4,)),
    Program(1, (Op("first_row", 0), Op("write_earlier", 0)), (1, 2)),
    Program(1, (Op("linear", 0), Op("sum_rows", 1), Op("write_earlier_kw", 1), Op("gelu", 1)), (2, 4)),
    Program(1, (Op("linear", 0), Op("write_row_foreach", 1), Op("gelu", 1)), (2, 3)),
    Program(1, (Op("linear", 0), Op("squeeze_all", 1), Op("softmax", 2)), (3,)),
    Program(1, (Op("linear", 0), Op("gather_table", 1), Op("index_fill_rows", 2)), (3,)),
], ids=["copy-or-view", "input-alias", "row-write-copy", "batch-free-draw", "layout-draw", "norm-stats", "input-view-write",
        "row-read-by-all", "inplace-kwarg", "foreach-row", "squeeze-one-row", "row-pairing-index"])
@pytest.mark.parametrize("strategy,executor", [("round_robin", "thread"), ("nanoflow", "serial"), ("auto", "serial")])
def test_found_programs_equal_eager(program, strategy, executor):
    check_against_eager(program, strategy, 2, executor, [6, 3, 5])


@pytest.mark.parametrize("strategy", ["prefill_decode", "nanoflow", "sequential"])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_graph_with_nothing_to_launch_runs_on_every_executor(strategy, executor):
    """Dynamo hands over a graph that holds only a marker (``dynaflow.mark`` before a graph break): its program
    has no launches, and ``prefill_decode`` plans it onto no lane at all. Found by the search: the thread
    executor indexed its first lane."""
    check_against_eager(Program(1, (Op("cut", 0), Op("graph_break", 0)), (1,)), strategy, 2, executor, [2, 5])
