"""Every built-in strategy × nano-batch count × uneven batch size × executor computes what eager computes.

Tolerances (measured on the 2-core x86 CPU dev box, torch 2.13 CPU):

* one nano-batch: the program runs the captured ops on the very same tensors, so the output is
  bitwise equal to eager (``torch.equal``);
* several nano-batches: a nano-batch with fewer rows can take a different GEMM kernel (blocking) than
  the full batch, so the last bits depend on the CPU (observed: up to 6e-8 abs. difference for the 2-D
  MLP, 2.4e-7 for the hand-written transformer on an AVX-512 machine; bitwise equal on others). Those
  cases are compared with ``assert_close(atol=1e-5, rtol=1e-5)`` against eager on the full batch, *and*
  bitwise against eager run on the same row slices — which is exactly what a correct split/merge must
  reproduce, on every CPU.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import dynaflow
from models import (HF_FACTORIES, split_strategies, FeedForward, grad_off, make_coupled, make_mlp, make_transformer, hf_input, mlp_input,
                    transformer_input)

STRATEGIES = split_strategies()
NANOS = (1, 2, 3, 4)
BATCHES = (5, 7)
TOL = dict(atol=1e-5, rtol=1e-5)


def test_builtin_strategies_are_the_expected_ones():
    assert set(STRATEGIES) >= {"sequential", "round_robin", "nanoflow", "two_batch_overlap"}
    assert set(dynaflow.strategies.available()) >= set(STRATEGIES) | {"auto", "prefill_decode"}


def _eager_on_slices(model, x, split):
    return torch.cat([model(x[s:e]) for s, e in split.boundaries], dim=0)


def _assert_equivalent(out, ref, split, *, exact, sliced=None):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if exact or split.num == 1:
        assert torch.equal(out, ref), f"{split}: max abs diff {(out - ref).abs().max().item()}"
        return
    torch.testing.assert_close(out, ref, **TOL)
    if sliced is not None:
        assert torch.equal(out, sliced), f"{split}: differs from eager on the same slices"


HAND_WRITTEN = {
    # name: (factory, input factory, bitwise vs full eager, row-separable -> compare with eager on slices)
    "mlp": (make_mlp, mlp_input, False, True),
    "transformer": (make_transformer, transformer_input, False, True),
    "coupled": (make_coupled, mlp_input, False, False),
}


# (executor, grad mode): grad and inference modes are thread-local, so both are checked on the thread executor
EXECUTOR_MODES = [("serial", "no_grad"), ("thread", "no_grad"), ("thread", "inference"), ("sim", "no_grad")]


@pytest.mark.parametrize("executor, mode", EXECUTOR_MODES, ids=["serial", "thread", "thread-inference", "sim"])
@pytest.mark.parametrize("nano", NANOS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model_name", list(HAND_WRITTEN))
def test_hand_written_models_match_eager(model_name, strategy, nano, executor, mode):
    make, make_input, exact, separable = HAND_WRITTEN[model_name]
    model = make()
    compiled = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor=executor)
    with grad_off(mode):
        for batch in BATCHES:
            x = make_input(batch)
            ref = model(x)
            out = compiled(x)
            plan = compiled.last_graph.last_plan
            assert plan.split == dynaflow.SplitConfig.even(batch, nano)
            assert compiled.schedule.strategy == strategy
            assert compiled.last_timeline.executor == executor
            assert len(compiled.last_timeline.events) == compiled.program.num_launches
            sliced = _eager_on_slices(model, x, plan.split) if separable else None
            _assert_equivalent(out, ref, plan.split, exact=exact, sliced=sliced)
            # a second call reuses the bucket's plan and gives the same bits
            again = compiled(x)
            assert compiled.last_graph.last_plan is plan
            assert torch.equal(again, out)
            assert not out.requires_grad
    # one capture serves both batch sizes (the batch dim is symbolic); one plan per bucket
    assert len(compiled.graphs) == 1
    assert sorted(compiled.graphs[0].plans) == list(BATCHES)


def test_coupled_model_gets_a_barrier_and_plans_it_once():
    model = make_coupled()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=3, executor="thread")
    x = mlp_input(7)
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    graph = compiled.last_graph.last_plan.graph
    whole = [op for op in graph.ops if op.nano == dynaflow.ALL]
    assert len(whole) == 1  # the mean runs once, on the whole batch
    barrier = graph.segment(whole[0])
    assert barrier.kind is dynaflow.SegmentKind.BARRIER and "mean" in barrier.reason


class _MultiOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, {"act": torch.tanh(y), "pair": [x * 2, y.sum(-1)]}


@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_structured_outputs_match_eager(executor):
    model = _MultiOut().eval()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=3, executor=executor)
    x = mlp_input(7)
    with grad_off():
        ref, out = model(x), compiled(x)
    assert isinstance(out, tuple) and isinstance(out[1], dict) and isinstance(out[1]["pair"], list)
    torch.testing.assert_close(out, ref, **TOL)
    assert torch.equal(out[1]["pair"][0], ref[1]["pair"][0])  # elementwise: bitwise


def test_thread_executor_really_uses_several_lanes():
    model = make_transformer()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=4, executor="thread")
    x = transformer_input(7)
    with grad_off():
        split = dynaflow.SplitConfig.even(7, 4)
        _assert_equivalent(compiled(x), model(x), split, exact=False, sliced=_eager_on_slices(model, x, split))
    tl = compiled.last_timeline
    assert set(tl.lanes) == {"lane0", "lane1"}
    # nano-batches 0 and 2 on lane0, 1 and 3 on lane1
    for ev in tl.events:
        nano = int(ev.op.rsplit("[nb", 1)[1].rstrip("]"))
        assert ev.lane == f"lane{nano % 2}"
    assert len(compiled.program.lanes) == 2


@pytest.mark.parametrize("nano, expected", [(1, "serial"), (2, "thread")])
def test_auto_executor_picks_serial_for_one_lane_and_thread_for_several(nano, expected):
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=nano)  # executor="auto"
    x = mlp_input(6)
    with grad_off():
        _assert_equivalent(compiled(x), model(x), compiled.last_graph.last_plan.split, exact=False,
                           sliced=_eager_on_slices(model, x, compiled.last_graph.last_plan.split))
    assert compiled.last_timeline.executor == expected


def test_nano_batches_none_uses_strategy_default():
    model = make_mlp()
    x = mlp_input(5)
    for name, n in (("sequential", 1), ("round_robin", 2), ("nanoflow", 2)):
        torch._dynamo.reset()
        compiled = dynaflow.compile(model, strategy=name)
        with grad_off():
            torch.testing.assert_close(compiled(x), model(x), **TOL)
        assert compiled.last_graph.last_plan.split.num == n, name


def test_explain_lists_segments_split_and_schedule():
    model = make_transformer()
    compiled = dynaflow.compile(model, strategy="nanoflow", nano_batches=2)
    assert "not captured yet" in compiled.explain()
    with grad_off():
        compiled(transformer_input(5))
    text = compiled.explain()
    assert "strategy 'nanoflow'" in text
    assert "attention_0" in text and "mlp_0" in text
    assert "SplitConfig(5 → 3/2)" in text
    assert "attention_0[nb1]" in text  # the schedule table
    assert "Program(" in text


def test_static_and_dynamic_captures_each_serve_their_batches():
    """A batch of 1 is captured statically (Dynamo specialises size 1), larger batches share a dynamic graph."""
    model = make_mlp()
    compiled = dynaflow.compile(model, nano_batches=1, executor="serial")
    with grad_off():
        for batch in (1, 2, 1, 5):
            x = mlp_input(batch)
            assert torch.equal(compiled(x), model(x))
    assert [sorted(g.plans) for g in compiled.graphs] == [[1], [2, 5]]
    assert [g.calls for g in compiled.graphs] == [2, 2]


def test_inspection_describes_the_latest_call():
    model = make_mlp()
    compiled = dynaflow.compile(model, nano_batches=1, executor="serial")
    with grad_off():
        compiled(mlp_input(1))
        compiled(mlp_input(2))
        compiled(mlp_input(1))
    assert compiled.schedule.split == dynaflow.SplitConfig((1,))
    assert compiled.program.batch_size == 1
    assert compiled.last_graph is compiled.graphs[0]


# -- entry points ------------------------------------------------------------------------------------
def test_parallelize_decorates_a_module_class():
    from models import MLP

    @dynaflow.parallelize(strategy="round_robin", nano_batches=2, executor="thread")
    class FastMLP(MLP):
        pass

    model = make_mlp()
    fast = FastMLP().eval()
    fast.load_state_dict(model.state_dict())
    assert fast.dynaflow is None  # compiled on first call
    x = mlp_input(6)
    with grad_off():
        torch.testing.assert_close(fast(x), model(x), **TOL)
    assert isinstance(fast.dynaflow, dynaflow.Compiled)
    assert fast.dynaflow.schedule.strategy == "round_robin" and len(fast.dynaflow.schedule.lanes) == 2


def test_parallelize_decorates_a_function():
    @dynaflow.parallelize
    def f(x):
        return torch.relu(x * 2 + 1)

    x = mlp_input(6)
    assert isinstance(f, dynaflow.Compiled)
    assert torch.equal(f(x), torch.relu(x * 2 + 1))
    assert f.schedule.strategy == "nanoflow" and f.schedule.split.num == 2  # the default strategy


def test_forced_executor_knob():
    from dynaflow import knobs

    model = make_mlp()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=2)  # auto would pick thread
    with knobs.scope(DYNAFLOW_EXECUTOR="serial"), grad_off():
        compiled(mlp_input(6))
    assert compiled.last_timeline.executor == "serial"
    with grad_off():
        compiled(mlp_input(6))
    assert compiled.last_timeline.executor == "thread"


# -- input layouts ---------------------------------------------------------------------------------------
class _SeqFirst(torch.nn.Module):
    """(S, B, d) input: the batch is dim 1."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)
        self.ff = FeedForward(8)

    def forward(self, x):
        return self.ff(self.lin(x))


