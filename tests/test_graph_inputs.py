"""CUDA-graph steps bind their inputs without needless copies (``backend/graph_steps.py``), checked on CPU with
the fake CUDA harness of ``test_cuda_fake`` (a fake graph replays its launches on the tensors it captured,
as a real one reads fixed addresses): stable inputs are read in place with no copy, moved inputs are copied
(and copied back when the graph writes them), an observed-stable input that moves is captured again, a
declared ``static_inputs`` entry that moves is an error. Every output and every written input equals eager.
The same count on a GPU, with the profiler's memcpy kernels, is ``tests/cuda/test_graph_inputs_cuda.py``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dynaflow
from dynaflow.backend.graph_steps import StaticInputError, plan_inputs
from dynaflow.errors import ConfigError
from dynaflow.segmented import InputRoles
from test_cuda_fake import fake_cuda  # noqa: F401 - the fixture

D, L = 8, 5
WARMUPS = 2


class Reads(nn.Module):
    """Reads a per-request cache (batch rows of ``cache``), like decode attention over a KV cache."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x))
        return self.out(h + cache.mean(1))


class Writes(Reads):
    """Also writes its cache in place, row by row (a KV-cache append)."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x))
        cache.mul_(0.5).add_(h.unsqueeze(1))
        return self.out(h + cache.sum(1))


def _compile(model: nn.Module, strategy: str = "nanoflow", nano: int = 2, **config: object) -> dynaflow.Compiled:
    return dynaflow.compile(model, strategy=strategy, nano_batches=nano, executor="cuda",
                            config={"cuda_graphs": True, **config})


def _steps(c: dynaflow.Compiled) -> object:
    return c.graphs[0]._executors["cuda"].graphs


@pytest.fixture
def copies_from(monkeypatch):
    """Every ``Tensor.copy_`` source's data pointer, to show no input is copied."""
    sources: list[int] = []
    real = torch.Tensor.copy_

    def copy_(self, src, non_blocking=False):
        sources.append(src.data_ptr())
        return real(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    return sources


@pytest.mark.parametrize("strategy,nano", [("sequential", 1), ("nanoflow", 2), ("round_robin", 3)])
def test_stable_inputs_are_read_in_place_and_never_copied(fake_cuda, copies_from, strategy, nano):
    model = Reads()
    c = _compile(model, strategy, nano)
    x, cache = torch.empty(6, D), torch.empty(6, L, D)  # an engine's persistent buffers, refilled each step
    with torch.no_grad():
        for step in range(6):
            x.copy_(torch.randn(6, D))
            cache.copy_(torch.randn(6, L, D))
            copies_from.clear()
            out = c(x, cache)
            torch.testing.assert_close(out, model(x, cache), atol=1e-5, rtol=1e-5)
            if step >= WARMUPS:
                assert not {x.data_ptr(), cache.data_ptr()} & set(copies_from), "an input was copied"
                assert _steps(c).copies == 0
    plan = _steps(c).last_plan
    assert plan is not None and not plan.copied and set(plan.in_place.values()) <= {"stable", "parameter"}


def test_fresh_inputs_are_copied_in_every_step(fake_cuda):
    model = Reads()
    c = _compile(model)
    with torch.no_grad():
        alive = []
        for step in range(5):
            x, cache = torch.randn(6, D), torch.randn(6, L, D)
            alive.append((x, cache))
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=1e-5, rtol=1e-5)
            if step > WARMUPS:
                assert _steps(c).copies == 2
    plan = _steps(c).last_plan
    assert plan is not None and {plan.roles.name(i) for i in plan.copied} == {"x", "cache"}


def test_a_stable_input_that_moves_is_captured_again_then_copied(fake_cuda):
    model = Reads()
    c = _compile(model)
    x, cache = torch.randn(6, D), torch.randn(6, L, D)
    with torch.no_grad():
        for _ in range(WARMUPS + 2):
            c(x, cache)
        assert _steps(c).recaptures == 0
        alive = []  # every cache stays alive: a new one never reuses an old one's address
        for step in range(3):
            cache = torch.randn(6, L, D)  # the caller swaps its cache tensor
            alive.append(cache)
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=1e-5, rtol=1e-5)
            assert _steps(c).recaptures == 1  # once, on the first move
            assert _steps(c).copies == (0 if step == 0 else 1)  # x stays in place; cache is copied from then on


