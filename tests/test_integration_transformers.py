"""transformers ``generate`` through dynaflow: greedy tokens equal eager's, with a static KV cache.

Every forward step (prefill and decode, separate graphs) runs through dynaflow with 2 nano-batches; the
static cache rows of each nano-batch are written in place through views. Tiny random Llama and Mixtral
configs (Mixtral's experts run as one row-wise op), batch sizes 3 and 4, left-padded prompts of different
lengths, every built-in strategy, serial and thread executors.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dynaflow
from models import HF_FACTORIES, HF_VOCAB, grad_off, make_falcon, split_strategies
from models import assert_same_generation as same_generation

from dynaflow.integrations import transformers as df_hf

if not df_hf.is_available():
    pytest.skip("needs transformers >= 5.0", allow_module_level=True)
import transformers  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402

from dynaflow.integrations.transformers._hooks import OUTPUT_CACHE_FIELD, cache_parameter  # noqa: E402

NEW_TOKENS = 4
PAD = 0


def prompts(batch: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch: row i has ``i % 3`` pad tokens in front, so prompt lengths differ."""
    g = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(1, HF_VOCAB, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad = i % 3
        ids[i, :pad] = PAD
        mask[i, :pad] = 0
    return ids, mask


def gen_kwargs(mask: torch.Tensor, **extra) -> dict:
    return dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD,
                return_dict_in_generate=True, output_logits=True, **extra)


def assert_same_generation(out, ref) -> None:
    """Tokens equal and every step's logits close, for all ``NEW_TOKENS`` steps."""
    assert len(out.logits) == len(ref.logits) == NEW_TOKENS
    same_generation(out, ref)


class _Models:
    """Each tiny model built once per module, with its eager greedy generations for batch 3 and 4."""

    def __init__(self):
        self._built: dict = {}

    def __call__(self, name: str):
        if name not in self._built:
            model = {**HF_FACTORIES, "falcon": make_falcon}[name]().eval()
            refs = {}
            with grad_off():
                for batch in (3, 4):
                    ids, mask = prompts(batch)
                    refs[batch] = model.generate(ids, **gen_kwargs(mask, cache_implementation="static"))
            self._built[name] = (model, refs)
        return self._built[name]


@pytest.fixture(scope="module")
def hf_models():
    return _Models()


def _generate(model, batch, **enable):
    ids, mask = prompts(batch)
    hook = df_hf.enable(model, nano_batches=2, **enable)
    try:
        with grad_off():
            out = model.generate(ids, **gen_kwargs(mask, cache_implementation="static"))
    finally:
        df_hf.disable(model)
    return out, hook


CASES = {
    # Llama: every strategy on the thread executor, plus the serial executor at both batch sizes
    "llama": [(s, "thread", 3) for s in split_strategies()] + [("nanoflow", "serial", 4),
                                                                            ("round_robin", "serial", 3)],
    # Mixtral (slow to capture): every strategy once, both executors and both batch sizes among them
    "mixtral": [("nanoflow", "thread", 3), ("round_robin", "serial", 4), ("sequential", "thread", 4)],
}
DEFAULT_TIER = {("llama", "nanoflow", "thread", 3), ("llama", "nanoflow", "serial", 4), ("mixtral", "nanoflow", "thread", 3)}
"""The cases in the default tier (both models, both executors, both batch sizes); the rest run in ``-m slow``."""


@pytest.mark.parametrize("name,strategy,executor,batch", [
    pytest.param(m, *c, marks=() if (m, *c) in DEFAULT_TIER else pytest.mark.slow) for m, cs in CASES.items() for c in cs])
def test_generate_matches_eager(hf_models, name, strategy, executor, batch):
    model, refs = hf_models(name)
    out, hook = _generate(model, batch, strategy=strategy, executor=executor)
    assert_same_generation(out, refs[batch])
    # prefill + one decode graph, every step through dynaflow, split in two
    assert len(hook.compiled.graphs) == 2 and hook.calls == NEW_TOKENS
    for g in hook.compiled.graphs:
        assert g.last_plan.split.num == 2
        assert g.last_timeline.executor == executor
        reasons = [s.reason for s in g.segmented.segments if s.kind is dynaflow.SegmentKind.BARRIER]
        counters = [r for r in reasons if "cumulative_length" in r]
        assert len(counters) == model.config.num_hidden_layers  # the cache length counter, once per layer
        assert len(reasons) == len(counters)  # Mixtral's experts run as one row-wise op: no MoE barrier
        # the counter is read (``arange(n) + counter``) where it is updated: its barrier waits for no nano-batch
        ng = g.last_plan.graph
        for seg in (s for s in g.segmented.segments if "cumulative_length" in s.reason):
            (op,) = ng.ops_of(seg)
            assert all(dep.nano == dynaflow.ALL for dep in ng.deps(op)), (seg.name, ng.deps(op))
        # no barrier reads batch data: the only merge is the logits (never the cache)
        assert len(g.last_plan.program.buffers) == 1


