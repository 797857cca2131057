"""The CUDA executor's eager path on CPU, with torch.cuda's streams and events replaced by fakes that check
the host-side protocol: every lane forks from the caller's stream and joins back, every event is recorded
before any stream waits on it, cross-lane values are ``record_stream``-ed before they are freed, merge
buffers move into one arena after the first step. (Real streams run on the GPU under ``pytest -m cuda``.)"""

from __future__ import annotations

import pytest
import torch

import dynaflow
from dynaflow.backend import SerialExecutor
from dynaflow.backend import cuda as cuda_mod
from dynaflow.backend import launch as launch_mod
from dynaflow.backend.streams import LaneStream
from fake_cuda import FakeStream, faked_cuda
from models import make_transformer, transformer_input
from programs import program_of


@pytest.fixture
def fake_cuda():
    with faked_cuda() as fake:
        yield fake


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
            assert torch.cuda.current_stream() is fake_cuda.caller  # lanes switched streams, then gave it back
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


def test_merge_buffers_read_by_a_barrier_move_into_the_arena(fake_cuda, monkeypatch):
    """A merge buffer that only a barrier reads is freed at its last use; the probe must still measure it."""
    from models import make_coupled, mlp_input

    model = make_coupled()
    p, inputs, _ = program_of(model, mlp_input(6), "nanoflow", 2)
    assert set(p.buffers) - set(p.output_slots.values())  # a buffer only the barrier reads
    ex = cuda_mod.CudaExecutor()
    cloned: list[set[int]] = []
    real = cuda_mod.clone_keeping_aliases
    monkeypatch.setattr(cuda_mod, "clone_keeping_aliases", lambda t: cloned.append(set(t)) or real(t))
    with torch.no_grad():
        ref = SerialExecutor().run(p, inputs)
        for _ in range(3):
            out = ex.run(p, inputs)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
            assert out.data_ptr() != ex._state(p).arena.data_ptr()  # copy_outputs=True: outside the arena
    st = ex._state(p)
    assert set(st.buffers) == set(p.buffers) and st.arena is not None
    # copy_outputs clones the outputs living in the arena, never a buffer only the step itself reads
    assert cloned and all(keys <= set(p.output_slots.values()) for keys in cloned)


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


# -- CUDA-graph bookkeeping with a fake graph (capture records launches, replay re-runs them in place) ----
def test_cuda_graphs_bucketed_calls_pad_capture_once_per_bucket_and_replay(fake_cuda):
    model = make_transformer()
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor="cuda",
                         config={"cuda_graphs": True, "capture_sizes": (4, 8)})
    with torch.no_grad():
        for batch, bucket, seed in [(5, 8, 1), (6, 8, 2), (3, 4, 3), (8, 8, 4), (5, 8, 5), (4, 4, 6), (2, 4, 7)]:
            x = transformer_input(batch, seed=seed)
            out = c(x)
            assert c.graphs[0].last_capture.size == bucket
            torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
        ex = c.graphs[0]._executors["cuda"]
        states = [st for st in ex._states.values() if ex.graphs.captured(st.program)]
        assert sorted(st.program.batch_size for st in states) == [4, 8]  # one capture per bucket
        (g8,) = [ex.graphs.captured(st.program)[0] for st in states if st.program.batch_size == 8]
        # two eager warm-up steps, then captured once and replayed on each later call; when the allocator happened
        # to give the padded input the same storage on every call, it settles and is captured once more in place
        assert g8.plan.whole and g8.graphs[0].replays + ex.graphs.recaptures == 2 and ex.graphs.recaptures <= 1
        with pytest.raises(dynaflow.DynaflowError, match="larger than the largest"):
            c(transformer_input(9))