@pytest.mark.parametrize("fresh", [False, True])
def test_written_inputs_end_as_eager_leaves_them(fake_cuda, fresh):
    """A cache the graph writes: in place when stable; copied in and back when the caller passes new tensors."""
    model = Writes()
    c = _compile(model)
    x = torch.randn(6, D)
    cache = torch.randn(6, L, D)
    ref_cache = cache.clone()
    alive = []
    with torch.no_grad():
        for step in range(6):
            if fresh:
                cache = cache.clone()
                ref_cache = ref_cache.clone()
                alive.append(cache)  # no address is reused: each one really is a new tensor
            out = c(x, cache)
            ref = model(x, ref_cache)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache, ref_cache, atol=1e-5, rtol=1e-5)
            if step > WARMUPS:
                assert _steps(c).copies == (2 if fresh else 0)  # cache in and back; x is stable


def test_a_declared_static_input_is_in_place_and_may_not_move(fake_cuda):
    model = Reads()
    c = _compile(model, static_inputs=["cache"])
    x, cache = torch.randn(6, D), torch.randn(6, L, D)
    with torch.no_grad():
        for _ in range(WARMUPS + 1):
            x = torch.randn(6, D)  # x moves: copied; the declared cache stays put
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=1e-5, rtol=1e-5)
        plan = _steps(c).last_plan
        assert plan is not None and plan.in_place[plan.roles.names.index("cache")] == "declared"
        with pytest.raises(StaticInputError, match=r"static_inputs: 'cache' .*shape \(6, 5, 8\).*same tensor"):
            c(x, cache.clone())


def test_static_inputs_by_position_and_unknown_names(fake_cuda):
    model = Reads()
    c = _compile(model, static_inputs=[1])
    assert c.config.static_inputs == ("cache",)  # a forward position becomes the argument's name
    with pytest.raises(ConfigError, match="position 2 is not a positional argument"):
        _compile(model, static_inputs=[2])
    c = _compile(model, static_inputs=["cash"])
    with torch.no_grad(), pytest.raises(ConfigError, match=r"'cash' names no input.*Did you mean 'cache'"):
        c(torch.randn(6, D), torch.randn(6, L, D))


def test_plan_inputs_reasons():
    """The policy itself: parameters and declared inputs in place, stable ones in place, the others copied."""
    w = nn.Parameter(torch.randn(3))
    a, b, d = torch.randn(2), torch.randn(2), torch.randn(2)
    roles = InputRoles(("w", "a", "b", "d", "n"), frozenset({2}), frozenset({3}))
    plan = plan_inputs([w, a, b, d, 7], {1}, roles)
    assert plan.in_place == {0: "parameter", 1: "stable", 3: "declared"}
    assert plan.copied == {2} and plan.copied_back == {2}
    assert repr(plan) == "InputPlan(in place: parameter w; declared d; stable a; copied: b (copied back: b))"
    assert plan_inputs([w, a, b, d, 7], set(), roles).copied == {1, 2}


def test_a_copied_input_that_settles_moves_in_place(fake_cuda):
    """Fresh tensors during warm-up and capture, then the same one: captured again with it in place."""
    model = Reads()
    c = _compile(model)
    x = torch.randn(6, D)
    alive = [torch.randn(6, L, D) for _ in range(WARMUPS + 1)]  # kept alive: no address is reused below
    with torch.no_grad():
        for old in alive:
            c(x, old)
        assert _steps(c).copies == 0 and _steps(c).last_plan.copied  # captured with the cache copied (a clone)
        cache = torch.randn(6, L, D)
        counts = []
        for _ in range(5):
            cache.copy_(torch.randn(6, L, D))
            torch.testing.assert_close(c(x, cache), model(x, cache), atol=1e-5, rtol=1e-5)
            counts.append(_steps(c).copies)
    assert counts == [1, 1, 0, 0, 0] and _steps(c).recaptures == 1 and not _steps(c).last_plan.copied


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(strategy=st.sampled_from(["sequential", "nanoflow", "round_robin", "two_batch_overlap"]),
       nano=st.integers(1, 3), batch=st.integers(3, 7), write=st.booleans(),
       moves=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=3, max_size=7))