class _FlatRows(torch.nn.Module):
    """Flattens (B, S, d) to (B·S, d) across segments (k = S rows per item) and takes a batch-free input."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.mlp = FeedForward(16)

    def forward(self, x, bias):
        b, s, d = x.shape
        h = self.mlp(self.lin(x.reshape(b * s, d))) + bias
        return h.reshape(b, s, d).sum(1), h


class _Masked(torch.nn.Module):
    """A second batch input passed by keyword."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.mlp = FeedForward(16)

    def forward(self, x, mask=None):
        return self.mlp(self.lin(x)) * mask.unsqueeze(-1)


def _layout_case(name, batch):
    g = torch.Generator().manual_seed(batch)
    if name == "seq_first":
        return _SeqFirst(), (torch.randn(6, batch, 16, generator=g),), {}, {"batch_dim": 1}
    if name == "flat_rows":
        return _FlatRows(), (torch.randn(batch, 3, 16, generator=g), torch.randn(16, generator=g)), {}, {}
    return _Masked(), (torch.randn(batch, 3, 16, generator=g),), {"mask": (torch.rand(batch, 3, generator=g) > 0.5).float()}, {}


@pytest.mark.parametrize("executor", ["serial", "thread"])
@pytest.mark.parametrize("strategy", ["round_robin", "nanoflow"])
@pytest.mark.parametrize("layout", ["seq_first", "flat_rows", "masked"])
def test_input_layouts_match_eager(layout, strategy, executor):
    model, args, kwargs, opts = _layout_case(layout, 7)
    model.eval()
    compiled = dynaflow.compile(model, strategy=strategy, nano_batches=3, executor=executor, **opts)
    with grad_off():
        for batch in BATCHES:
            _, args, kwargs, _ = _layout_case(layout, batch)
            out, ref = compiled(*args, **kwargs), model(*args, **kwargs)
            torch.testing.assert_close(out, ref, **TOL)
    assert len(compiled.graphs) == 1 and sorted(compiled.graphs[0].plans) == list(BATCHES)
    assert "mlp_0" in [s.name for s in compiled.last_graph.segmented.segments]


