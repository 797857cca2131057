"""Contract: every vLLM symbol dynaflow patches or calls exists with the signature it expects, and the
``vllm.general_plugins`` entry point loads. A vLLM release that moves one fails here, by name."""

from __future__ import annotations

import importlib
import inspect
import os

import pytest

from integ_util import require

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vllm():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return require("vllm")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_version_is_supported(vllm):
    from dynaflow.integrations.vllm import _setup

    _setup.check_version()


# (module, attribute, the leading parameters dynaflow relies on)
SIGNATURES = [
    ("vllm.forward_context", "override_forward_context", ["forward_context"]),
    ("vllm.forward_context", "set_forward_context", ["attn_metadata", "vllm_config", "num_tokens"]),
    ("vllm.forward_context", "is_forward_context_available", []),
    ("vllm.v1.worker.ubatch_utils", "split_attn_metadata", ["ubatch_slices", "common_attn_metadata"]),
    ("vllm.v1.worker.ubatch_utils", "UBatchSlice", ["request_slice", "token_slice"]),
    ("vllm.compilation.compiler_interface", "CompilerInterface.compile",
     ["self", "graph", "example_inputs", "compiler_config", "compile_range", "key"]),
    ("vllm.compilation.backends", "make_compiler", ["compilation_config"]),
    ("vllm.compilation.backends", "CompilerManager.__init__", ["self", "compilation_config"]),
    ("vllm.plugins", "load_general_plugins", []),
    ("vllm.v1.worker.utils", "AttentionGroup.create_metadata_builders",
     ["self", "vllm_config", "device", "kernel_block_size", "num_metadata_builders"]),
    ("vllm.v1.worker.utils", "AttentionGroup.build_metadata",
     ["self", "common_attn_metadata", "ubatch_idx", "common_prefix_len"]),
    ("vllm.v1.worker.utils", "AttentionGroup.get_metadata_builder", ["self", "ubatch_id"]),
    ("vllm.platforms.interface", "Platform.check_and_update_config", ["vllm_config"]),
]


def test_aot_compile_switch_is_an_env_var(vllm):
    import vllm.envs as envs

    assert "VLLM_USE_AOT_COMPILE" in envs.environment_variables


@pytest.mark.parametrize("module,attr,expected", SIGNATURES, ids=[f"{m}.{a}" for m, a, _ in SIGNATURES])
def test_called_symbols_have_the_expected_signature(vllm, module, attr, expected):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        assert hasattr(obj, part), f"{module}.{attr} is gone in vllm {vllm.__version__}"
        obj = getattr(obj, part)
    assert _params(obj)[:len(expected)] == expected, f"{module}.{attr}{inspect.signature(obj)} moved"


def test_forward_context_fields_and_metadata_fields(vllm):
    import dataclasses

    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import CommonAttentionMetadata

    ctx_fields = {f.name for f in dataclasses.fields(ForwardContext)}
    assert {"attn_metadata", "slot_mapping", "no_compile_layers", "ubatch_slices"} <= ctx_fields
    meta_fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "block_table_tensor",
            "slot_mapping"} <= meta_fields
    import vllm.forward_context as fc

    assert hasattr(fc, "_forward_context"), "the module global the attention ops read moved"


def test_attention_ops_and_compile_modes(vllm):
    import torch
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode

    import vllm.model_executor.layers.attention.attention  # noqa: F401  registers the ops

    for name in ("unified_attention_with_output", "unified_kv_cache_update"):
        op = getattr(torch.ops.vllm, name)
        schema = op.default._schema
        assert schema.name == f"vllm::{name}"
    out_arg = torch.ops.vllm.unified_attention_with_output.default._schema.arguments[3]
    assert out_arg.name == "output" and out_arg.alias_info is not None and out_arg.alias_info.is_write
    assert CompilationMode.DYNAMO_TRACE_ONCE == 2 and CompilationMode.VLLM_COMPILE == 3
    fields = set(CompilationConfig.__dataclass_fields__)
    assert {"mode", "backend", "custom_ops", "splitting_ops"} <= fields


def test_piecewise_mode_rejects_custom_backend_names(vllm):
    """Why the plugin wraps make_compiler: vLLM 0.32 accepts only eager/inductor as a mode-3 backend."""
    from vllm.config import CompilationConfig

    with pytest.raises(Exception, match="Invalid backend for piecewise compilation"):
        CompilationConfig(mode=3, backend="dynaflow")


def test_entry_point_is_registered_and_loads(vllm):
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "dynaflow"]
    assert len(eps) == 1 and eps[0].value == "dynaflow.integrations.vllm:register"
    assert eps[0].load() is importlib.import_module("dynaflow.integrations.vllm").register


def test_plugin_is_a_no_op_unless_enabled_and_wraps_make_compiler_for_piecewise(vllm, monkeypatch):
    import dynaflow.integrations.vllm as dv
    import vllm.compilation.backends as backends
    import vllm.plugins
    from dynaflow import knobs
    from vllm.compilation.compiler_interface import CompilerInterface
    from vllm.platforms import current_platform

    original = backends.make_compiler
    monkeypatch.setattr(backends, "make_compiler", original)
    monkeypatch.setattr(dv._settings, "_OPTIONS", None)
    platform_backend = type(current_platform).simple_compile_backend
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    with knobs.scope(DYNAFLOW_VLLM=0):
        vllm.plugins.load_general_plugins()  # runs dynaflow's entry point (and vLLM's own)
    assert backends.make_compiler is original and dv._settings._OPTIONS is None
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    with knobs.scope(DYNAFLOW_VLLM=1, DYNAFLOW_VLLM_OPTIONS='{"nano_batches": 2, "min_rows": 4}'):
        vllm.plugins.load_general_plugins()
        assert dv.options() == {"nano_batches": 2, "min_rows": 4}
    assert backends.make_compiler is original  # whole-graph mode only: nothing patched
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    with knobs.scope(DYNAFLOW_VLLM=1, DYNAFLOW_VLLM_OPTIONS='{"piecewise": true}'):
        vllm.plugins.load_general_plugins()
        vllm.plugins.load_general_plugins()  # re-entrant
        dv.register()
    wrapped = backends.make_compiler
    assert wrapped is not original and wrapped.__wrapped__ is original
    compiler = wrapped(object())
    assert isinstance(compiler, CompilerInterface) and compiler.name == "dynaflow"
    assert type(current_platform).simple_compile_backend == platform_backend  # never touched


