"""Inductor per segment (backend/inductor.py): ``inductor=True`` on the CPU executors.

Inductor's fused kernels round differently from eager (observed here up to ~6e-8 absolute on the MLP),
so results are compared with ``assert_close(atol=1e-5, rtol=1e-5)``.
"""

from __future__ import annotations

import pytest
import torch

import dynaflow
from dynaflow.backend import SerialExecutor
from dynaflow.backend.inductor import InductorSegments, signature
from dynaflow.errors import BackendError
from models import make_mlp, make_transformer, mlp_input, transformer_input
from programs import program_of, retag

TOL = dict(atol=1e-5, rtol=1e-5)


def _compiled_fn(fn) -> bool:
    return type(fn).__name__ == "OptimizedModule" or hasattr(fn, "_torchdynamo_orig_callable")


@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_inductor_compiles_once_and_matches_eager(executor):
    model = make_mlp()
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor=executor, config={"inductor": True})
    x = mlp_input(5)
    with torch.no_grad():
        out = c(x)
        torch.testing.assert_close(out, model(x), **TOL)
        g = c.graphs[0]
        compiled = g._inductor
        assert compiled is not None and compiled.num_compiled == 1  # the lane's launches (rows 3 and 2): one run
        x2 = mlp_input(5, seed=4)
        torch.testing.assert_close(c(x2), model(x2), **TOL)
        assert compiled.num_compiled == 1  # the second call compiles nothing
        assert c.program is g.last_plan.program  # the planned program stays the inspectable one


def test_unfused_compiles_once_per_nano_size():
    p, inputs, _ = program_of(make_mlp(), mlp_input(5), "nanoflow", 2)
    ind = InductorSegments(fuse=False)
    with torch.no_grad():
        q = ind.program_for(p, inputs)
        assert ind.num_compiled == 2  # sizes 3 and 2 of one segment
        torch.testing.assert_close(SerialExecutor().run(q, inputs), SerialExecutor().run(p, inputs), **TOL)


def test_even_split_shares_one_compile_across_nano_batches():
    p, inputs, _ = program_of(make_mlp(), mlp_input(8), "nanoflow", 2)
    ind = InductorSegments(fuse=False)
    with torch.no_grad():
        q = ind.program_for(p, inputs)
        assert ind.num_compiled == 1
        assert all(_compiled_fn(l.fn) for l in q.serial_order)
        assert q.serial_order[0].fn is q.serial_order[1].fn
        torch.testing.assert_close(SerialExecutor().run(q, inputs), SerialExecutor().run(p, inputs), **TOL)
        assert ind.program_for(p, inputs) is q  # cached per program


def test_no_inductor_segments_run_as_captured():
    p, inputs, _ = program_of(make_mlp(), mlp_input(6), "nanoflow", 2)
    names = {l.segment.name for l in p.serial_order}
    q = retag(p, names, "no-inductor")
    ind = InductorSegments()
    with torch.no_grad():
        r = ind.program_for(q, inputs)
    assert ind.num_compiled == 0
    assert [l.fn for l in r.serial_order] == [l.fn for l in q.serial_order]


def test_signature_distinguishes_shapes_dtypes_and_ints():
    a = torch.zeros(2, 3)
    assert signature([a, 2]) == signature([torch.ones(2, 3), 2])
    assert signature([a, 2]) != signature([torch.zeros(3, 3), 2])
    assert signature([a, 2]) != signature([a.double(), 2])
    assert signature([a, 2]) != signature([a, 3])


def test_inductor_failure_names_the_segment_and_the_fix():
    p, inputs, _ = program_of(make_mlp(), mlp_input(4), "nanoflow", 2)
    ind = InductorSegments(fuse=False)

    def boom(launch, args):
        def fn(*a):
            raise RuntimeError("codegen exploded")
        return fn

    ind._compile_one = boom  # type: ignore[method-assign]
    with pytest.raises(BackendError, match=r"Inductor failed on segment '.*'.*codegen exploded.*no-inductor"):
        with torch.no_grad():
            ind.program_for(p, inputs)


