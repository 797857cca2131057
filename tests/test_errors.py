"""Bad-input catalogue: every mistake raises a specific ``DynaflowError`` subclass whose message names the
option / value / node / strategy and says how to fix it."""

from __future__ import annotations

import importlib
import logging
import re

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow import (BackendError, BatchCouplingError, CaptureError, ConfigError, DynaflowError, Lane,
                      NanoOp, PartitionError, Schedule, ScheduleError, StrategyError)
from dynaflow.backend import SerialExecutor, ThreadExecutor, lower
from models import grad_off, make_coupled, make_mlp, make_transformer, mlp_input, transformer_input

# Cut the MLP at every linear: linear_0 -> glue_0 -> linear_1 -> glue_1 -> linear_2 (a chain of 5 segments).
CHAIN_RULES = [dynaflow.Op("linear")]


def _raises(cls, fn, *needles):
    """Call ``fn``; assert it raises exactly a ``cls`` (the dynaflow class itself, not a torch wrapper) whose
    message contains every needle; return the message."""
    with pytest.raises(DynaflowError) as info:
        fn()
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in message:\n{msg}"
    return msg


def test_error_hierarchy():
    for cls in (ConfigError, CaptureError, PartitionError, BatchCouplingError, StrategyError, ScheduleError,
                BackendError):
        assert issubclass(cls, DynaflowError)
    assert issubclass(ConfigError, ValueError)


# -- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 2.0, "2"])
def test_nano_batches_below_one_or_not_int_rejected_at_compile(bad):
    _raises(ConfigError, lambda: dynaflow.compile(make_mlp(), nano_batches=bad),
            f"nano_batches={bad!r}", "must be an int >= 1")


@pytest.mark.parametrize("strategy", ["sequential", "round_robin", "nanoflow", "auto"])
def test_nano_batches_above_batch_size_rejected_on_call(strategy):
    """The same ConfigError whatever the strategy (``auto`` plans its sequential baseline with the option)."""
    if strategy == "auto":
        strategy = dynaflow.strategies.Auto(cache=False, measure_top_k=0)
    compiled = dynaflow.compile(make_mlp(), strategy=strategy, nano_batches=6)  # fine at compile time
    with grad_off():
        _raises(ConfigError, lambda: compiled(mlp_input(5)),
                "nano_batches=6", "batch of 5 rows", "nano_batches<= 5")
        # the same compiled model still serves a batch that is large enough
        x = mlp_input(8)
        torch.testing.assert_close(compiled(x), make_mlp()(x), atol=1e-5, rtol=1e-5)


def test_batch_dim_that_no_input_has():
    compiled = dynaflow.compile(make_mlp(), batch_dim=3)
    _raises(ConfigError, lambda: compiled(mlp_input(4)), "batch_dim=3", "(4, 16)", "Pass batch_dim=")


def test_negative_batch_dim():
    _raises(ConfigError, lambda: dynaflow.compile(make_mlp(), batch_dim=-1), "batch_dim=-1", "non-negative")


def test_unknown_executor_name_suggests_nearest():
    _raises(ConfigError, lambda: dynaflow.compile(make_mlp(), executor="threads"),
            "executor='threads'", "Did you mean 'thread'?")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_unavailable_executor_on_call():
    compiled = dynaflow.compile(make_mlp(), executor="cuda", nano_batches=2)
    _raises(BackendError, lambda: compiled(mlp_input(4)), "executor='cuda' needs a CUDA device",
            "torch.cuda.is_available() is False", "executor='auto'")


def test_unknown_config_key_suggests_nearest():
    _raises(ConfigError, lambda: dynaflow.compile(make_mlp(), config={"nano_batch": 2}),
            "'nano_batch'", "Did you mean 'nano_batches'?", "Valid options:")


def test_wait_timeout_must_be_positive():
    _raises(ConfigError, lambda: dynaflow.compile(make_mlp(), config={"wait_timeout": 0}), "wait_timeout=0", "> 0")


# -- strategies --------------------------------------------------------------------------------------
def test_unknown_strategy_lists_available_names():
    msg = _raises(StrategyError, lambda: dynaflow.compile(make_mlp(), strategy="nanoflw"),
                  "'nanoflw'", "Did you mean 'nanoflow'?")
    for name in dynaflow.strategies.available():
        assert name in msg
    assert "'pkg.module:Class'" in msg  # how to pass a custom one