@pytest.mark.parametrize("name", ["llama", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_user_static_cache_is_written_in_place(hf_models, name):
    model, _ = hf_models(name)
    ids, mask = prompts(4)
    cfg = model.config
    caches = [StaticCache(config=cfg, max_cache_len=16) for _ in range(2)]
    with grad_off():
        arg = cache_parameter(model)  # ``cache`` (recent 5.x) or ``past_key_values`` (5.17, the GPU machine's)
        ref = model.generate(ids, **gen_kwargs(mask, **{arg: caches[0]}))
        df_hf.enable(model, strategy="round_robin", nano_batches=2, executor="thread")
        try:
            ptrs = None
            out = model.generate(ids, **gen_kwargs(mask, **{arg: caches[1]}))
            ptrs = [layer.keys.data_ptr() for layer in caches[1].layers]
        finally:
            df_hf.disable(model)
    assert_same_generation(out, ref)
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)
        assert int(b.cumulative_length) == int(a.cumulative_length)
    assert ptrs == [layer.keys.data_ptr() for layer in caches[1].layers]


def test_forward_without_cache_matches_eager():
    model = HF_FACTORIES["llama"]().eval()
    ids, mask = prompts(4)
    with grad_off():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        df_hf.enable(model, strategy="nanoflow", nano_batches=2, executor="serial")
        try:
            out = model(ids, attention_mask=mask, use_cache=False)
        finally:
            df_hf.disable(model)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert getattr(out, OUTPUT_CACHE_FIELD) is None


# -- switch and lifecycle ---------------------------------------------------------------------------
def test_enable_disable_restores_the_model():
    model = HF_FACTORIES["llama"]()
    assert df_hf.is_available() and not df_hf.is_enabled(model)
    hook = df_hf.enable(model, strategy="sequential", nano_batches=2)
    assert df_hf.is_enabled(model) and df_hf.hook_of(model) is hook and model.forward is hook
    assert model.generation_config.disable_compile is True  # generate must not torch.compile over dynaflow
    assert "LlamaForCausalLM" in repr(hook) and "sequential" in repr(hook)
    again = df_hf.enable(model, strategy="round_robin", nano_batches=2)  # replaces the first hook
    assert df_hf.hook_of(model) is again
    assert df_hf.disable(model) is True and df_hf.disable(model) is False
    assert "forward" not in model.__dict__ and not model.generation_config.disable_compile


# -- bad input: each a DynaflowError naming the option, the shape and the fix ------------------------
@pytest.fixture
def llama_enabled():
    model = HF_FACTORIES["llama"]()
    df_hf.enable(model, nano_batches=2, executor="serial")
    yield model
    df_hf.disable(model)


def test_dynamic_cache_is_refused(llama_enabled):
    ids, mask = prompts(3)
    with pytest.raises(dynaflow.ConfigError, match=r"cache=DynamicCache.*cache_implementation='static'"):
        with grad_off():
            llama_enabled.generate(ids, **gen_kwargs(mask))
    with pytest.raises(dynaflow.ConfigError, match=r"DynamicCache.*StaticCache\(config=model.config"):
        llama_enabled(ids, cache=DynamicCache(config=llama_enabled.config))


def test_cache_batch_mismatch_is_refused(llama_enabled):
    cfg = llama_enabled.config
    cache = StaticCache(config=cfg, max_cache_len=16)
    cache.early_initialization(2, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                               torch.float32, torch.device("cpu"))
    ids, mask = prompts(3)
    with pytest.raises(dynaflow.ConfigError, match=r"holds 2 rows .*\(2, 2, 16, 16\).*batch 3 \(3, 7\).*"
                                                  r"cache_implementation='static'"):
        llama_enabled(ids, attention_mask=mask, cache=cache)


def test_missing_cache_with_use_cache_is_refused(llama_enabled):
    ids, _ = prompts(3)
    with pytest.raises(dynaflow.ConfigError, match=r"use_cache=True and no cache \(input_ids \(3, 7\)\).*use_cache=False"):
        llama_enabled(ids)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"labels": "ids"}, r"unsupported argument\(s\) \['labels'\].*disable\(model\)"),
    ({"inputs_embeds": "emb"}, r"unsupported argument\(s\) \['inputs_embeds'\]"),
    ({"output_attentions": True}, r"output_attentions=True is not supported"),
])
def test_unsupported_arguments_are_refused(llama_enabled, kwargs, pattern):
    ids, _ = prompts(3)
    values = {"ids": ids, "emb": torch.zeros(3, 7, 64)}
    kw = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(dynaflow.ConfigError, match=pattern):
        llama_enabled(ids, use_cache=False, **kw)