def test_any_sequence_of_moved_and_stable_inputs_equals_eager(fake_cuda, strategy, nano, batch, write, moves):
    torch._dynamo.reset()
    model = Writes() if write else Reads()
    c = _compile(model, strategy, nano)
    x, cache = torch.randn(batch, D), torch.randn(batch, L, D)
    ref_cache = cache.clone()
    streak = [0, 0]
    with torch.no_grad():
        for move_x, move_cache in moves:
            x = torch.randn(batch, D) if move_x else x.copy_(torch.randn(batch, D))
            if move_cache:
                cache, ref_cache = cache.clone(), ref_cache.clone()
            torch.testing.assert_close(c(x, cache), model(x, ref_cache), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache, ref_cache, atol=1e-5, rtol=1e-5)
            streak = [streak[0] + 1 if not move_x else 1, streak[1] + 1 if not move_cache else 1]
            if min(streak) > WARMUPS:  # both kept their storage for 3 calls: read in place, nothing copied
                assert _steps(c).copies == 0


class _SlowCapturer:
    """A pure-Python capturer whose replay notices if another one runs at the same time."""

    def __init__(self) -> None:
        self.active = 0
        self.overlaps = 0

    def eager(self, program, inputs):
        return sum(float(x.sum()) for x in inputs)

    def capture(self, program, inputs):
        return list(inputs)

    def replay(self, program, captured):
        import time

        self.active += 1
        self.overlaps += self.active > 1
        time.sleep(0.002)
        self.active -= 1

    def results(self, program, captured, inputs, bound):
        return sum(float(x.sum()) for x in captured)


def test_callers_on_several_threads_take_turns_on_a_capture():
    import threading

    from dynaflow.backend.graph_steps import GraphSteps

    cap = _SlowCapturer()
    steps = GraphSteps(cap, warmups=1)
    program = type("P", (), {"inputs": InputRoles()})()
    x = torch.ones(3)
    errors = []

    def worker():
        try:
            for _ in range(20):
                assert steps.run(program, [x]) == 3.0
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and cap.overlaps == 0


@pytest.mark.parametrize("batch", [3, 4, 7])
def test_a_padded_step_writes_the_callers_input_as_eager_does(fake_cuda, batch):
    """Padded up to a capture size, the step writes a padded copy of the cache; its rows go back to the
    caller's tensor (found by the random-model search: the caller's cache kept its old values)."""
    model = Writes()
    c = _compile(model, capture_sizes=(4, 8))
    cache = torch.randn(batch, L, D)
    ref_cache = cache.clone()
    with torch.no_grad():
        for step in range(WARMUPS + 3):
            x = torch.randn(batch, D)
            torch.testing.assert_close(c(x, cache), model(x, ref_cache), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache, ref_cache, atol=1e-5, rtol=1e-5)
    assert c.graphs[0].last_capture.size == (4 if batch <= 4 else 8)


def test_overlapping_inputs_one_written_run_unsplit_without_a_graph(fake_cuda):
    """Two views of one tensor, one written in place: a graph's private input copies would break the aliasing
    eager sees, and a split would reorder the write and the read, so such a call runs unsplit and uncaptured."""
    def f(a, b):
        a.add_(1)
        return b * 2

    c = dynaflow.compile(f, strategy="round_robin", nano_batches=2, executor="cuda", config={"cuda_graphs": True})
    for second, nano, mode in [(slice(3, 9), 1, "eager"), (slice(6, 12), 2, "graph")]:  # overlapping, then disjoint
        t = torch.arange(12.0).reshape(12, 1)
        for _ in range(WARMUPS + 2):
            ref_t = t.clone()
            ref = f(ref_t[0:6], ref_t[second])
            assert torch.equal(c(t[0:6], t[second]), ref) and torch.equal(t, ref_t)
        assert c.last_graph.last_plan.split.num == nano and c.last_graph.last_capture.mode.value == mode


def test_a_declared_static_input_with_the_batch_dim_is_never_padded(fake_cuda):
    """Padding would copy a declared static input, and the graph would then read the copy: the call is refused
    by name (or runs without a graph under ``over_capture='eager'``), never a misleading 'moved' error."""
    model = Writes()
    cache = torch.randn(3, L, D)
    ref_cache = cache.clone()
    c = _compile(model, capture_sizes=(4, 8), static_inputs=["cache"])
    with torch.no_grad(), pytest.raises(dynaflow.DynaflowError, match=r"static input 'cache' has the batch dim(.|\n)*Add 3 to capture_sizes"):
        c(torch.randn(3, D), cache)
    c = _compile(model, capture_sizes=(4, 8), static_inputs=["cache"], over_capture="eager")
    with torch.no_grad():
        for _ in range(WARMUPS + 2):
            x = torch.randn(3, D)
            torch.testing.assert_close(c(x, cache), model(x, ref_cache), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache, ref_cache, atol=1e-5, rtol=1e-5)
            assert c.graphs[0].last_capture.mode.value == "eager"


