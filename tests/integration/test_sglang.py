"""SGLang against the real package: contract (symbols and signatures we hook or call), the plugin entry point,
and the real SGLang Llama with a fake stateful attention backend, dynaflow-compiled vs HF transformers.

Steps: a prefill of three requests, a mixed step (two decodes as 1-token extends plus a new prefill), a pure
decode step; the same KV cache throughout, so each nano-batch must run with its own ForwardBatch / backend state.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types

import pytest
import torch

from integ_util import require

pytestmark = pytest.mark.integration

STEPS = [{0: 5, 1: 3, 2: 4}, {0: 1, 1: 1, 3: 6}, {0: 1, 1: 1, 2: 1, 3: 1}]
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def sgl():
    import sglang_shim

    sglang_shim.install()
    require("sglang")
    require("sglang.srt.models.llama")
    import sglang_harness

    import dynaflow.integrations.sglang as ds

    ds.register_host_op(r"^dftest_sgl\.")  # the fake backend's attention op reads the global backend
    return sglang_harness


# -- contract -------------------------------------------------------------------------------------------
SIGNATURES = [
    ("sglang.srt.compilation.torch_compile_decoration", "patch_model",
     ["model", "enable_compile", "num_tokens", "tp_group"]),
    ("sglang.srt.compilation.compile", "install_torch_compiled",
     ["module", "dynamic_arg_dims", "backend_factory", "compile_config", "fullgraph", "graph_pool"]),
    ("sglang.srt.plugins.hook_registry", "HookRegistry.register", ["target", "hook", "hook_type", "source"]),
    ("sglang.srt.plugins.hook_registry", "HookRegistry.apply_hooks", []),
    ("sglang.srt.plugins", "load_plugins", []),
    ("sglang.srt.model_executor.forward_context", "forward_context", ["ctx"]),
    ("sglang.srt.model_executor.forward_context", "get_forward_context", []),
    ("sglang.srt.layers.attention.base_attn_backend", "AttentionBackend.init_forward_metadata",
     ["self", "forward_batch"]),
    ("sglang.srt.layers.radix_attention", "RadixAttention.forward", ["self", "q", "k", "v", "forward_batch"]),
]


@pytest.mark.parametrize("module,attr,expected", SIGNATURES, ids=[f"{m}.{a}" for m, a, _ in SIGNATURES])
def test_hooked_and_called_symbols_have_the_expected_signature(sgl, module, attr, expected):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        assert hasattr(obj, part), f"{module}.{attr} is gone"
        obj = getattr(obj, part)
    obj = inspect.unwrap(obj)
    assert list(inspect.signature(obj).parameters)[:len(expected)] == expected, f"{module}.{attr} moved"


def test_forward_batch_and_context_fields(sgl):
    from dynaflow.integrations.sglang import _sglang
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.forward_context import ForwardContext
    from sglang.srt.plugins.hook_registry import HookType

    fields = {f.name for f in dataclasses.fields(ForwardBatch)}
    missing = [n for n in (*_sglang.TOKEN_FIELDS, *_sglang.REQUEST_FIELDS, "batch_size", "seq_lens_sum",
                           "extend_start_loc", "extend_num_tokens", "forward_mode") if n not in fields]
    assert not missing, f"ForwardBatch lost {missing}"
    assert "attn_backend" in {f.name for f in dataclasses.fields(ForwardContext)}
    assert HookType.AROUND.value == "around"
    _sglang.check_version()


def test_entry_point_loads_and_plugin_is_gated(sgl, monkeypatch):
    from importlib.metadata import entry_points

    import dynaflow.integrations.sglang as ds
    from dynaflow import knobs
    from dynaflow.integrations.sglang import _sglang
    import sglang.srt.plugins as plugins
    from sglang.srt.compilation import torch_compile_decoration as tcd
    from sglang.srt.plugins.hook_registry import HookRegistry

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "dynaflow"]
    assert len(eps) == 1 and eps[0].load() is ds.register
    original = inspect.unwrap(tcd.patch_model)
    monkeypatch.setattr(_sglang, "_REGISTERED", False)
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    with knobs.scope(DYNAFLOW_SGLANG=0):
        ds.register()
    assert not HookRegistry._hooks  # off by default: no hook registered
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    with knobs.scope(DYNAFLOW_SGLANG=1, DYNAFLOW_SGLANG_OPTIONS='{"nano_batches": 2}'):
        plugins.load_plugins()  # runs dynaflow's entry point, then HookRegistry.apply_hooks()
        assert ds.options() == {"nano_batches": 2, "min_rows": 1}
    assert _sglang.PATCH_MODEL in HookRegistry._hooks and _sglang.INSTALL_COMPILED in HookRegistry._hooks
    patched = importlib.import_module("sglang.srt.compilation.torch_compile_decoration").patch_model
    assert patched is not original

    # the hooked patch_model yields dynaflow's forward when compiling, SGLang's own otherwise
    model = sgl.build()
    tp_group = types.SimpleNamespace(ca_comm=None)
    with patched(model, True, 4, tp_group) as forward:
        assert isinstance(forward, _sglang.SglangStep)
        assert forward.model is model and forward.hook_watch is not None  # the wrapped forward's model is watched
    with patched(model, False, 4, tp_group) as forward:
        assert not isinstance(forward, _sglang.SglangStep)
    monkeypatch.setattr(tcd, "patch_model", original)


def test_install_compiled_hook_injects_dynaflow_backend_only_when_none_given(sgl):
    from dynaflow.integrations.sglang import _sglang

    seen = {}

    def original(module, **kwargs):
        seen.update(kwargs)

    _sglang._install_compiled_hook(original, object(), backend_factory=None, fullgraph=True)
    assert seen["backend_factory"] is _sglang.backend  # what ds.backend calls (the host module cannot import ds)
    mine = object()
    _sglang._install_compiled_hook(original, object(), backend_factory=mine)
    assert seen["backend_factory"] is mine


# -- the real model ---------------------------------------------------------------------------------------
def test_eager_sglang_llama_with_the_fake_backend_matches_transformers(sgl):
    model = sgl.build()

    def fn(ids, pos, fb):
        return torch.nn.functional.linear(model.model(ids, pos, fb), model.lm_head.weight)

    for got, ref in sgl.run(fn, STEPS):
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("executor", ["serial", "thread"])
@pytest.mark.parametrize("nano", [2, 3])
@pytest.mark.parametrize("strategy", ["sequential", "round_robin", "nanoflow", "two_batch_overlap", "auto",
                                      "prefill_decode"])
def test_dynaflow_compiled_sglang_llama_matches(sgl, strategy, nano, executor, monkeypatch):
    import dynaflow.integrations.sglang as ds
    from dynaflow.integrations.sglang import _settings

    monkeypatch.setattr(_settings, "_OPTIONS", {"nano_batches": nano, "strategy": strategy, "executor": executor,
                                         "min_rows": 1})
    model = sgl.build()
    step = ds.compile(model.model)

    def fn(ids, pos, fb):
        return torch.nn.functional.linear(step(ids, pos, fb), model.lm_head.weight)

    for got, ref in sgl.run(fn, STEPS):
        torch.testing.assert_close(got, ref, **TOL)
    assert len(step.graphs) > 1  # SGLang's Llama breaks into several graphs; each was planned and ran
    split_attention = [g for g in step.graphs
                       if any("nano-context" in s.hints and not s.whole for s in g.segmented.segments)
                       and any(p.split.num > 1 for p in g._by_split.values())]
    if strategy not in ("auto", "prefill_decode"):  # those two choose their own count (possibly one)
        assert split_attention, "attention never ran per nano-batch"
    for g in step.graphs:
        for p in g._by_split.values():
            assert p.split.sizes in {(12,), (8,), (4,), (5, 3, 4), (5, 7), (2, 6), (1, 1, 6), (2, 1, 1), (1, 2, 1), (2, 2),
                                     (1, 1, 1, 1)} \
                or p.split.num == 1, p.split


def test_missing_forward_batch_is_an_integration_error(sgl):
    import dynaflow.integrations.sglang as ds
    from dynaflow.integrations._common import IntegrationError

    step = ds.compile(lambda x: x + 1)
    with pytest.raises(IntegrationError, match="no ForwardBatch among the arguments"):
        step(torch.ones(3))


def _compiled_llama(sgl, monkeypatch, **opts):
    import dynaflow.integrations.sglang as ds
    from dynaflow.integrations.sglang import _settings

    monkeypatch.setattr(_settings, "_OPTIONS", {"min_rows": 1, **opts})
    model = sgl.build()
    step = ds.compile(model.model)
    return model, step, lambda ids, pos, fb: torch.nn.functional.linear(step(ids, pos, fb), model.lm_head.weight)


def test_a_hook_added_after_the_first_step_is_honoured(sgl, monkeypatch, caplog):
    """The step watches its model's hooks instead of having Dynamo guard every module's hook dicts: a forward hook
    registered after the captures makes the next step capture again, so it gives eager's answer with the hook."""
    model, step, fn = _compiled_llama(sgl, monkeypatch, nano_batches=2, strategy="round_robin", executor="serial")
    assert step.hook_watch is not None and step.model is model.model
    sgl.run(fn, STEPS[:1])
    before = len(step.graphs)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 0.5)
    try:
        with caplog.at_level("INFO", logger="dynaflow.frontend.hook_watch"):
            got = sgl.run(fn, STEPS)
        eager = sgl.run(lambda ids, pos, fb: torch.nn.functional.linear(model.model(ids, pos, fb),
                                                                        model.lm_head.weight), STEPS)
    finally:
        handle.remove()
    assert any("hooks changed" in r.getMessage() for r in caplog.records)
    assert before and len(step.graphs) >= 1
    for (g, ref), (e, _) in zip(got, eager):
        torch.testing.assert_close(g, e, **TOL)
        assert not torch.allclose(e, ref, **TOL)  # the hook changed the answer: the test can fail


