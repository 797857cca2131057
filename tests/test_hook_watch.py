"""Module hooks changed after a capture (frontend/hook_watch.py): the watch says so exactly when a forward or
backward hook of a watched module (or a global module hook) was added or removed, and a compiled model then
captures again, so its answer is eager's with the hooks as they are now."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow.frontend.hook_watch import HookWatch
from models import grad_off


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def test_the_watch_sees_hooks_added_and_removed_and_nothing_else():
    model = _net()
    watch = HookWatch([model])
    assert not watch.changed()
    handle = model[0].register_forward_hook(lambda m, i, o: o)
    assert watch.changed() and not watch.changed()  # the snapshot moves to the new hooks
    handle.remove()
    assert watch.changed() and not watch.changed()
    t = torch.zeros(2, requires_grad=True)
    t.register_hook(lambda g: g)  # a tensor hook moves the handle counter, not the model's hooks
    other = nn.Linear(2, 2)
    other.register_forward_hook(lambda m, i, o: o)  # a module the watch does not hold
    assert not watch.changed()
    model[2].register_forward_pre_hook(lambda m, i: None)
    assert watch.changed()
    model.add_module("extra", nn.Linear(8, 8))
    assert not watch.changed()
    model.extra.register_full_backward_hook(lambda m, gi, go: None)  # a submodule added after the watch began
    assert watch.changed()
    glob = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert watch.changed()
    finally:
        glob.remove()
    assert watch.changed() and not watch.changed()


@pytest.mark.parametrize("strategy", ["sequential", "round_robin"])
def test_a_compiled_module_watches_its_hooks_without_dynamos_guards(strategy, caplog):
    """A compiled module's captures carry no guards on its hook dicts (their per-call cost is the point); a hook
    added or removed later still changes the answer as in eager."""
    model = _net()
    fast = dynaflow.compile(model, strategy=strategy, nano_batches=2, executor="serial")
    assert fast.hook_watch is not None
    x = torch.randn(6, 8)
    with grad_off():
        torch.testing.assert_close(fast(x), model(x))
        before = len(fast.graphs)
        fast(x)
        assert len(fast.graphs) == before  # nothing changed: the capture is reused
        h = model[0].register_forward_hook(lambda m, i, o: o * 3)
        with caplog.at_level("INFO", logger="dynaflow.frontend.hook_watch"):
            torch.testing.assert_close(fast(x), model(x))
        # the frames that call dynaflow's backend are dropped, not every compiled model in the process
        assert "dropped Dynamo's compiled code of" in caplog.text and "torch._dynamo.reset()" not in caplog.text
        h.remove()
        torch.testing.assert_close(fast(x), model(x))
    assert fast.last_graph.last_plan.split.num == 2


def test_a_plain_function_keeps_dynamos_hook_guards():
    """A function's modules are not known, so its compiles guard every module's hooks in Dynamo, as before."""
    model = _net()
    fast = dynaflow.compile(lambda x: model(x), strategy="round_robin", nano_batches=2, executor="serial")
    assert fast.hook_watch is None
    x = torch.randn(4, 8)
    with grad_off():
        torch.testing.assert_close(fast(x), model(x))
        model[2].register_forward_hook(lambda m, i, o: o + 1)
        torch.testing.assert_close(fast(x), model(x))


def test_the_transformers_step_watches_the_models_hooks():
    """The transformers integration compiles its step function and declares the model it runs: a hook added to a
    decoder layer after the first call changes the logits as in eager."""
    pytest.importorskip("transformers")
    from dynaflow.integrations import transformers as df_hf
    from models import HF_FACTORIES

    model = HF_FACTORIES["llama"]().eval()
    ids = torch.randint(0, 64, (4, 5))
    with grad_off():
        hook = df_hf.enable(model, strategy="round_robin", nano_batches=2, executor="serial")
        try:
            assert hook.compiled.hook_watch is not None
            first = model(ids, use_cache=False).logits
            h = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 0.5)
            out = model(ids, use_cache=False).logits
        finally:
            df_hf.disable(model)
        ref = model(ids, use_cache=False).logits
        h.remove()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(first, ref)


def test_a_hook_added_before_the_first_call_resets_nothing(caplog):
    model = _net()
    fast = dynaflow.compile(model, strategy="round_robin", nano_batches=2, executor="serial")
    model[0].register_forward_hook(lambda m, i, o: o - 1)
    x = torch.randn(4, 8)
    with grad_off(), caplog.at_level("INFO", logger="dynaflow.frontend.hook_watch"):
        torch.testing.assert_close(fast(x), model(x))
    assert not [r for r in caplog.records if r.name == "dynaflow.frontend.hook_watch"]