def test_bad_plugin_options_are_integration_errors(vllm):
    import dynaflow.integrations.vllm as dv
    from dynaflow import knobs
    from dynaflow.integrations._common import IntegrationError

    with knobs.scope(DYNAFLOW_VLLM=1, DYNAFLOW_VLLM_OPTIONS='{"nano_batchez": 2}'):
        with pytest.raises(IntegrationError, match=r"DYNAFLOW_VLLM_OPTIONS.*nano_batchez.*Did you mean 'nano_batches'"):
            dv.options()


def test_piecewise_compiler_compiles_a_dense_piece(vllm):
    """vLLM's piecewise mode hands DynaflowCompiler fx pieces between attention ops; one such piece."""
    import torch
    from dynaflow.integrations.vllm import _piecewise

    class Piece(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8)

        def forward(self, x):
            return (self.down(torch.relu(self.up(x))) + x,)

    piece = Piece().eval()
    gm = torch.fx.symbolic_trace(piece)
    x = torch.randn(6, 8)
    fn, handle = _piecewise.DynaflowCompiler().compile(gm, [x], {}, None, key="p0")
    assert handle is None
    with torch.no_grad():
        torch.testing.assert_close(fn(x)[0], piece(x)[0])
        torch.testing.assert_close(fn(torch.randn(9, 8) * 0 + x[:1])[0], piece(x[:1].expand(9, 8))[0])


def test_full_cuda_graphs_around_the_step_are_refused_on_cuda(vllm, monkeypatch):
    """vLLM on a GPU: dynaflow's step is not captured by vLLM's full CUDA graphs (docs/integrations/vllm.md)."""
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode
    from vllm.platforms import current_platform

    from dynaflow.integrations._common import IntegrationError
    from dynaflow.integrations.vllm import _setup

    def config(mode):
        return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=mode))

    _setup.check_cuda_graphs(config(CUDAGraphMode.FULL))  # the CPU platform: no CUDA graphs at all
    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    for ok in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
        _setup.check_cuda_graphs(config(ok))
    for bad in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL_DECODE_ONLY):
        with pytest.raises(IntegrationError, match=rf"cudagraph_mode={bad.name}.*\"cudagraph_mode\": \"NONE\""):
            _setup.check_cuda_graphs(config(bad))


def test_every_attention_metadata_field_has_a_nano_batch_rule(vllm):
    """A field a vLLM release adds to ``CommonAttentionMetadata`` fails here by name; at run time a set one that has
    no rule fails closed instead of reaching a builder uncut."""
    import dataclasses

    from vllm.v1.attention.backend import CommonAttentionMetadata

    from dynaflow.integrations.vllm import _metadata

    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert fields <= _metadata.KNOWN_FIELDS, f"no nano-batch rule for {sorted(fields - _metadata.KNOWN_FIELDS)}"


def _common(**extra):
    """Three requests of 2, 1 and 3 tokens (context 5, 9, 4), with ``extra`` fields set."""
    import torch
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    seq = torch.tensor([5, 9, 4], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=3, num_actual_tokens=6,
        max_query_len=3, max_seq_len=9, block_table_tensor=torch.arange(6, dtype=torch.int32).view(3, 2),
        slot_mapping=torch.arange(10, 16), seq_lens_cpu_upper_bound=seq.clone(), **extra)


def test_a_nano_batch_gets_every_per_request_and_per_token_field(vllm):
    """vLLM's ``split_attn_metadata`` cuts the core fields only; the rest (``is_prefilling`` for Mamba builders,
    ``positions`` for encoder-only attention, ...) are cut by dynaflow, and a whole-step field is refused."""
    import numpy as np
    import torch

    from dynaflow.integrations._common import IntegrationError
    from dynaflow.integrations.vllm import _metadata

    meta = _common(positions=torch.arange(100, 106), is_prefilling=torch.tensor([True, False, True]),
                   req_idx=np.array([7, 8, 9]), causal=torch.tensor([True, True, False]),
                   mm_req_doc_ranges={0: [(0, 1)], 2: [(1, 3)]})
    cut = _metadata._slice_common(meta, slice(1, 3), slice(2, 6))
    assert cut.num_reqs == 2 and cut.num_actual_tokens == 4
    assert cut.query_start_loc_cpu.tolist() == [0, 1, 4] and cut.seq_lens.tolist() == [9, 4]
    assert cut.positions.tolist() == [102, 103, 104, 105]
    assert cut.is_prefilling.tolist() == [False, True] and cut.req_idx.tolist() == [8, 9]
    assert cut.causal.tolist() == [True, False]
    assert cut.mm_req_doc_ranges == {1: [(1, 3)]}
    whole = _common(logits_indices_padded=torch.arange(3), num_logits_indices=3)
    with pytest.raises(IntegrationError, match=r"'logits_indices_padded'.*whole step's logits.*nano_batches=1"):
        _metadata._slice_common(whole, slice(0, 1), slice(0, 2))