def test_inductor_failure_on_a_fused_run_names_its_segments(caplog):
    """A fused run Inductor fails on is named in a warning, and the program's segments then compile one by one; a
    segment that fails on its own is the error, with the fix."""
    p, inputs, _ = program_of(make_transformer(), transformer_input(4), "sequential", 1)
    ind = InductorSegments()

    def boom(launch, args):
        def fn(*a):
            raise RuntimeError("codegen exploded")
        return fn

    ind._compile_one = boom  # type: ignore[method-assign]
    first, second = p.serial_order[0].segment.name, p.serial_order[1].segment.name
    with pytest.raises(BackendError, match=rf"segment '{first}' .*codegen exploded.*failing segment 'no-inductor'"):
        with torch.no_grad(), caplog.at_level("WARNING", logger="dynaflow.backend.inductor"):
            ind.program_for(p, inputs)
    assert f"the run of segments '{first}', '{second}'," in caplog.text and "one by one instead" in caplog.text


def test_segments_on_a_partitioned_lane_compile_for_the_lanes_sms(monkeypatch):
    """A launch on a lane with an SM partition is compiled (its first call) under torch's SM carveout for the
    SMs its lane lacks, so Inductor's grids and GEMM choices fit the partition; the SM budget is part of the
    compile key, and the caller's carveout is back afterwards."""
    from dynaflow.backend import inductor as inductor_mod
    from dynaflow.backend.sm_partitions import launch_carveouts, planned_sms

    sms = {"compute": 96, "memory": 36}
    p, inputs, _ = program_of(make_transformer(), transformer_input(6), "nanoflow", 2,
                              strategy_options={"sm_counts": sms})
    assert {lane.name: lane.sm_count for lane in p.lanes} == sms
    granted = planned_sms(p.lanes, 132, 9)  # an H100's plan: compute a group, memory the remainder
    assert granted == {"compute": 96, "memory": 36}
    monkeypatch.setattr(inductor_mod, "compile_carveouts",
                        lambda program, _inputs: launch_carveouts(program.serial_order, granted, 132))
    seen: dict = {}
    ind = InductorSegments()

    def compile_one(launch, args):
        def fn(*a):
            seen.setdefault((launch.lane, launch.segment.name, id(fn)), []).append(
                torch._C._get_sm_carveout_experimental())
            return launch.fn(*a)
        return fn

    monkeypatch.setattr(ind, "_compile_one", compile_one)
    before = torch._C._get_sm_carveout_experimental()
    with torch.no_grad():
        q = ind.program_for(p, inputs)
        compiling = {lane: {c for (l, _, _), calls in seen.items() if l == lane for c in calls} for lane, _, _ in seen}
        seen.clear()
        torch.testing.assert_close(SerialExecutor().run(q, inputs), SerialExecutor().run(p, inputs))
    assert compiling == {"compute": {132 - 96}, "memory": {132 - 36}}  # compiled under its lane's carveout
    assert {c for calls in seen.values() for c in calls} == {before}  # the executor's runs: the caller's setting
    assert torch._C._get_sm_carveout_experimental() == before
    keys = {k[2] for k in ind._compiled}
    assert keys == {132 - 96, 132 - 36}


CPU_EMULATES_CASTS = torch.torch_version.TorchVersion(torch.__version__) >= "2.13"
"""Inductor's C++ backend honours ``emulate_precision_casts`` from torch 2.13; torch 2.11's ignores it (measured:
the compat tier's answer differs from eager's by half-precision rounding)."""


def test_dtype_casts_round_as_in_eager():
    """``x.half().float()`` inside an Inductor segment rounds to half as eager does (Inductor alone keeps the
    float value: ``emulate_precision_casts``), so the segment's answer is eager's bit for bit, where Inductor
    honours the option; elsewhere within half precision."""
    def fn(x):
        return (torch.nn.functional.gelu(x) * 3).half().float() * 1.5

    c = dynaflow.compile(fn, strategy="round_robin", nano_batches=2, executor="serial", config={"inductor": True})
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tol = 0 if CPU_EMULATES_CASTS else 1e-3
        torch.testing.assert_close(c(x), fn(x), rtol=tol, atol=tol * 10)
    assert c.last_graph._inductor.num_compiled >= 1
    assert c.last_graph._inductor.options["emulate_precision_casts"] is True