def test_cuda_graph_static_outputs_as_views(fake_cuda):
    model = make_transformer()
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor="cuda",
                         config={"cuda_graphs": True, "copy_outputs": False})
    with torch.no_grad():
        for seed in (8, 9):  # the signature's two eager warm-up steps
            c(transformer_input(4, seed=seed))
        a = c(transformer_input(4, seed=1))
        a_val = a.clone()
        b = c(transformer_input(4, seed=2))
    assert a.data_ptr() == b.data_ptr() and not torch.equal(a, a_val)
    torch.testing.assert_close(b, model(transformer_input(4, seed=2)), atol=1e-5, rtol=1e-5)


def test_no_cudagraph_segments_run_eagerly_between_graph_pieces(fake_cuda):
    from programs import retag

    p, inputs, _ = program_of(make_transformer(), transformer_input(6), "nanoflow", 2)
    q = retag(p, {"attention_0", "glue_3"}, "no-cudagraph")
    ex = cuda_mod.CudaExecutor(cuda_graphs=True)
    with torch.no_grad():
        for seed in (1, 2, 3, 4, 5):
            x = transformer_input(6, seed=seed)
            out = ex.run(q, [x])
            assert torch.equal(out, SerialExecutor().run(p, [x]))
    (g,) = ex.graphs.captured(q)
    assert g.plan.num_graphs >= 2 and not g.plan.whole
    assert all(graph.replays == 3 for graph in g.graphs.values())


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_executor_runs_nano_context_launches_inside_the_engine_state(fake_cuda, cuda_graphs):
    """The CUDA executor shares the step loop: each nano-batch launch of a ``nano-context`` segment sees its
    own rows of the engine state, eagerly and while a graph piece is captured."""
    from dynaflow.nanocontext import nano_context
    from test_nanocontext import RULES, StatefulModel, _provider, _reference, engine_state

    torch.manual_seed(0)
    model = StatefulModel().eval()
    x = torch.randn(6, 8)
    scale = torch.arange(1, 7, dtype=torch.float32)
    ref = _reference(model, x, scale)
    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=2, rules=RULES, executor="cuda",
                            config={"cuda_graphs": cuda_graphs, "capture_sizes": [6]} if cuda_graphs else None)
    with torch.no_grad(), engine_state(scale), nano_context(_provider(scale)):
        for _ in range(3):
            torch.testing.assert_close(fast(x), ref)


@pytest.mark.parametrize("granted,knob", [({"compute": 96, "memory": 36}, "1"), ({"compute": 96}, "1"),
                                          ({"compute": 96, "memory": 36}, "0")], ids=["both", "compute-only", "off"])