def test_unknown_strategy_without_close_match():
    msg = _raises(StrategyError, lambda: dynaflow.compile(make_mlp(), strategy="zzz"), "'zzz'",
                  "auto, eager, nanoflow, prefill_decode, round_robin, sequential, two_batch_overlap")
    assert "Did you mean" not in msg


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("no_such_module_xyz:Foo", ["cannot import module 'no_such_module_xyz'"]),
        ("dynaflow.strategies:Nope", ["has no attribute 'Nope'"]),
        ("collections:OrderedDict", ["not a Strategy subclass"]),
        (42, ["Cannot use 42 as a strategy", "nanoflow"]),
    ],
)
def test_bad_strategy_specs(spec, needles):
    _raises(StrategyError, lambda: dynaflow.strategies.get(spec), *needles)


def test_strategy_options_errors():
    _raises(StrategyError, lambda: dynaflow.strategies.get("sequential", bogus=1), "'sequential'", "no option 'bogus'",
            "Valid options: nano_batches, min_rows")
    _raises(StrategyError, lambda: dynaflow.strategies.get("round_robin", lane=3), "no option 'lane'",
            "Did you mean 'lanes'?")
    _raises(StrategyError, lambda: dynaflow.strategies.get(dynaflow.strategies.Sequential(), nano_batches=2),
            "cannot be applied to an instance")
    _raises(StrategyError, lambda: dynaflow.strategies.get("round_robin", lanes=0), "lanes=0", ">= 1")


def _invalid_plan_strategy(kind: str) -> type[dynaflow.Strategy]:
    """A strategy whose plan() breaks one schedule invariant on the 5-segment MLP chain."""

    class Broken(dynaflow.Strategy):
        name = f"broken_{kind}"

        def plan(self, graph, split):
            ops = list(graph.ops)
            main, side = Lane("main"), Lane("side")
            if kind == "missing":
                return Schedule.from_lanes(self.name, split, {main: ops[:-1]})
            if kind == "duplicated":
                return Schedule.from_lanes(self.name, split, {main: ops, side: [ops[0]]})
            if kind == "dependency":  # last op first: it runs before its producer on the same lane
                return Schedule.from_lanes(self.name, split, {main: ops[-1:] + ops[:-1]})
            if kind == "cycle":
                # With segments s0 -> s1: main runs s1[nb1], s0[nb0]; side runs s1[nb0], s0[nb1].
                # s1[nb1] waits for s0[nb1] (side, after s1[nb0]), which waits for s0[nb0] (main, after
                # s1[nb1]): a cross-lane deadlock with no dependency later on its own lane.
                seg = [s.name for s in graph.segments]
                l0, l1 = seg[0], seg[1]
                first_main = [NanoOp(l1, 1), NanoOp(l0, 0)]
                first_side = [NanoOp(l1, 0), NanoOp(l0, 1)]
                rest = [op for op in ops if op not in first_main + first_side]
                return Schedule.from_lanes(self.name, split, {main: first_main + rest, side: first_side})
            raise AssertionError(kind)

    return Broken


@pytest.mark.parametrize(
    "kind, needles",
    [
        ("missing", ["1 op(s) never scheduled", "Every op of the graph must be placed"]),
        ("duplicated", ["scheduled more than once", "[nb0]"]),
        ("dependency", ["dependency violated on lane Lane('main')", "runs later", "Put "]),
        ("cycle", ["cycle (a deadlock)", "@main", "@side", "Reorder the lanes"]),
    ],
)
def test_strategy_returning_invalid_schedule(kind, needles):
    strat = _invalid_plan_strategy(kind)
    compiled = dynaflow.compile(make_mlp(), strategy=strat, nano_batches=2, rules=CHAIN_RULES)
    with grad_off():
        msg = _raises(ScheduleError, lambda: compiled(mlp_input(4)), f"Strategy 'broken_{kind}'", *needles)
    if kind == "missing":
        assert "linear_2[nb1]" in msg  # the op left out, by name
    if kind == "cycle":
        assert "dependency violated" not in msg


def test_strategy_plan_raising_is_wrapped():
    class Raises(dynaflow.Strategy):
        name = "raises"

        def plan(self, graph, split):
            raise RuntimeError("boom")

    compiled = dynaflow.compile(make_mlp(), strategy=Raises, nano_batches=2)
    with pytest.raises(StrategyError, match=r"Strategy 'raises'\.plan\(\) raised RuntimeError: boom") as info:
        compiled(mlp_input(4))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_strategy_plan_returning_non_schedule():
    class NotSchedule(dynaflow.Strategy):
        name = "not_schedule"

        def plan(self, graph, split):
            return [op for op in graph.ops]

    compiled = dynaflow.compile(make_mlp(), strategy=NotSchedule, nano_batches=2)
    _raises(StrategyError, lambda: compiled(mlp_input(4)), "'not_schedule'", "returned list", "must return a Schedule")