_LIN = torch.nn.Linear(8, 8)


def _writes_a_reads_b(a, b):
    a.add_(_LIN(a))                                # writes ``a`` in place ...
    return _LIN(b) * 2 + a.sum(-1, keepdim=True)   # ... and reads ``b``, which may overlap it


@pytest.mark.parametrize("strategy, nano", [("round_robin", 2), ("sequential", 1)])
def test_inputs_that_overlap_a_written_one_run_uncompiled_and_equal_eager(strategy, nano):
    """Inductor compiles a segment for inputs that do not alias (and its guards do not tell views of one tensor
    apart), so a call whose inputs overlap while one is written runs the planned program: eager's answer, also
    after the same program was compiled for a call with disjoint inputs."""
    c = dynaflow.compile(_writes_a_reads_b, strategy=strategy, nano_batches=nano, executor="serial", inductor=True)
    with torch.no_grad():
        for rows in ((slice(0, 6), slice(6, 12)), (slice(0, 6), slice(3, 9)), (slice(0, 6), slice(6, 12))):
            base = torch.randn(12, 8)
            ref = base.clone()
            want = _writes_a_reads_b(ref[rows[0]], ref[rows[1]])
            torch.testing.assert_close(c(base[rows[0]], base[rows[1]]), want, **TOL)
            torch.testing.assert_close(base, ref, **TOL)


_HIDDEN = {"calls": 0}


@torch.library.custom_op("dynaflow_test::counted_scale", mutates_args=())
def _counted_scale(x: torch.Tensor) -> torch.Tensor:
    _HIDDEN["calls"] += 1  # state no argument shows, as an engine's step counter
    return x * _HIDDEN["calls"]


@_counted_scale.register_fake
def _(x):
    return torch.empty_like(x)


class _Counted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(_counted_scale(self.a(x)))


@pytest.mark.parametrize("strategy, nano", [("sequential", 1), ("nanoflow", 2)])
def test_a_step_that_may_not_run_twice_compiles_as_it_runs_once(strategy, nano):
    """An op that writes hidden state makes the step not replayable: its first call per program and shapes is the
    real step, compiling each segment as it reaches it, not a warm-up followed by the step (which would run the
    op twice)."""
    model = _Counted().eval()
    c = dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor="serial", inductor=True)
    with torch.no_grad():
        for call, batch in enumerate((4, 4, 6, 4)):
            x = torch.randn(batch, 8)
            _HIDDEN["calls"] = 10 * call
            want, eager_state = model(x), _HIDDEN["calls"]
            _HIDDEN["calls"] = 10 * call
            torch.testing.assert_close(c(x), want, **TOL)
            assert _HIDDEN["calls"] == eager_state, (call, batch)
    assert c.last_graph._inductor.num_compiled >= 1


def test_each_length_of_a_dynamic_dim_gets_its_own_compiles():
    """A program serves every sequence length of its batch split; each length is compiled and warmed before the
    executor runs it (so no segment recompiles inside a lane, and Dynamo's recompile limit is never reached)."""
    model = make_transformer(layers=1)
    c = dynaflow.compile(model, strategy="sequential", nano_batches=1, executor="serial", inductor=True)
    lengths = (3, 4, 5, 6, 7, 8, 9, 10, 11, 3)
    with torch.no_grad():
        for s in lengths:
            x = torch.randn(2, s, 16, generator=torch.Generator().manual_seed(s))
            torch.testing.assert_close(c(x), model(x), **TOL)
    ind = c.last_graph._inductor
    assert len({shapes for _, shapes in ind._programs}) == len(set(lengths))
    assert all(_compiled_fn(l.fn) for _, compiled in ind._programs.values() for l in compiled.serial_order
               if "no-inductor" not in l.segment.hints)