def _view_then_write_after_a_break(x):
    u = x[:, :4]
    y = x * 2
    torch._dynamo.graph_break()  # the first graph returns a view of its input
    x.mul_(3.0)
    return u + 0, y


@pytest.mark.parametrize("stable", [False, True])
def test_an_output_that_views_an_input_views_the_callers_tensor(fake_cuda, stable):
    """A replay's output viewed the graph's private copy of the input, so a write to the caller's tensor after
    a graph break missed it; it is now the same view of the caller's tensor (never cloned)."""
    c = dynaflow.compile(_view_then_write_after_a_break, strategy="round_robin", nano_batches=2, executor="cuda",
                         config={"cuda_graphs": True})
    held = torch.empty(6, D)
    for _ in range(WARMUPS + 3):
        x = torch.randn(6, D)
        mine = held.copy_(x) if stable else x.clone()
        with torch.no_grad():
            got, want = c(mine), _view_then_write_after_a_break(x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    first = c.graphs[0]
    assert first.segmented.inputs.aliased and first.last_capture.mode.value == "graph"


def test_an_output_that_views_an_input_is_never_padded_or_captured_from_a_strided_view(fake_cuda):
    c = dynaflow.compile(_view_then_write_after_a_break, strategy="round_robin", nano_batches=2, executor="cuda",
                         config={"cuda_graphs": True, "capture_sizes": (4, 8), "over_capture": "eager"})
    for batch, strided in [(3, False), (3, False), (4, True), (4, True), (4, True)]:
        x = torch.randn(batch, 2 * D)[:, ::2] if strided else torch.randn(batch, D)
        want_x = x.clone()
        with torch.no_grad():
            got, want = c(x), _view_then_write_after_a_break(want_x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        first = max((g for g in c.graphs if g.segmented.inputs.aliased), key=lambda g: g.last_call_seq)
        capture = first.last_capture  # a strided input is a graph of its own (Dynamo guards on strides)
        assert capture.mode.value == "eager", capture
        assert ("not dense" if strided else "views input") in capture.reason, capture


@pytest.mark.parametrize("how", ["in place", "new storage"])
def test_weights_updated_between_steps_are_read_by_the_next_replay(fake_cuda, how):
    """A serving engine's weight update between graphed steps: written in place (``copy_``), the replay reads
    the new values; swapped for new storage (``param.data = new``), the step is captured again. Outputs equal
    eager with the new weights every step."""
    model, x, cache = Reads(), torch.randn(4, D), torch.randn(4, L, D)
    ref_model = Reads()
    c = _compile(model)
    with torch.no_grad():
        for step in range(8):
            if step in (4, 6):
                new = ref_model.lin.weight * (1.5 if step == 4 else 0.5)
                ref_model.lin.weight.copy_(new)
                if how == "in place":
                    model.lin.weight.copy_(new)
                else:
                    model.lin.weight.data = new.clone()
            torch.testing.assert_close(c(x, cache), ref_model(x, cache), atol=1e-6, rtol=1e-6)
    assert _steps(c).recaptures == (0 if how == "in place" else 2)


def test_input_fingerprints_reread_only_what_may_have_changed(monkeypatch):
    """A guarded graph's parameters keep their fingerprint while they are the same tensors at the same
    pointers; everything else is fingerprinted on every call, and an unguarded graph fingerprints all."""
    from dynaflow.backend import graph_steps

    calls: list[int] = []
    real = graph_steps.fingerprint
    monkeypatch.setattr(graph_steps, "fingerprint", lambda x: calls.append(1) or real(x))
    w, b, x = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3)), torch.randn(2, 3)
    for guarded, second in ((True, 1), (False, 3)):
        fps = graph_steps.InputFingerprints(guarded)
        calls.clear()
        first = fps([w, x, b])
        again = fps([w, x.clone(), b])
        assert len(calls) == 3 + second and first[0] == again[0] and first[1][0] != again[1][0]
    fps = graph_steps.InputFingerprints(True)
    fps([w, x, b])
    w.data = torch.randn(3, 3)  # new storage, same Parameter: re-read
    assert fps([w, x, b])[0] == real(w)
    other = nn.Parameter(w.data.view(9)[:9].view(3, 3).t())  # another object at the same pointer: re-read
    assert fps([other, x, b])[0] == real(other) != real(w)