def test_strategy_split_config_with_wrong_total():
    class BadSplit(dynaflow.Strategy):
        name = "bad_split"

        def split_config(self, info):
            return dynaflow.SplitConfig((1, 1))

    compiled = dynaflow.compile(make_mlp(), strategy=BadSplit)
    _raises(StrategyError, lambda: compiled(mlp_input(4)), "'bad_split'", "SplitConfig(2 → 1/1)", "batch size 4")


# -- rules -------------------------------------------------------------------------------------------
def test_unknown_mod_rule_target():
    compiled = dynaflow.compile(make_transformer(), rules=[dynaflow.Mod("NoSuchModule")])
    msg = _raises(PartitionError, lambda: compiled(transformer_input(4)),
                  "Mod('NoSuchModule'", "matches no node", "Fix the rule's target or drop the rule")
    for cls in ("Attention", "Block", "FeedForward", "LayerNorm", "Linear"):
        assert cls in msg  # the classes that do exist


def test_mod_rule_typo_suggests_class():
    compiled = dynaflow.compile(make_transformer(), rules=[dynaflow.Mod("FeedForwrd")])
    _raises(PartitionError, lambda: compiled(transformer_input(4)), "Did you mean 'FeedForward'?")


def test_unmatched_op_rule_lists_ops():
    compiled = dynaflow.compile(make_mlp(), rules=[dynaflow.Op("conv2d")])
    _raises(PartitionError, lambda: compiled(mlp_input(4)), "Op('conv2d'", "matches no node", "torch._C._nn.linear")


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda: dynaflow.Op(""), ["non-empty regex"]),
        (lambda: dynaflow.Op("(("), ["Op('((')", "invalid regex"]),
        (lambda: dynaflow.Mod(3), ["module class", "got 3"]),
        (lambda: dynaflow.Seq(dynaflow.Op("a")), ["at least two rules", "got 1"]),
        (lambda: dynaflow.Where(3), ["callable", "got 3"]),
        (lambda: dynaflow.Op("linear", tags=("memroy",)), ["unknown tag 'memroy'", "Did you mean 'memory'?"]),
        (lambda: dynaflow.mark(""), ["non-empty segment name"]),
    ],
)
def test_malformed_rules(make, needles):
    _raises(PartitionError, make, *needles)


def test_rule_that_is_not_a_rule():
    compiled = dynaflow.compile(make_mlp(), rules=[42])
    _raises(PartitionError, lambda: compiled(mlp_input(4)), "Cannot use 42 as a split rule", "dynaflow.Op(regex)")


# -- capture -----------------------------------------------------------------------------------------
class _ReturnsStrAndTensor(nn.Module):
    def forward(self, x):
        return x * 2, "hello"


class _Box:
    def __init__(self, t):
        self.t = t


class _ReturnsObject(nn.Module):
    def forward(self, x):
        return _Box(x * 2)


class _ReturnsDictWithInt(nn.Module):
    def forward(self, x):
        return {"y": x + 1, "n": 3}


@pytest.mark.parametrize("model, bad_type", [(_ReturnsStrAndTensor(), "str"),
                                             (_ReturnsObject(), "_Box, which dynaflow does not look inside"),
                                             (_ReturnsDictWithInt(), "int at output['n']")])
def test_model_returning_non_tensor(model, bad_type):
    compiled = dynaflow.compile(model, nano_batches=2)
    _raises(CaptureError, lambda: compiled(mlp_input(4)), "non-tensor values", bad_type, "Return tensors only")


class _ReturnsOnlyStr(nn.Module):
    def forward(self, x):
        return "hello"


def test_model_returning_only_a_string_raises_capture_error():
    compiled = dynaflow.compile(_ReturnsOnlyStr(), nano_batches=2)
    with pytest.raises(CaptureError):
        compiled(mlp_input(4))


def test_model_returning_only_a_string_names_the_problem():
    compiled = dynaflow.compile(_ReturnsOnlyStr(), nano_batches=2)
    _raises(CaptureError, lambda: compiled(mlp_input(4)), "non-tensor values", "str")