def test_bad_input_ids_shape_is_refused(llama_enabled):
    with pytest.raises(dynaflow.ConfigError, match=r"input_ids must be a \[batch, seq\].*got \(7,\)"):
        llama_enabled(torch.ones(7, dtype=torch.long), use_cache=False)


def test_enable_refuses_non_transformers_models():
    with pytest.raises(dynaflow.ConfigError, match=r"needs a transformers PreTrainedModel.*got Linear.*dynaflow.compile"):
        df_hf.enable(torch.nn.Linear(2, 2))


@pytest.mark.slow  # a fresh interpreter; tests/test_layering.py covers the import boundary in the default tier
def test_package_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import dynaflow; "
            "from dynaflow.integrations import transformers as df_hf; assert not df_hf.is_available(); "
            "import torch\ntry:\n    df_hf.enable(torch.nn.Linear(2, 2))\nexcept dynaflow.ConfigError as e:\n"
            "    assert 'pip install' in str(e); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_host_is_imported_only_by_the_private_module():
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "integrations" / "transformers"
    importers = set()
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "transformers" or n.startswith("transformers.") for n in names):
                importers.add(path.name)
    assert importers == {"_hooks.py"}


def test_one_hook_serves_new_prompt_lengths_and_batch_sizes(hf_models):
    model, refs = hf_models("llama")
    g = torch.Generator().manual_seed(11)
    cases = [(3, 7), (4, 5), (3, 9)]  # prefill graph becomes dynamic in the sequence; plans per batch size
    inputs = {}
    with grad_off():
        for batch, seq in cases:
            ids = torch.randint(1, HF_VOCAB, (batch, seq), generator=g)
            mask = torch.ones_like(ids)
            ids[0, :1], mask[0, :1] = PAD, 0
            inputs[batch, seq] = (ids, mask, model.generate(ids, **gen_kwargs(mask, cache_implementation="static")))
        hook = df_hf.enable(model, strategy="nanoflow", nano_batches=2, executor="thread")
        try:
            for ids, mask, ref in inputs.values():
                assert_same_generation(model.generate(ids, **gen_kwargs(mask, cache_implementation="static")), ref)
        finally:
            df_hf.disable(model)
    assert hook.calls == len(cases) * NEW_TOKENS and len(hook.compiled.graphs) <= 4


def test_static_cache_is_allocated_as_the_models_own_first_update_would():
    """Falcon's multi-query attention keeps one KV head whatever ``num_attention_heads`` says: a cache sized
    from the config failed Dynamo's capture (index_copy_ of 1 head into 4). The hook probes the shapes with one
    step on fake tensors, and leaves no fake tensor behind in the model."""
    falcon_config = getattr(transformers, "FalconConfig", None)
    if falcon_config is None:
        pytest.skip("this transformers has no Falcon")
    torch.manual_seed(0)
    cfg = falcon_config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=HF_VOCAB,
                        multi_query=True, bos_token_id=1, eos_token_id=1)
    model = transformers.FalconForCausalLM(cfg).eval()
    ids, mask = prompts(4)
    with grad_off():
        ref = model.generate(ids, **gen_kwargs(mask, cache_implementation="static"))
    out, hook = _generate(model, 4, strategy="nanoflow", executor="serial")
    assert_same_generation(out, ref)
    assert hook._kv_dims == [(1, 16, 16)] * 2
    fake = torch._subclasses.fake_tensor.FakeTensor
    held = [v for m in model.modules() for d in (m._parameters, m._buffers, vars(m)) for v in d.values()]
    assert not any(isinstance(v, fake) for v in held)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["streams", "cuda-graphs"])