# -- transformers models -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(HF_FACTORIES))
def hf(request):
    model = HF_FACTORIES[request.param]()
    refs = {}
    with grad_off():
        for batch in BATCHES:
            ids = hf_input(batch)
            refs[batch] = (ids, model(ids, use_cache=False).logits)
    return request.param, model, refs


def _check_hf(model, refs, strategy, nano, executor, mode="no_grad"):
    torch._dynamo.reset()
    compiled = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor=executor)
    with grad_off(mode):
        for batch in BATCHES:
            ids, ref = refs[batch]
            out = compiled(ids, use_cache=False)
            assert compiled.last_timeline.executor == executor
            # bitwise equal for every case (see the module docstring)
            _assert_equivalent(out.logits, ref, compiled.last_graph.last_plan.split, exact=True)
    return compiled


@pytest.mark.parametrize("nano", NANOS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transformers_models_match_eager_thread(hf, strategy, nano):
    name, model, refs = hf
    compiled = _check_hf(model, refs, strategy, nano, "thread")
    assert compiled.last_graph.last_plan.split.num == nano
    # the attention cores and the MLP / MoE blocks became their own segments
    seg_names = [s.name for s in compiled.last_graph.segmented.segments]
    assert sum(n.startswith("attention_") for n in seg_names) == 2, seg_names
    assert any(n.startswith("mlp_") for n in seg_names), seg_names


def test_transformers_models_match_eager_serial(hf):
    name, model, refs = hf
    _check_hf(model, refs, "nanoflow", 3, "serial", mode="inference")


@pytest.mark.parametrize("hf", ["mixtral"], indirect=True)
def test_mixtral_router_is_a_barrier(hf):
    name, model, refs = hf
    compiled = _check_hf(model, refs, "round_robin", 2, "thread")
    segs = compiled.last_graph.segmented.segments
    moe_barriers = [s for s in segs if s.kind is dynaflow.SegmentKind.BARRIER and s.name.startswith("mlp_")]
    assert len(moe_barriers) == 2  # one per layer: the expert dispatch couples the batch


# -- grad modes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_inference_mode_output_has_no_autograd_history(executor):
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor=executor)
    x = mlp_input(6)
    with torch.inference_mode():
        out = compiled(x)
        ref = model(x)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_a_call_inside_a_torch_func_transform_runs_the_model_and_later_calls_still_split(executor):
    """Under vmap or grad the model runs itself (the transform's state is per thread, and Dynamo asked to capture
    under it would give up on the model's code for later calls too); calls after it are split as before."""
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor=executor)
    x = mlp_input(6)
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), **TOL)
        torch.testing.assert_close(torch.vmap(compiled)(x.unsqueeze(1)), torch.vmap(model)(x.unsqueeze(1)), **TOL)
    torch.testing.assert_close(torch.func.grad(lambda t: compiled(t).sum())(x),
                               torch.func.grad(lambda t: model(t).sum())(x), **TOL)
    with grad_off():
        torch.testing.assert_close(compiled(mlp_input(8)), model(mlp_input(8)), **TOL)
    assert compiled.last_graph.last_plan.split.sizes == (4, 4) and compiled.direct_calls == 2