def test_input_fingerprints_check_weights_in_one_call_where_torch_has_it(monkeypatch):
    """On CUDA builds torch has ``_tensors_data_ptrs_at_indices_equal`` (lists only, pointers by index); the
    weights are checked through it, and a weight at new storage is still re-read. A stand-in with the same
    calling convention plays it on this CPU build."""
    from dynaflow.backend import graph_steps

    checked: list[int] = []

    def ptrs_equal(tensors, data_ptrs, indices):
        assert type(tensors) is list and type(data_ptrs) is list and type(indices) is list  # pybind11 py::list&
        checked.append(len(indices))
        return all(tensors[i].data_ptr() == data_ptrs[i] for i in indices)

    monkeypatch.setattr(torch._C, "_tensors_data_ptrs_at_indices_equal", ptrs_equal, raising=False)
    w, b, x = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3)), torch.randn(2, 3)
    fps = graph_steps.InputFingerprints(True)
    first = fps((w, x, b))
    assert fps((w, x, b)) == first and checked == [2]
    w.data = torch.randn(3, 3)  # new storage, same Parameter: re-read
    moved = fps((w, x, b))
    assert moved[0] == graph_steps.fingerprint(w) != first[0] and moved[2] == first[2]
    assert fps((w, x, b)) is moved and checked == [2, 2, 2]  # nothing moved: the last list itself
    other = fps((w, x.clone(), b))  # the activation at new storage: a new list
    assert other is not moved and other[1] != moved[1] and other[0] is moved[0]


class _RecordingCapturer:
    """Records what each step did: ``eager``, ``capture`` or ``replay``, with the non-tensor it saw."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def eager(self, program, inputs):
        self.log.append(("eager", inputs[2]))

    def capture(self, program, inputs):
        self.log.append(("capture", inputs[2]))
        return list(inputs)

    def replay(self, program, captured):
        self.log.append(("replay", captured[2]))

    def results(self, program, captured, inputs, bound):
        return None


def test_a_call_like_the_last_reuses_its_capture_and_any_change_is_seen():
    """The steady step compares only the fingerprints that changed (and the non-tensors): a new non-tensor
    value, a new shape, or a weight at a new pointer is still a new signature or a move."""
    from dynaflow.backend.graph_steps import GraphSteps, InputFingerprints

    class Prog:
        inputs = InputRoles()

    program, rec = Prog(), _RecordingCapturer()
    steps, fps = GraphSteps(rec, warmups=1), InputFingerprints(guarded=True)
    w, x = nn.Parameter(torch.randn(3, 3)), torch.randn(2, 3)

    def step(*inputs):
        n = len(rec.log)
        steps.run(program, list(inputs), fps(list(inputs)))
        return [what for what, _ in rec.log[n:]], rec.log[-1][1]

    assert [step(w, x, 1) for _ in range(3)] == [(["eager"], 1), (["capture", "replay"], 1), (["replay"], 1)]
    assert step(w, x, 2) == (["eager"], 2)  # another non-tensor value: another signature
    assert step(w, x, 1) == (["replay"], 1)  # back: the first capture
    assert step(w, torch.randn(5, 3), 1) == (["eager"], 1)  # another shape: another signature
    w.data = torch.randn(3, 3)  # the weight moves: captured again, reading the new storage
    assert step(w, x, 1) == (["capture", "replay"], 1) and steps.recaptures == 1
    assert step(w, x, 1) == (["replay"], 1)
    # a repeat of the latest call is served without a signature lookup (the host path a decode step waits on)
    looked: list[int] = []
    real = steps._same_as_last
    steps._same_as_last = lambda *a: looked.append(1) or real(*a)  # type: ignore[method-assign]
    assert step(w, x, 1) == (["replay"], 1) and not looked
    assert step(w, x, 3) == (["eager"], 3) and looked  # a non-tensor changed: the full path


class Feedback(nn.Module):
    """``y`` and a value that reads the input after ``y`` is made: fed back as the next input, ``x`` is ``y``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tanh(self.fc(x))
        return y, x.sum(0) * y.sum(0)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("strategy", ["sequential", "nanoflow", "round_robin"])