def test_launches_on_a_partitioned_lane_limit_grids_to_its_sms(fake_cuda, monkeypatch, granted, knob):
    """On a lane with an SM partition, each launch runs with torch's SM carveout set to the SMs the lane does
    not have (what cuBLAS and ``available_sms`` read), and the caller's setting comes back after it; a lane
    without a partition is untouched; ``DYNAFLOW_SM_CARVEOUT=0`` leaves every launch alone."""
    from dynaflow.ir import Resource

    monkeypatch.setenv("DYNAFLOW_SM_CARVEOUT", knob)

    monkeypatch.setattr(cuda_mod, "make_lane_streams", lambda lanes, device=None: tuple(
        LaneStream(l.name, FakeStream(l.name, fake_cuda.journal), l.sm_count, granted.get(l.name), "fake-green")
        for l in lanes))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"multi_processor_count": 132}))
    carveout: list = [None]
    calls: list = []
    monkeypatch.setattr(torch._C, "_get_sm_carveout_experimental", lambda: carveout[0], raising=False)
    monkeypatch.setattr(torch._C, "_set_sm_carveout_experimental",
                        lambda v: (calls.append(v), carveout.__setitem__(0, v)), raising=False)
    seen: list = []
    real = launch_mod.run_launch

    def run_launch(launch, step):
        seen.append((launch.segment.resource, carveout[0]))
        return real(launch, step)

    monkeypatch.setattr(launch_mod, "run_launch", run_launch)
    p, inputs, _ = program_of(make_transformer(), transformer_input(6), "nanoflow", 2)
    ex = cuda_mod.CudaExecutor()
    with torch.no_grad():
        ref = SerialExecutor().run(p, inputs)
        for _ in range(2):
            seen.clear()
            assert torch.equal(ex.run(p, inputs), ref)
    if knob == "0":
        assert {c for _, c in seen} == {None} and not calls
        return
    assert {c for r, c in seen if r is Resource.COMPUTE} == {132 - 96}
    assert {c for r, c in seen if r is Resource.MEMORY} == {132 - granted["memory"] if "memory" in granted else None}
    assert carveout[0] is None and calls[-1] is None  # restored after the last launch


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_each_step_starts_after_the_previous_one_of_the_same_program(fake_cuda, cuda_graphs):
    """Steps share the arena and the captures' buffers: a step's work waits for the previous step's ``done``
    event on the device when another stream calls it (on the same stream, stream order already holds)."""
    p, inputs, _ = program_of(make_transformer(), transformer_input(6), "nanoflow", 2)
    ex = cuda_mod.CudaExecutor(cuda_graphs=cuda_graphs)
    other = FakeStream("other caller", fake_cuda.journal)
    with torch.no_grad():
        ex.run(p, inputs)
        done = ex._state(p).done
        assert done is not None and done.recorded and ("record", id(done)) in fake_cuda.caller.log
        with torch.cuda.stream(other):
            out = ex.run(p, inputs)
            assert other.log[0] == ("wait", id(done)) and ("record", id(done)) in other.log
            waits = other.log.count(("wait", id(done)))
            ex.run(p, inputs)
        assert other.log.count(("wait", id(done))) == waits  # the same stream again: no wait
        ex.run(p, inputs)
    assert ("wait", id(done)) in fake_cuda.caller.log  # back on the first stream: it waits for the other's step
    assert torch.equal(out, SerialExecutor().run(p, inputs))


def test_close_drops_the_lanes_but_leaves_their_green_contexts_alive(fake_cuda, monkeypatch):
    """Tensors record_stream-ed on a lane may outlive the executor; destroying the lane's stream under them
    would fail when they are freed, so close() forgets the lanes without destroying them."""
    from dynaflow.backend import streams as streams_mod

    released = []
    monkeypatch.setattr(streams_mod, "release_lane_streams", lambda lanes: released.append(lanes))
    p, inputs, _ = program_of(make_transformer(), transformer_input(6), "nanoflow", 2)
    ex = cuda_mod.CudaExecutor()
    with torch.no_grad():
        ex.run(p, inputs)
    ex.close()
    assert not released and not ex._lane_streams and not ex._states


def test_a_green_context_that_does_not_report_its_sms_is_sized_by_its_planned_partition():
    from dynaflow.backend.sm_partitions import SmPart

    torch_green = LaneStream("memory", None, 36, None, "torch-green-context", None, SmPart("memory", 36, 40, (0,)))
    assert cuda_mod.partition_sms(torch_green) == 40
    assert cuda_mod.partition_sms(LaneStream("compute", None, 96, 88, "cuda-python-green-context")) == 88
    assert cuda_mod.partition_sms(LaneStream("memory", None, 36, None, "fallback")) is None
    assert cuda_mod.partition_sms(LaneStream("main")) is None


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_copied_outputs_that_share_storage_stay_views_of_one_copy(fake_cuda, cuda_graphs):
    """``copy_outputs=True`` clones the outputs; a tensor and its view are cloned as one block of bytes, so the
    caller's outputs alias as eager's do (arena buffers that merely share the arena are cloned apart)."""
    w = torch.randn(8, 8)

    def f(x):
        v = x @ w
        return v, v[:, :4], (x * 2).T

    c = dynaflow.compile(f, strategy="round_robin", nano_batches=2, executor="cuda", config={"cuda_graphs": cuda_graphs})
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(6, 8)
            got, want = c(x), f(x)
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e)
    got[0].mul_(10.0)
    assert torch.equal(got[1], got[0][:, :4])  # still a view of the first output
    assert got[2].untyped_storage().data_ptr() != got[0].untyped_storage().data_ptr()