def _host_ops(step) -> set[str]:
    from dynaflow.frontend.rules import op_name

    return {op_name(n) for g in step.graphs for n in g.gm.graph.nodes
            if n.op == "call_function" and op_name(n).startswith("sglang.")}


def test_eager_llama_through_sglangs_piecewise_attention_op_matches_transformers(sgl):
    model = sgl.build()

    def fn(ids, pos, fb):
        return torch.nn.functional.linear(model.model(ids, pos, fb), model.lm_head.weight)

    for got, ref in sgl.run(fn, STEPS, piecewise_layers=sgl.attention_layers(model)):
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("executor", ["serial", "thread"])
@pytest.mark.parametrize("nano", [2, 3])
def test_sglangs_piecewise_attention_op_runs_per_nano_batch(sgl, nano, executor, monkeypatch):
    """SGLang's real ``unified_attention_with_output`` reads its batch and layer from the piecewise forward
    context: dynaflow installs a per-nano-batch copy (child ForwardBatch, its token counts) beside the
    attention backend's."""
    model, step, fn = _compiled_llama(sgl, monkeypatch, nano_batches=nano, strategy="round_robin",
                                      executor=executor)
    for got, ref in sgl.run(fn, STEPS, piecewise_layers=sgl.attention_layers(model)):
        torch.testing.assert_close(got, ref, **TOL)
    assert "sglang.unified_attention_with_output.default" in _host_ops(step) or any(
        o.startswith("sglang.unified_attention_with_output") for o in _host_ops(step)), _host_ops(step)
    assert any(p.split.num > 1 for g in step.graphs for p in g._by_split.values()
               if any("nano-context" in s.hints for s in g.segmented.segments))


def test_under_cuda_graph_capture_the_step_runs_as_one_nano_batch(sgl, monkeypatch):
    """Inside SGLang's CUDA-graph runner dynaflow does not cut the batch: per-nano-batch metadata built at
    capture would be replayed stale (docs/integrations/sglang.md)."""
    from dynaflow.integrations.sglang import _sglang

    monkeypatch.setattr(_sglang, "capturing", lambda: True)
    _, step, fn = _compiled_llama(sgl, monkeypatch, nano_batches=2, strategy="round_robin")
    for got, ref in sgl.run(fn, STEPS):
        torch.testing.assert_close(got, ref, **TOL)
    plans = [p for g in step.graphs for p in g._by_split.values()]
    assert plans and all(p.split.num == 1 for p in plans)