def test_an_uncloned_output_fed_back_as_the_next_input_equals_eager(fake_cuda, strategy, graphs):
    """With ``copy_outputs=False`` a step returns its static buffers (the merge arena, a capture's outputs); a
    decode loop passes one back as the next input. The step must not read that input from the memory it
    writes its new outputs into: it is copied in, as a moved input is."""
    model = Feedback().eval()
    compiled = dynaflow.compile(Feedback().eval(), strategy=strategy, nano_batches=2, executor="cuda",
                                config={"cuda_graphs": graphs, "copy_outputs": False})
    x = torch.randn(6, D)
    ref_x = x.clone()
    with torch.no_grad():
        for step in range(WARMUPS + 4):
            y, s = compiled(x)
            ref_y, ref_s = model(ref_x)
            torch.testing.assert_close(y, ref_y, msg=f"step {step}")
            torch.testing.assert_close(s, ref_s, msg=f"step {step}")
            x, ref_x = y, ref_y


class WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        x.add_(y)
        return y * 2


@pytest.mark.parametrize("graphs", [False, True])
def test_an_uncloned_output_fed_back_into_a_written_input_is_refused(fake_cuda, graphs):
    """Written in place, the fed-back input and the step's new outputs would be the same memory."""
    compiled = _compile(WritesInput(), copy_outputs=False, cuda_graphs=graphs)
    with torch.no_grad():
        for _ in range(WARMUPS + 2):  # until the outputs live in the arena or the capture's buffers
            out = compiled(torch.randn(6, D))
        with pytest.raises(dynaflow.BackendError, match="copy_outputs=False.*x.clone"):
            compiled(out)
        compiled(out.clone())  # a copy is fine


class _Cache:
    """A cache object passed as one argument: its tensors are attributes (as in a transformers ``StaticCache``)."""

    def __init__(self, rows: int) -> None:
        self.layers = [type("Layer", (), {})() for _ in range(2)]
        for layer in self.layers:
            layer.keys = torch.randn(rows, L, D)


class ReadsCacheObject(Reads):
    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        h = torch.relu(self.lin(x))
        return self.out(h + cache.layers[0].keys.mean(1) + cache.layers[1].keys.mean(1))


@pytest.mark.parametrize("keyword", [False, True])
def test_static_inputs_name_an_argument_whose_tensors_are_attributes(fake_cuda, keyword):
    """Dynamo names the tensors of ``cache.layers[0].keys`` ``L_cache_layers_0_keys``; the argument's name covers
    them all, found in the call itself (by identity), whether the argument is passed by position or keyword."""
    compiled = _compile(ReadsCacheObject(), static_inputs=["cache"])
    cache, x = _Cache(6), torch.randn(6, D)
    with torch.no_grad():
        compiled(x=x, cache=cache) if keyword else compiled(x, cache)
    roles = compiled.last_graph.segmented.inputs
    declared = sorted(roles.name(i) for i in roles.declared)
    assert len(declared) == 2 and all("cache" in n for n in declared), declared


def test_static_inputs_name_a_transformers_static_cache():
    """A decode loop over a ``StaticCache`` passed by keyword, returned with the logits (``use_cache=True``):
    every tensor of the cache is declared (keys, values, lengths), read in place, and each step equals eager."""
    from fake_cuda import faked_cuda
    from models import hf_input, make_llama
    from transformers import StaticCache

    model = make_llama().eval()  # transformers' modules load before torch.cuda is faked
    compiled = dynaflow.compile(make_llama().eval(), strategy="nanoflow", nano_batches=2, executor="cuda",
                                cuda_graphs=True, static_inputs=["cache"])
    cfg = model.config
    caches = [StaticCache(config=cfg, max_cache_len=16) for _ in range(2)]
    ids = hf_input(4)
    with faked_cuda(), torch.no_grad():
        for step in range(WARMUPS + 3):
            pos = torch.arange(ids.shape[1]) if step == 0 else torch.tensor([ids.shape[1] + step - 1])
            tokens = ids if step == 0 else next_ids
            ref = model(input_ids=tokens, cache=caches[0], cache_position=pos, use_cache=True)
            out = compiled(input_ids=tokens, cache=caches[1], cache_position=pos, use_cache=True)
            assert out.cache is caches[1]
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4, msg=f"step {step}")
            next_ids = ref.logits[:, -1:].argmax(-1)
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-4, atol=1e-4)
    roles = compiled.last_graph.segmented.inputs
    declared = {roles.name(i) for i in roles.declared}
    for part in ("keys", "values"):  # Dynamo's names for them vary with the torch version
        assert sum(n.endswith(part) for n in declared) == cfg.num_hidden_layers, declared