def test_static_batch_capture_runs_whole_with_one_warning(caplog):
    model = make_mlp()
    compiled = torch.compile(model, backend="dynaflow", options={"nano_batches": 2}, dynamic=False)
    x = mlp_input(4, seed=123)
    with grad_off(), caplog.at_level(logging.WARNING, logger="dynaflow"):
        torch.testing.assert_close(compiled(x), model(x))
        torch.testing.assert_close(compiled(x), model(x))
    warned = [r for r in caplog.records if "static batch dim" in r.getMessage()]
    assert len(warned) == 1 and "dynamic=True" in warned[0].getMessage()


def test_the_most_natural_torch_compile_call_returns_the_eager_answer():
    model = make_mlp()
    x = mlp_input(6, seed=5)
    with grad_off():
        torch.testing.assert_close(torch.compile(model, backend="dynaflow")(x), model(x))


def test_static_batch_capture_cannot_be_split_when_strict():
    model = make_mlp()
    compiled = torch.compile(model, backend="dynaflow", options={"nano_batches": 2, "strict": True}, dynamic=False)
    with pytest.raises(CaptureError, match=r"static batch dim.*cannot be split into 2 nano-batches") as info:
        compiled(mlp_input(4, seed=123))  # a fresh tensor: not marked dynamic by an earlier call
    assert "mark_dynamic" in str(info.value) and "dynamic=True" in str(info.value)


def test_torch_compile_backend_works_with_dynamic_batch():
    model = make_mlp()
    compiled = torch.compile(model, backend="dynaflow", options={"nano_batches": 2, "strategy": "round_robin"},
                             dynamic=True)
    x = mlp_input(6, seed=7)
    with grad_off():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


# -- batch coupling ----------------------------------------------------------------------------------
def test_strict_rejects_batch_coupled_model():
    compiled = dynaflow.compile(make_coupled(), nano_batches=2, strict=True)
    msg = _raises(BatchCouplingError, lambda: compiled(mlp_input(4)),
                  "couples the batch", "node 'mean'", "along the batch dim", "strict=True", "batch-local")
    assert re.search(r"Segment '\w+'", msg)
    assert "h - h.mean(0)" in msg  # the user's source line


def test_barrier_without_strict_gives_the_right_answer():
    model = make_coupled()
    compiled = dynaflow.compile(model, nano_batches=2, strategy="round_robin", executor="thread")
    x = mlp_input(6)
    with grad_off():
        out = compiled(x)
        # the mean must be over all 6 rows, not per nano-batch of 3
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
        wrong = torch.cat([model(x[:3]), model(x[3:])])
        assert not torch.allclose(out, wrong, atol=1e-3)
    kinds = {s.kind for s in compiled.last_graph.segmented.segments}
    assert dynaflow.SegmentKind.BARRIER in kinds


def test_batch_local_tag_trusts_the_user():
    """Tagging the coupled segment 'batch-local' silences the analysis: it is split (and therefore per-nano-batch)."""
    model = make_coupled()
    rules = [dynaflow.Op(r"mean|sub", name="centre", tags=("batch-local",))]
    compiled = dynaflow.compile(model, nano_batches=2, rules=rules, strict=True)  # no BatchCouplingError
    x = mlp_input(6)
    with grad_off():
        out = compiled(x)
        sliced = torch.cat([model(x[:3]), model(x[3:])])
    torch.testing.assert_close(out, sliced, atol=1e-5, rtol=1e-5)
    assert all(not s.whole for s in compiled.last_graph.segmented.segments)


# -- backend -----------------------------------------------------------------------------------------
def test_program_with_wrong_input_count():
    compiled = dynaflow.compile(make_mlp(), nano_batches=2)
    with grad_off():
        compiled(mlp_input(4))
    graph = compiled.last_graph
    plan = graph.last_plan
    program = lower(graph.segmented, plan.graph, plan.schedule)
    for ex in (SerialExecutor(), ThreadExecutor()):
        _raises(BackendError, lambda: ex.run(program, []), f"Program expects {program.num_inputs} inputs, got 0")


def test_thread_executor_reports_a_failing_lane():
    """A lane failing surfaces as a BackendError, not a hang."""
    compiled = dynaflow.compile(make_mlp(), strategy="round_robin", nano_batches=2, rules=CHAIN_RULES,
                                executor="thread")
    with grad_off():
        compiled(mlp_input(4))
    graph = compiled.last_graph
    plan = graph.last_plan
    program = lower(graph.segmented, plan.graph, plan.schedule)
    # No real inputs: the first launch on each lane raises inside its segment.
    inputs = [None] * program.num_inputs
    with pytest.raises(BackendError, match=r"lane failed"):  # splitting a None input: dynaflow's own failure
        ThreadExecutor(wait_timeout=5).run(program, inputs)