@pytest.mark.parametrize("executor", ["serial", "thread"])
@pytest.mark.parametrize("strategy", ["round_robin", "nanoflow"])
def test_every_lane_runs_under_the_callers_autocast(executor, strategy):
    """Autocast is per thread in torch: the thread executor's worker lanes take the caller's, so every nano-batch
    computes in bfloat16 as eager does (was: float32 rows from the worker lane)."""
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy=strategy, nano_batches=2, executor=executor)
    x = mlp_input(8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = compiled(x), model(x)
        on_slices = torch.cat([model(x[:4]), model(x[4:])])  # what each nano-batch computes, in bfloat16
    assert out.dtype == ref.dtype == torch.bfloat16
    assert compiled.last_graph.last_plan.split.sizes == (4, 4)
    torch.testing.assert_close(out, on_slices, atol=0, rtol=0)


@pytest.mark.parametrize("executor", ["serial", "thread", "sim"])
def test_executors_keep_no_grad(executor):
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor=executor)
    with torch.no_grad():
        out = compiled(mlp_input(6))
    assert not out.requires_grad and out.grad_fn is None


def test_grad_enabled_outputs_are_differentiable():
    """With autograd on, the output carries history and its gradient equals eager's."""
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy="sequential", nano_batches=2, executor="serial")
    x = mlp_input(6).requires_grad_()
    out = compiled(x)
    assert out.requires_grad
    (g_dyn,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(g_dyn, g_ref, **TOL)


# -- GraphModule inputs (torch.fx.symbolic_trace, torch.export) ---------------------------------------
def _export(model, x):
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    return ep.module()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_symbolic_traced_graph_module_matches_eager(strategy):
    model = make_mlp()
    gm = torch.fx.symbolic_trace(model)
    compiled = dynaflow.compile(gm, strategy=strategy, nano_batches=3, executor="thread")
    with grad_off():
        for batch in BATCHES:
            x = mlp_input(batch)
            split = dynaflow.SplitConfig.even(batch, 3)
            _assert_equivalent(compiled(x), model(x), split, exact=False, sliced=_eager_on_slices(model, x, split))
    assert sorted(compiled.graphs[0].plans) == list(BATCHES)


@pytest.mark.parametrize("nano", [2, 4])
def test_exported_graph_module_matches_eager(nano):
    model = make_transformer()
    gm = _export(model, transformer_input(5))
    compiled = dynaflow.compile(gm, strategy="nanoflow", nano_batches=nano)
    with grad_off():
        for batch in BATCHES:
            x = transformer_input(batch)
            out = compiled(x)
            split = compiled.last_graph.last_plan.split
            _assert_equivalent(out, model(x), split, exact=False, sliced=_eager_on_slices(model, x, split))
    names = [s.name for s in compiled.last_graph.segmented.segments]
    assert "attention_0" in names and "mlp_1" in names


class _CumsumOverBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.cumsum(self.lin(x), dim=0)


def test_cumsum_over_batch_is_a_barrier_when_captured_by_dynamo():
    model = _CumsumOverBatch().eval()
    compiled = dynaflow.compile(model, nano_batches=2, strategy="round_robin", executor="serial")
    x = mlp_input(6)
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    assert any(s.kind is dynaflow.SegmentKind.BARRIER and "cumsum" in s.reason
               for s in compiled.last_graph.segmented.segments)


def test_cumsum_over_batch_is_a_barrier_in_an_exported_graph():
    model = _CumsumOverBatch().eval()
    x = mlp_input(6)
    compiled = dynaflow.compile(_export(model, x), nano_batches=2, strategy="round_robin", executor="serial")
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), **TOL)