class WritesThenBreaks(nn.Module):
    """Writes ``cache``, then a graph break: the graph after it does not read ``cache`` (nor an absent ``extra``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = self.a(x)
        cache.add_(h)
        torch._dynamo.graph_break()
        return self.b(h) if extra is None else self.b(h) + extra


@pytest.mark.parametrize("graphs", [False, True])
def test_a_static_input_some_graph_does_not_read_declares_nothing_there(fake_cuda, graphs):
    """A name of a forward argument is no error for a graph that lacks it (after a graph break, or a ``None``
    optional argument); a name that is no argument still is."""
    model = WritesThenBreaks()
    compiled = dynaflow.compile(WritesThenBreaks(), strategy="nanoflow", nano_batches=2, executor="cuda",
                                cuda_graphs=graphs, static_inputs=["cache", "extra"])
    cache, ref_cache = torch.zeros(4, D), torch.zeros(4, D)
    with torch.no_grad():
        for step in range(WARMUPS + 2):
            x = torch.randn(4, D)
            extra = None if step % 2 else torch.randn(4, D)
            torch.testing.assert_close(compiled(x, cache, extra=extra), model(x, ref_cache, extra=extra))
    torch.testing.assert_close(cache, ref_cache)
    typo = dynaflow.compile(WritesThenBreaks(), executor="cuda", cuda_graphs=graphs, static_inputs=["cahce"])
    with pytest.raises(ConfigError, match="'cahce' names no input"), torch.no_grad():
        typo(torch.randn(4, D), torch.zeros(4, D))


@pytest.mark.parametrize("name", ["a.weight", "a", "cache"])
def test_a_path_in_static_inputs_is_no_error_in_a_graph_that_does_not_read_it(fake_cuda, name):
    """A module attribute path (``a.weight``, a submodule ``a``) names tensors only the graph before the break
    reads: the graph after it declares nothing, as for an argument; the graph that reads it keeps it in place.
    Paths that reach nothing, or no tensor, are still refused by name."""
    model = WritesThenBreaks()
    compiled = dynaflow.compile(WritesThenBreaks(), strategy="nanoflow", nano_batches=2, executor="cuda",
                                cuda_graphs=True, static_inputs=[name])
    cache, ref_cache = torch.zeros(4, D), torch.zeros(4, D)
    with torch.no_grad():
        for _ in range(WARMUPS + 2):
            x = torch.randn(4, D)
            torch.testing.assert_close(compiled(x, cache), model(x, ref_cache))
    torch.testing.assert_close(cache, ref_cache)
    first = compiled.graphs[0].segmented.inputs
    assert {first.name(i) for i in first.declared} == ({"cache"} if name == "cache" else
                                                       {n for n in first.names if n.startswith("a.")} if name == "a"
                                                       else {"a.weight"}) and first.declared
    assert not compiled.graphs[1].segmented.inputs.declared
    for wrong in ("a.wieght", "training"):
        typo = dynaflow.compile(WritesThenBreaks(), executor="cuda", cuda_graphs=True, static_inputs=[wrong])
        with pytest.raises(ConfigError, match=f"'{wrong}' names no input"), torch.no_grad():
            typo(torch.randn(4, D), torch.zeros(4, D))


def test_a_dotted_path_into_an_argument_names_the_tensors_there(fake_cuda):
    """``caches.k`` reaches a dict argument's entry: declared where read, nothing where the argument is ``None``."""

    class DictCache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.l = nn.Linear(D, D)

        def forward(self, x: torch.Tensor, caches: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            h = self.l(x)
            torch._dynamo.graph_break()
            if caches is not None:
                caches["k"].add_(h)
                h = h + caches["k"]
            return h

    model = DictCache()
    compiled = dynaflow.compile(DictCache(), strategy="nanoflow", nano_batches=2, executor="cuda", cuda_graphs=True,
                                static_inputs=["caches.k"])
    k, ref_k = torch.zeros(4, D), torch.zeros(4, D)
    with torch.no_grad():
        for step in range(WARMUPS + 3):
            x = torch.randn(4, D)
            use = step % 3 != 2
            torch.testing.assert_close(compiled(x, caches={"k": k} if use else None),
                                       model(x, caches={"k": ref_k} if use else None))
    torch.testing.assert_close(k, ref_k)
    reads = [g.segmented.inputs for g in compiled.graphs if g.segmented.inputs.declared]
    assert len(reads) == 1 and len(reads[0].declared) == 1 and "k" in reads[0].name(next(iter(reads[0].declared)))


class _FailingCapturer(_SlowCapturer):
    """A capturer whose capture fails, as a CUDA-graph capture does on a copy from pageable host memory."""

    captures = 0

    def capture(self, program, inputs):
        from dynaflow.backend.graph_steps import CaptureFailed

        self.captures += 1
        raise CaptureFailed("CUDA-graph capture of Piece(0, graph, 3 launches) failed: RuntimeError: Cannot copy "
                            "between CPU and CUDA tensors during CUDA graph capture")


def test_a_signature_whose_capture_fails_runs_eagerly_and_is_not_captured_again(caplog):
    from dynaflow.backend.graph_steps import GraphSteps

    cap = _FailingCapturer()
    steps = GraphSteps(cap, warmups=1)
    program = type("P", (), {"inputs": InputRoles()})()
    with caplog.at_level("WARNING", logger="dynaflow.backend.graph_steps"):
        got = [steps.run(program, [torch.full((3,), float(i))]) for i in range(5)]
    assert got == [3.0 * i for i in range(5)]  # every call answered, by the eager step
    assert cap.captures == 1
    assert "Cannot copy between CPU and CUDA" in steps.failure(program)
    assert sum("runs without CUDA graphs" in r.message for r in caplog.records) == 1


def test_a_repeated_call_reuses_its_decisions_and_any_change_is_seen(fake_cuda, monkeypatch):
    """A call that repeats the last one (same fingerprints, ``no_grad``, no request layout, the same forced
    executor) skips planning; a new batch, a request layout, autograd or ``DYNAFLOW_EXECUTOR`` is planned anew."""
    model, ref_model = Reads(), Reads()
    c = _compile(model)
    x, cache = torch.randn(6, D), torch.randn(6, L, D)
    with torch.no_grad():
        c(x, cache)
    graph = c.graphs[0]
    planned: list[int] = []
    real = graph.plan_for
    monkeypatch.setattr(graph, "plan_for", lambda inputs, *rest: planned.append(1) or real(inputs, *rest))

    def check(xs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
        out = c(xs, cs)
        torch.testing.assert_close(out, ref_model(xs, cs))
        return out

    with torch.no_grad():
        for _ in range(4):
            check(x, cache)
        assert not planned  # the decode loop's step: decided as the first
        check(x[:4], cache[:4])
        assert planned and graph.last_plan.split.batch_size == 4
        check(x, cache)
        planned.clear()
        with dynaflow.requests([2, 4]):
            check(x, cache)
        assert planned and graph.last_plan.split.sizes == (2, 4)  # the layout's boundaries, not an even split
        check(x, cache)
        assert graph.last_plan.split.sizes == (3, 3)
        monkeypatch.setenv("DYNAFLOW_EXECUTOR", "serial")
        with pytest.raises(dynaflow.errors.BackendError, match="needs the cuda executor"):
            c(x, cache)
        monkeypatch.delenv("DYNAFLOW_EXECUTOR")
        check(x, cache)
    out = check(x, cache)  # autograd on (a graph of its own for Dynamo): unsplit, with the history eager records
    assert out.grad_fn is not None and "autograd" in c.last_graph.last_capture.reason
    with torch.no_grad():
        planned.clear()
        check(x, cache)
        assert not planned and c.last_graph is graph


class BatchFreeTail(nn.Module):
    """A graph break, then a graph whose inputs hold no batch dim: its batch is the caller's, not its inputs'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        torch._dynamo.graph_break()
        return y, self.lin.weight.sum(0) * 2


def test_a_repeat_of_a_graph_without_the_batch_in_its_inputs_follows_the_callers_batch(fake_cuda):
    """Equal fingerprints are not the same call when the batch comes from the caller: a new batch is planned."""
    model, ref = BatchFreeTail(), BatchFreeTail()
    c = _compile(model, "sequential", 1)
    with torch.no_grad():
        for batch in (6, 6, 6, 4, 4, 6):
            x = torch.randn(batch, D)
            for got, want in zip(c(x), ref(x)):
                torch.testing.assert_close(got, want)
            tail = c.graphs[-1]
            assert tail._batch_source is None and tail.last_plan.split.batch_size == batch