def test_a_lane_failing_outside_a_segment_is_a_backend_error():
    """What a lane raises outside a segment's code is dynaflow's failure: a BackendError naming it."""
    executors = importlib.import_module("dynaflow.backend.executors")  # the module (the package attribute is the registry)
    compiled = dynaflow.compile(make_mlp(), strategy="round_robin", nano_batches=2, rules=CHAIN_RULES,
                                executor="thread")
    with grad_off():
        compiled(mlp_input(4))

    def broken_loop(*args, **kwargs):
        raise KeyError("slot 7")

    with pytest.MonkeyPatch.context() as mp, grad_off():
        mp.setattr(executors, "step_loop", broken_loop)
        with pytest.raises(BackendError, match=r"A lane failed while running the program: KeyError\('slot 7'\)"):
            compiled(mlp_input(4))


@torch.library.custom_op("dftest_errors::rows_in_fours", mutates_args=())
def _rows_in_fours(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] % 4:
        raise RuntimeError(f"rows_in_fours needs rows in fours, got {x.shape[0]}")
    return x * 2


@_rows_in_fours.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_an_error_inside_a_split_segment_says_where_it_was_raised(executor):
    """A kernel that fails only on a nano-batch (a wrong rule the user registered): the model's own exception,
    its type kept on every executor, carries which nano-op raised it and what to do."""
    from dynaflow.frontend.aten_rules import register_batch_rule, rows

    register_batch_rule("dftest_errors::rows_in_fours", rows(x=0))
    compiled = dynaflow.compile(lambda x: torch.ops.dftest_errors.rows_in_fours(x) + 1, strategy="round_robin",
                                nano_batches=2, executor=executor, config={"verify": False})
    with pytest.raises(RuntimeError) as info, grad_off():
        compiled(torch.randn(4, 3))
    text = str(info.value) + "".join(getattr(info.value, "__notes__", ()))
    assert "rows in fours, got 2" in text and "raised by glue_0[nb" in text and "tag that segment 'barrier'" in text


# -- batch of one --------------------------------------------------------------------------------------
def test_batch_of_one_runs_unsplit():
    model = make_mlp()
    compiled = dynaflow.compile(model, nano_batches=1)
    x = mlp_input(1)
    with grad_off():
        assert torch.equal(compiled(x), model(x))


def test_batch_of_one_is_planned_as_batch_one():
    model = make_mlp()
    compiled = dynaflow.compile(model, nano_batches=1)
    with grad_off():
        compiled(mlp_input(1))
    assert compiled.last_graph.last_plan.split == dynaflow.SplitConfig((1,))
    assert sorted(compiled.last_graph.plans) == [1]


def test_batch_of_one_with_two_nano_batches_is_a_config_error():
    compiled = dynaflow.compile(make_mlp(), nano_batches=2)
    _raises(ConfigError, lambda: compiled(mlp_input(1)), "nano_batches=2", "batch of 1 rows", "nano_batches<= 1")


def test_lowering_an_unverified_cross_lane_deadlock_fails_fast():
    """lower() expects a verified schedule; a cross-lane deadlock still fails loudly instead of hanging."""
    compiled = dynaflow.compile(make_mlp(), nano_batches=2, rules=CHAIN_RULES, executor="serial")
    with grad_off():
        compiled(mlp_input(4))
    graph = compiled.last_graph
    nano_graph = graph.last_plan.graph
    s0, s1 = [s.name for s in nano_graph.segments[:2]]
    first_main, first_side = [NanoOp(s1, 1), NanoOp(s0, 0)], [NanoOp(s1, 0), NanoOp(s0, 1)]
    rest = [op for op in nano_graph.ops if op not in first_main + first_side]
    bad = Schedule.from_lanes("deadlock", nano_graph.split, {Lane("main"): first_main + rest, Lane("side"): first_side})
    _raises(BackendError, lambda: lower(graph.segmented, nano_graph, bad), "Program deadlocks")


@pytest.mark.parametrize("config", [3, "cuda_graphs", ["verify"]], ids=["int", "str", "list"])
def test_config_that_is_not_a_dict(config):
    _raises(ConfigError, lambda: dynaflow.compile(make_mlp(), config=config), "must be a dict",
            type(config).__name__)