class _StepCounter(torch.nn.Module):
    """A leaf that updates its own buffer in place (a step counter, as an EMA or BatchNorm's counters do)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.step.add_(1)
        return x * self.step


class _CountsSteps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.counter = torch.nn.Linear(16, 16), _StepCounter()

    def forward(self, x):
        return self.counter(self.lin(x))


class _KeepsCounterLeaf(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _StepCounter) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("nano", [1, 2])
def test_a_leaf_module_that_writes_its_own_state_runs_once_per_step(nano):
    """A ``call_module`` leaf of a GraphModule writing its buffer: the analysis runs it on fake state (the real
    buffer is not bumped by it), and the write makes it a barrier (split, it would run once per nano-batch)."""
    ref, mine = _CountsSteps().eval(), _CountsSteps().eval()
    gm = torch.fx.GraphModule(mine, _KeepsCounterLeaf().trace(mine))
    compiled = dynaflow.compile(gm, strategy="round_robin", nano_batches=nano, executor="serial")
    with grad_off():
        for _ in range(3):
            x = mlp_input(8)
            torch.testing.assert_close(compiled(x), ref(x), **TOL)
            assert gm.counter.step.item() == ref.counter.step.item()
    if nano == 2:
        assert any(s.kind is dynaflow.SegmentKind.BARRIER and "not given" in s.reason
                   for s in compiled.last_graph.segmented.segments)


def test_batchnorm_in_training_through_symbolic_trace_counts_each_step_once():
    """``symbolic_trace`` keeps BatchNorm a leaf: its running stats and ``num_batches_tracked`` end as eager's."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16)).train()
    mine = copy.deepcopy(ref)
    compiled = dynaflow.compile(torch.fx.symbolic_trace(mine), strategy="nanoflow", nano_batches=2, executor="serial")
    with grad_off():
        for _ in range(3):
            x = mlp_input(8)
            torch.testing.assert_close(compiled(x), ref(x), **TOL)
    for name, buf in ref[1].named_buffers():
        torch.testing.assert_close(dict(mine[1].named_buffers())[name], buf, **TOL)