@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_generate_on_the_cuda_executors_lowering_with_cuda_faked(hf_models, family, cuda_graphs):
    """The GPU floor benchmark's transformers path (``executor="cuda"``, with and without CUDA graphs) on CPU
    tensors with torch.cuda's streams, events and graphs faked (``tests/fake_cuda.py``): tokens and logits
    equal eager, and under graphs the decode steps replay a capture (the cache counter updated inside it).
    ``generate`` runs six times on one hook, each with a fresh cache (written inputs that moved), with left
    padding and without (then the prefill's mask is one batch-free mask expanded over the batch). Falcon's
    fused-QKV split indexes with a Python list, which once copied a CPU index tensor into the capture."""
    from fake_cuda import faked_cuda

    model, _ = hf_models(family)
    ids, mask = prompts(3)
    runs = [(ids, mask), (ids.clamp(min=1), torch.ones_like(mask))]
    with grad_off():
        refs = [model.generate(i, **gen_kwargs(m, cache_implementation="static")) for i, m in runs]
    with faked_cuda(), grad_off():
        hook = df_hf.enable(model, nano_batches=2, strategy="nanoflow", executor="cuda",
                            config={"cuda_graphs": cuda_graphs})
        try:
            for k in range(6):
                i, m = runs[k % 2]
                assert_same_generation(model.generate(i, **gen_kwargs(m, cache_implementation="static")),
                                       refs[k % 2])
        finally:
            df_hf.disable(model)
    modes = {g.last_capture.mode.name if g.last_capture is not None else None for g in hook.compiled.graphs}
    assert modes == ({"GRAPH"} if cuda_graphs else {None}), modes


def test_batch_of_one_cannot_be_split(hf_models):
    model, _ = hf_models("llama")
    ids, mask = prompts(1)
    df_hf.enable(model, nano_batches=2, executor="serial")
    try:
        with pytest.raises(dynaflow.ConfigError, match=r"nano_batches=2 is invalid for a batch of 1"):
            with grad_off():
                model.generate(ids, **gen_kwargs(mask, cache_implementation="static"))
    finally:
        df_hf.disable(model)


def test_outer_torch_compile_leaves_the_step_to_dynaflow():
    model = HF_FACTORIES["llama"]().eval()
    ids, mask = prompts(3)
    with grad_off():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        hook = df_hf.enable(model, strategy="round_robin", nano_batches=2, executor="serial")
        try:
            out = torch.compile(model, backend="eager")(ids, attention_mask=mask, use_cache=False)
        finally:
            df_hf.disable(model)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert hook.calls == 1 and hook.compiled.last_graph.last_plan.split.num == 2


def test_strict_mode_names_the_cache_counter(hf_models):
    model, _ = hf_models("llama")
    ids, mask = prompts(3)
    df_hf.enable(model, nano_batches=2, executor="serial", config={"strict": True})
    try:
        with pytest.raises(dynaflow.BatchCouplingError, match=r"cumulative_length.*in place"):
            with grad_off():
                model.generate(ids, **gen_kwargs(mask, cache_implementation="static"))
    finally:
        df_hf.disable(model)


def test_sliding_window_cache_is_refused(llama_enabled):
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=HF_VOCAB, sliding_window=4)
    cache = StaticCache(config=cfg, max_cache_len=16)
    ids, mask = prompts(3)
    with pytest.raises(dynaflow.ConfigError, match=r"cache=StaticCache has sliding-window layers "
                                                  r"\(StaticSlidingWindowLayer\).*build the cache from it"):
        llama_enabled(ids, attention_mask=mask, cache=cache)


def test_bad_logits_to_keep_is_refused(llama_enabled):
    ids, _ = prompts(3)
    with pytest.raises(dynaflow.ConfigError, match=r"logits_to_keep must be an int >= 0.*-1"):
        llama_enabled(ids, use_cache=False, logits_to_keep=-1)
    with pytest.raises(dynaflow.ConfigError, match=r"logits_to_keep must be an int >= 0.*tensor"):
        llama_enabled(ids, use_cache=False, logits_to_keep=torch.tensor([1, 2]))  # was a raw RuntimeError