def test_clone_keeping_aliases_clones_overlapping_bytes_once():
    arena = torch.zeros(256, dtype=torch.uint8)
    a, b = arena[0:64].view(torch.float32).view(4, 4), arena[64:128].view(torch.float32).view(4, 4)
    v = torch.randn(6, 8)
    views = {0: a, 1: b, 2: v, 3: v[:, :4], 4: v.T, 5: v.view(torch.bfloat16)[:, 3:9]}
    got = cuda_mod.clone_keeping_aliases(views)
    for k, t in views.items():
        assert torch.equal(got[k], t) and got[k].stride() == t.stride() and got[k].data_ptr() != t.data_ptr()
    assert got[0].untyped_storage().data_ptr() != got[1].untyped_storage().data_ptr()  # disjoint: apart
    got[2].mul_(2.0)
    assert torch.equal(got[3], got[2][:, :4]) and torch.equal(got[4], got[2].T)
    assert torch.equal(got[5], got[2].view(torch.bfloat16)[:, 3:9])


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_graph_with_nothing_to_launch_runs(fake_cuda, cuda_graphs):
    """Between two graph breaks Dynamo may hand over a graph holding only a marker: no launch at all (found by
    the random-model search: an IndexError escaped the cuda executor)."""
    def f(x):
        y = x * 2
        torch._dynamo.graph_break()
        dynaflow.mark("cut")
        torch._dynamo.graph_break()
        return y + 1

    c = dynaflow.compile(f, strategy="round_robin", nano_batches=2, executor="cuda", config={"cuda_graphs": cuda_graphs})
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(6, 8)
            torch.testing.assert_close(c(x), f(x))
    assert any(g.last_plan.program.num_launches == 0 for g in c.graphs)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_training_steps_run_without_graphs_and_with_fresh_merge_buffers(fake_cuda, cuda_graphs):
    """A replay records no autograd history, and the arena's buffers would carry one step's history into the
    next (the third backward failed: 'Trying to backward through the graph a second time'): steps autograd
    records run uncaptured, on the caller's stream, with fresh buffers; inference steps keep both."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    c = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor="cuda",
                         config={"cuda_graphs": cuda_graphs})
    for _ in range(4):
        x = torch.randn(6, 8)
        model.zero_grad()
        c(x).sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).sum().backward()
        for g, w in zip(got, [p.grad for p in model.parameters()]):
            torch.testing.assert_close(g, w)
        if cuda_graphs:
            assert c.last_graph.last_capture.mode.value == "eager" and "autograd" in c.last_graph.last_capture.reason
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(c(x), model(x))
    if cuda_graphs:
        assert c.last_graph.last_capture.mode.value == "graph"


def test_a_step_whose_capture_fails_runs_eagerly_says_why_and_equals_eager(fake_cuda, monkeypatch, caplog):
    """A segment that copies from pageable host memory cannot be captured (seen with Falcon on an H200): the
    signature runs as eager steps, every answer equals eager, one warning, and ``explain()`` says why."""
    from fake_cuda import FakeGraph

    capturing = launch_mod.run_launch

    def refuse_in_capture(launch, step):
        if FakeGraph.active is not None and launch.segment.name == "glue_0":
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU "
                               "tensor is pinned.")
        return capturing(launch, step)

    monkeypatch.setattr(launch_mod, "run_launch", refuse_in_capture)
    model = make_transformer()
    x = transformer_input(6)
    torch._dynamo.reset()
    c = dynaflow.compile(model, strategy="nanoflow", nano_batches=2, executor="cuda", config={"cuda_graphs": True})
    with torch.no_grad(), caplog.at_level("WARNING", logger="dynaflow.backend.graph_steps"):
        ref = model(x)
        for _ in range(5):
            torch.testing.assert_close(c(x), ref, rtol=1e-5, atol=1e-5)
    assert sum("runs without CUDA graphs" in r.message for r in caplog.records) == 1
    assert "runs without CUDA graphs (its capture failed): CUDA-graph capture of" in c.explain()