def test_a_graph_module_first_called_with_one_row_still_splits_larger_batches():
    """A first call of one row leaves the prepared batch static; a larger batch is prepared anew, symbolic."""
    model = make_mlp()
    compiled = dynaflow.compile(torch.fx.symbolic_trace(model), strategy="round_robin", executor="serial")
    with grad_off():
        for batch in (1, 4, 6, 1, 5):
            x = mlp_input(batch)
            torch.testing.assert_close(compiled(x), model(x), **TOL)
    split = {b: p.split.sizes for g in compiled.graphs for b, p in g.plans.items()}
    assert split[4] == (2, 2) and split[6] == (3, 3) and split[1] == (1,)


def test_an_export_with_a_static_batch_called_with_another_batch_says_how_to_export_it():
    model = make_mlp()
    compiled = dynaflow.compile(torch.export.export(model, (mlp_input(4),)), strategy="round_robin", nano_batches=2)
    with grad_off():
        torch.testing.assert_close(compiled(mlp_input(4)), model(mlp_input(4)), **TOL)
        with pytest.raises(dynaflow.CaptureError, match="dynamic_shapes"):
            compiled(mlp_input(6))


@pytest.mark.parametrize("outer", ["torch.compile", "dynaflow"])
def test_a_dynaflow_model_inside_a_compiled_parent_runs_through_dynaflow(outer):
    """The outer capture breaks its graph at the dynaflow call (Dynamo cannot trace dynaflow's own capture)."""
    child = make_mlp()
    fast_child = dynaflow.compile(child, strategy="round_robin", nano_batches=2, executor="serial")
    pre = torch.nn.Linear(16, 16)
    parent = lambda x: fast_child(torch.relu(pre(x)))  # noqa: E731
    compiled = (torch.compile(parent, backend="eager") if outer == "torch.compile"
                else dynaflow.compile(parent, strategy="sequential", executor="serial"))
    with grad_off():
        for batch in (4, 6):
            x = mlp_input(batch)
            torch.testing.assert_close(compiled(x), child(torch.relu(pre(x))), **TOL)
    assert fast_child.last_graph.last_plan.split.num == 2


def test_a_module_compiled_in_place_first_is_named_in_the_error():
    model = make_transformer()
    model.compile(backend="eager")
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=2)
    with grad_off(), pytest.raises(dynaflow.CaptureError, match=r"compiled in place with module\.compile\(\)"):
        compiled(transformer_input(4))


def test_exported_linear_segments_are_compute_bound():
    model = make_mlp()
    x = mlp_input(6)
    compiled = dynaflow.compile(_export(model, x), nano_batches=2, rules=[dynaflow.Op("linear")])
    with grad_off():
        compiled(x)
    linears = [s for s in compiled.last_graph.segmented.segments if s.name.startswith("linear_")]
    assert len(linears) == 3
    assert all(s.resource is dynaflow.Resource.COMPUTE for s in linears)