def test_any_option_may_be_passed_by_keyword():
    """``compile(model, strategy_options=..., verify=...)`` equals passing them in ``config``; a keyword
    overrides the same option in ``config``; an unknown keyword is a ConfigError with the closest name."""
    model, x = make_mlp(), mlp_input(6)
    with grad_off():
        ref = model(x)
        c = dynaflow.compile(model, strategy="nanoflow", strategy_options={"nano_batches": 3}, executor="serial",
                             config={"strategy_options": {"nano_batches": 2}})
        torch.testing.assert_close(c(x), ref, atol=1e-5, rtol=1e-5)  # a split GEMM may round differently
    assert c.config.strategy_options == {"nano_batches": 3}
    assert len(c.last_graph.last_plan.split.sizes) == 3
    _raises(ConfigError, lambda: dynaflow.compile(model, cuda_graph=True), "'cuda_graph'", "cuda_graphs")
    _raises(ConfigError, lambda: dynaflow.compile(model, strategy_options=[("nano_batches", 2)]),
            "strategy_options=", "must be a dict")


@pytest.mark.parametrize("name", ["verify", "strict"])
def test_flags_must_be_bools(name):
    _raises(ConfigError, lambda: dynaflow.compile(make_mlp(), **{name: "yes"}), f"{name}='yes'", "True or False")


def test_what_dynamo_cannot_capture_is_a_config_error():
    model = make_mlp()
    _raises(ConfigError, lambda: dynaflow.compile(3), "got int", "nn.Module")
    _raises(ConfigError, lambda: dynaflow.compile(torch.jit.script(model)), "TorchScript", "before torch.jit")


def test_a_module_class_is_refused_and_leaves_the_class_usable():
    """The class, not an instance: calling it would build a module, and Dynamo would wrap the class itself, so
    every later compile of an instance failed with a raw AssertionError."""
    _raises(ConfigError, lambda: dynaflow.compile(nn.Linear), "class Linear", "dynaflow.compile(Linear(...))",
            "@dynaflow.parallelize")
    _raises(ConfigError, lambda: dynaflow.compile(dict), "class dict", "an instance or a function")
    model, x = nn.Linear(8, 8), torch.randn(4, 8)
    with grad_off():
        torch.testing.assert_close(dynaflow.compile(model, executor="serial")(x), model(x))


def test_an_exported_program_is_compiled_as_its_module():
    model, x = make_mlp(), mlp_input(6)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with grad_off():
        c = dynaflow.compile(ep, strategy="round_robin", nano_batches=2, executor="serial")
        torch.testing.assert_close(c(x), model(x), atol=1e-5, rtol=1e-5)  # a split GEMM may round differently
    assert len(c.last_graph.last_plan.split.sizes) == 2


@pytest.mark.parametrize("make, kind", [
    (lambda: torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(3, 16)], layout=torch.jagged), "nested"),
    (lambda: mlp_input(6).to_sparse(), "sparse_coo"),
], ids=["nested", "sparse"])
def test_inputs_that_are_not_strided_dense(make, kind):
    x = make()
    for c in (dynaflow.compile(make_mlp(), strategy="round_robin", nano_batches=2),
              dynaflow.compile(torch.fx.symbolic_trace(make_mlp()), strategy="round_robin", nano_batches=2)):
        _raises(ConfigError, lambda: c(x), "Input 0", kind, "to_dense")


@pytest.mark.parametrize("lengths, phases, needles", [
    ([3, -1], None, ("(3, -1)", "negative")),
    (["3", 3], None, ("must be a sequence of ints",)),
    ("33", None, ("the string '33'",)),
    ([2.5, 3], None, ("must be a sequence of ints",)),
    ([3, 3], ["decode"], ("one phase per request (2)",)),
    ([3, 3], ["decode", "zzz"], ("'zzz' is not",)),
], ids=["negative", "str-item", "str", "float", "phase-count", "phase-name"])
def test_request_layouts_are_checked_when_declared(lengths, phases, needles):
    _raises(ConfigError, lambda: dynaflow.requests(lengths, phases).__enter__(), *needles)


def test_split_sizes_must_be_ints():
    _raises(ConfigError, lambda: dynaflow.SplitConfig("33"), "the string '33'")
    _raises(ConfigError, lambda: dynaflow.SplitConfig((1.5, 2)), "must be a sequence of ints")
    assert dynaflow.SplitConfig((torch.tensor(3), 2)).sizes == (3, 2)