def test_thread_executor_frees_intermediates_at_their_last_use():
    """Values die as soon as their last reader has run on whichever lane — not at the end of the step."""
    import importlib

    model = make_transformer()
    compiled = dynaflow.compile(model, strategy="nanoflow", nano_batches=3, executor="thread")
    x = transformer_input(6)
    alive: list[int] = []
    with grad_off():
        ref = model(x)
        compiled(x)  # plan
        program = compiled.program
        ex_mod = importlib.import_module("dynaflow.backend.executors")
        real_release = ex_mod._Step.release

        def spy(step, launch):
            real_release(step, launch)
            alive.append(sum(v is not None for v in step.env[program.num_inputs:]))

        ex_mod._Step.release = spy
        try:
            out = compiled(x)
        finally:
            ex_mod._Step.release = real_release
    assert torch.equal(out, compiled(x)) and torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    intermediates = program.num_slots - program.num_inputs
    assert len(alive) == program.num_launches
    assert max(alive) < intermediates // 2, (max(alive), intermediates)  # never close to everything held
    assert alive[-1] <= len(program.output_slots) + len(program.buffers)


def test_parallelize_decorates_a_method_whatever_its_first_parameter_is_called():
    """On ``def forward(self, x)`` each instance compiles its bound method. A method whose first parameter is not
    named ``self`` is still a method (it used to be compiled as a plain function: ``TypeError: missing 1 required
    positional argument``); under ``@staticmethod`` it has no instance and compiles once as a function; through the
    class, ``Net.forward(net, x)`` is the bound method's compile."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        @dynaflow.parallelize(strategy="round_robin", nano_batches=2, executor="serial")
        def forward(me, x):
            return me.lin(x).relu()

        @dynaflow.parallelize(strategy="round_robin", nano_batches=2, executor="serial")
        def doubled(self, x):
            return self.lin(x) * 2

        @staticmethod
        @dynaflow.parallelize(strategy="round_robin", nano_batches=2, executor="serial")
        def act(x):
            return torch.tanh(x) * 2

    torch.manual_seed(0)
    a, b = Net(), Net()
    x = torch.randn(6, 8)
    with grad_off():
        for net in (a, b, a):
            torch.testing.assert_close(net(x), net.lin(x).relu())
        torch.testing.assert_close(Net.forward(b, x), b.lin(x).relu())
        for _ in range(2):
            torch.testing.assert_close(Net.act(x), torch.tanh(x) * 2)
            torch.testing.assert_close(a.act(x + 1), torch.tanh(x + 1) * 2)
        for net in (a, b):
            torch.testing.assert_close(net.doubled(x), net.lin(x) * 2)
    method, static = Net.__dict__["forward"], Net.__dict__["act"].__func__
    assert method.__get__(a) is a.forward and len(method._per) == 2  # one compiled object per instance
    assert Net.__dict__["doubled"].__get__(b) is b.doubled
    assert static._plain is not None and not static._per and static._plain.graphs[0].last_plan.split.num == 2


@dynaflow.parallelize(strategy="round_robin", nano_batches=2, executor="serial")
class _SavedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


def test_a_parallelized_module_instance_copies_and_saves_after_its_first_call(tmp_path):
    net = _SavedNet()
    x = torch.randn(4, 8)
    with grad_off():
        net(x)
        twin = copy.deepcopy(net)  # an EMA copy, a checkpoint
        torch.save(net, tmp_path / "net.pt")
        assert twin.dynaflow is None and net.dynaflow is not None
        torch.testing.assert_close(twin(x), net(x))
        assert twin.dynaflow is not None and twin.dynaflow is not net.dynaflow


@pytest.mark.parametrize("reset_first", [False, True])
def test_hooks_added_to_a_submodule_after_the_first_call_run_as_in_eager(reset_first):
    """Dynamo skips guards on module hook dicts by default, so a cached graph ignored a forward hook, a pre-hook
    or a side-effect hook added to a submodule after the first call (a different answer, no error). dynaflow's
    compiles guard on them, also after ``torch._dynamo.reset()`` (which drops Dynamo's compile callbacks)."""
    if reset_first:
        torch._dynamo.reset()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Net()
    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor="serial")
    x = torch.randn(6, 8)
    seen: list[int] = []
    with grad_off():
        torch.testing.assert_close(fast(x), model(x))
        doubled = model.a.register_forward_hook(lambda mod, inp, out: out * 2)
        torch.testing.assert_close(fast(x), model(x))
        shifted = model.b.register_forward_pre_hook(lambda mod, inp: (inp[0] + 1,))
        torch.testing.assert_close(fast(x), model(x))
        doubled.remove()
        shifted.remove()
        torch.testing.assert_close(fast(x), model(x))
        model.a.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
        fast(x)
    assert sum(seen) == 6  # once per row: the hook ran in the split step, on each nano-batch's rows
    assert fast.graphs[-1].last_plan.split.num == 2


def test_a_call_dynamo_runs_eagerly_after_split_calls_returns_its_answer_once(caplog):
    """Ordinary changes between calls (an int attribute Dynamo specialises on) reach Dynamo's recompile limit;
    Dynamo then runs the call eagerly. dynaflow raised its no-graph error after that run, so the answer was thrown
    away and the model's effects (BatchNorm's running stats) had happened: a caller retrying in eager counted the
    step twice. Now the eager answer is returned, with one warning."""
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.depth = nn.Linear(8, 8), nn.BatchNorm1d(8), 1

        def forward(self, x):
            for _ in range(self.depth):
                x = torch.tanh(self.a(x))
            return self.bn(x)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Deep()
    ref = copy.deepcopy(model)
    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor="serial")
    x = torch.randn(6, 8)
    with grad_off(), torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING, "dynaflow"):
        for depth in range(1, 6):
            model.depth = ref.depth = depth
            torch.testing.assert_close(fast(x), ref(x))
            assert int(model.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == depth
            torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)
    assert fast.direct_calls >= 2 and fast.graphs[0].calls >= 1
    assert len([r for r in caplog.records if "ran this call eagerly" in r.getMessage()]) == 1


class _ShiftNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.register_buffer("shift", torch.randn(8))

    def forward(self, x):
        return self.bn(self.a(x)) + self.shift


@pytest.mark.parametrize("change", ["assign-state", "new-submodule", "new-buffer", "half", "train"])
def test_a_graph_module_changed_after_its_first_call_runs_as_changed(change):
    """A GraphModule is prepared once; attributes replaced afterwards (``load_state_dict(assign=True)``, a new
    submodule or buffer, ``.half()``) were not seen (old weights, float32 out), and a BatchNorm leaf prepared in
    eval mode stayed split after ``train()`` (each nano-batch normalised by its own rows, stats updated twice)."""
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_ShiftNet().eval())
    ref = copy.deepcopy(gm)
    fast = dynaflow.compile(gm, strategy="round_robin", nano_batches=2, executor="serial")
    x = torch.randn(6, 8)
    with grad_off():
        torch.testing.assert_close(fast(x), ref(x))
        for m in (gm, ref):
            torch.manual_seed(1)
            if change == "assign-state":
                m.load_state_dict({k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v
                                   for k, v in m.state_dict().items()}, assign=True)
            elif change == "new-submodule":
                m.a = nn.Linear(8, 8)
            elif change == "new-buffer":
                m.shift = torch.randn(8)
            elif change == "half":
                m.half()
            else:
                m.train()
        if change == "half":
            x = x.half()
        for _ in range(2):
            out, want = fast(x), ref(x)
            assert out.dtype == want.dtype
            torch.testing.assert_close(out, want)
            torch.testing.assert_close(gm.bn.running_mean, ref.bn.running_mean)
            assert int(gm.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked)