def test_a_timeline_that_was_not_recorded_is_named(tmp_path):
    compiled = dynaflow.compile(make_mlp(), strategy="eager", executor="serial")
    with torch.no_grad():
        compiled(mlp_input(4))
    assert compiled.last_timeline is None  # the captured graph ran as is: no launches to time
    _raises(ConfigError, lambda: dynaflow.timeline.to_perfetto(compiled.last_timeline, tmp_path / "t.json"),
            "needs a Timeline, got NoneType", "strategy='sequential'")


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"text"', '{"profiles": 3}'])
def test_a_profile_file_of_another_shape_is_a_config_error(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_text(content)
    from dynaflow.profiles import load_profiles
    _raises(ConfigError, lambda: load_profiles(path), str(path), "dynaflow.profile(model, *inputs).save(path)")


@pytest.mark.parametrize("device", [3, ["h200"], b"h200"])
def test_cost_device_must_be_a_name(device):
    _raises(ConfigError, lambda: dynaflow.compile(make_mlp(), cost_device=device), "cost_device=", "'h200'")


def test_a_strategy_file_that_is_not_text(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\xff\xfe\x00name: nanoflow")
    _raises(StrategyError, lambda: dynaflow.load_strategy(path), "Cannot read strategy file", "utf-8")


def test_a_graph_module_called_without_its_defaulted_arguments():
    class WithDefault(nn.Module):
        def forward(self, x, y, scale=2.0):
            return x * scale + y

    gm = torch.fx.symbolic_trace(WithDefault())
    compiled = dynaflow.compile(gm, strategy="round_robin", nano_batches=2, executor="serial")
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(compiled(x, y), gm(x, y))
    torch.testing.assert_close(compiled(x, y, 3.0), gm(x, y, 3.0))


def test_small_misuses_name_the_fix():
    from dynaflow.ir import InputInfo
    from dynaflow.strategies import get

    _raises(ConfigError, lambda: InputInfo(7, "cpu", "float32", request_lengths=(3, 0, 4)),
            "request 1 has no rows", "leave requests without rows out")
    _raises(StrategyError, lambda: get("nanoflow", weights=[float("nan"), 1.0]), "must be positive numbers")
    _raises(StrategyError, lambda: get("nanoflow", weights=[1, 2, 3], nano_batches=2), "give 3 nano-batches",
            "nano_batches=2", "one weight per nano-batch")
    _raises(StrategyError, lambda: get("nanoflow", sm_counts={"compute": "x"}), "sm_counts['compute']='x'",
            "int >= 1")
    _raises(StrategyError, lambda: get("nanoflow", sm_counts=5), "sm_counts=5 must map lanes to SM counts")
    assert get("nanoflow", weights=[1e308, 1e308]).split_config(InputInfo(8, "cpu", "float32")).sizes == (4, 4)
    _raises(StrategyError, lambda: get(":Foo"), "'pkg.module:Class'")
    _raises(StrategyError, lambda: get(".rel:Foo"), "module's absolute name")
    _raises(ScheduleError, lambda: Schedule.from_lanes("mine", dynaflow.SplitConfig((2,)), {None: []}),
            "lane None is a NoneType")
    _raises(ScheduleError, lambda: Schedule.from_lanes("mine", dynaflow.SplitConfig((2,)), {"main": []}),
            "lane 'main' is a str", "Lane('main')")
    with pytest.raises(Exception) as info:  # torch wraps a backend's error in its BackendCompilerFailed
        torch.compile(make_mlp(), backend="dynaflow", mode="max-autotune")(mlp_input(4))
    assert isinstance(info.value.__cause__ or info.value.inner_exception, ConfigError), info.value
    assert "options={'cuda_graphs': True}" in str(info.value)


@pytest.mark.parametrize("options, says", [
    (dict(strategy_options={1: 2}), "strategy_options=.* by name"),
    (dict(wait_timeout=float("nan")), "wait_timeout=nan must be > 0"),
    (dict(profile=5), "profile=5 must be a path written by dynaflow.profile"),
    (dict(profile=[5]), r"profile=\[5\] must be a path"),
    (dict(cost=5), "cost=5 must be a dynaflow.cost.CostModel"),
    (dict(rules="linear"), "rules='linear' must be a list of split rules"),
    (dict(rules=5), "rules=5 must be a list of split rules"),
    (dict(nano_batches=True), "nano_batches=True must be an int >= 1"),
    (dict(batch_dim=True), "batch_dim=True must be a non-negative int"),
], ids=["non-string-option-name", "nan-timeout", "int-profile", "list-of-int-profile", "int-cost", "str-rules",
        "int-rules", "bool-nano-batches", "bool-batch-dim"])
def test_config_values_refused_at_compile(options, says):
    """A non-string option name was a raw TypeError; a NaN timeout was accepted, and every thread-executor call
    then failed with 'did not finish within nans'; a profile or cost model of the wrong kind failed at the first
    call that planned by cost with a raw AttributeError; a string of rules was read as one rule per letter."""
    with pytest.raises(ConfigError, match=says):
        dynaflow.compile(nn.Linear(4, 4), strategy="round_robin", executor="thread", **options)


@pytest.mark.parametrize("args, says", [
    ((123, lambda call: None), "name ops as 'namespace::name'"),
    (("softmax", lambda call: None), "name ops as 'namespace::name'"),
    (("mylib::op", 3), "the rule must be a callable"),
], ids=["int-name", "no-namespace", "rule-not-callable"])
def test_register_batch_rule_refuses_what_can_never_match_or_run(args, says):
    """A name without a namespace never matches an op (the rule was silently unused); a rule that is not callable
    failed at the first call; an int name was a raw TypeError."""
    from dynaflow.frontend.aten_rules import register_batch_rule

    with pytest.raises(ConfigError, match=says):
        register_batch_rule(*args)


def test_register_strategy_given_a_function_is_refused():
    from dynaflow.strategies import register_strategy

    def plan(graph):
        return None

    with pytest.raises(StrategyError, match="needs a Strategy subclass or a name"):
        register_strategy(plan)  # it returned the decorator and registered nothing


def test_a_schedule_whose_order_is_not_tuples_of_nano_ops_names_the_strategy():
    from dynaflow.ir import SplitConfig

    op = NanoOp("seg", 0)
    with pytest.raises(ScheduleError, match="'mine': order must hold one tuple of NanoOps per lane; got tuple of"):
        Schedule("mine", SplitConfig.whole(2), (Lane("a"),), (op,))  # type: ignore[arg-type]


def test_a_strategy_cannot_edit_the_graph_its_schedule_is_verified_against():
    """A strategy that removed the graph's edges made a reversed order pass verification; the step then failed
    with a raw TypeError blaming the split."""
    class Editor(dynaflow.Strategy):
        name = "edits_graph"

        def plan(self, graph, split):
            graph.g.remove_edges_from(list(graph.g.edges))
            return Schedule.from_lanes(self.name, split, {Lane("main"): list(reversed(graph.ops))})

    with grad_off(), pytest.raises(StrategyError, match="'edits_graph'.plan\\(\\) raised NetworkXError: Frozen graph"):
        dynaflow.compile(make_mlp(), strategy=Editor(), executor="serial")(mlp_input(4))


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
@pytest.mark.parametrize("called", [False, True])
def test_a_compiled_model_cannot_be_copied_and_says_what_to_copy(how, called):
    """It raised a raw TypeError (a lock, a queue, a local lambda cannot be pickled)."""
    import copy
    import pickle

    compiled = dynaflow.compile(make_mlp(), strategy="round_robin", nano_batches=2, executor="thread")
    if called:
        with grad_off():
            compiled(mlp_input(4))
    fn = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": pickle.dumps}[how]
    with pytest.raises(ConfigError, match=r"cannot be (copied|pickled).*dynaflow.compile on the copy"):
        fn(compiled)


@pytest.mark.parametrize("stage", [("1", "3"), (1.5, 2.5)], ids=["strings", "floats"])
def test_split_config_stage_sizes_are_ints_like_the_main_sizes(stage):
    """Stage sizes went through ``int()``: strings were read as numbers and (1.5, 2.5) became (1, 2)."""
    from dynaflow.ir import SplitConfig

    with pytest.raises(ConfigError, match="stage 'memory' sizes must be a sequence of ints"):
        SplitConfig((2, 2), stages=(("memory", stage),))


def test_executor_names_are_case_insensitive_where_they_are_checked_and_where_they_run():
    """``executor="SERIAL"`` passed the name check (case-insensitive) and then failed at the first call with
    "not available in this build ... needs a CUDA build"."""
    model, x = make_mlp(), mlp_input(4)
    with grad_off():
        got = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor="SERIAL")(x)
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)


def test_explain_on_a_directory_says_so(tmp_path, capsys):
    from dynaflow.cli import main

    assert main(["explain", str(tmp_path)]) == 2
    assert "a directory, not a model file" in capsys.readouterr().err
