"""``dynaflow.compile`` on the transformers architectures a newcomer reaches for first, against eager.

Tiny random configs of 22 families (decoders with padding masks, MoE, encoders, a vision transformer, conv
nets, Whisper's encoder), three batch sizes each (so Dynamo's dynamic batch and odd splits are both exercised).
The default tier runs every family once (nanoflow, serial executor); ``-m slow`` runs them on the other
strategies and executors, the CUDA executor's lowering (streams and graphs) faked on CPU included, and
``generate`` with a static cache through the transformers hook on every decoder family. Besides
the outputs, each case checks that no segment runs whole for an in-place write: these forwards write nothing
the caller can see, so such a barrier would be the analysis misreading an op (``operator.and_`` once was).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import pytest
import torch

import dynaflow
from fake_cuda import faked_cuda
from models import assert_same_generation, grad_off

transformers = pytest.importorskip("transformers")

H = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
         max_position_embeddings=64)
VOCAB = 128
SEQ = 9
BATCHES = (3, 4, 5)
TOL = dict(rtol=1e-5, atol=1e-5)


def _config(name: str, **kw: Any) -> Callable[[], Any]:
    return lambda: getattr(transformers, name)(**kw)


ARCHS: dict[str, tuple[str, Callable[[], Any], str]] = {
    # name: (model class, config, input kind)
    "llama": ("LlamaForCausalLM", _config("LlamaConfig", num_key_value_heads=2, **H), "text"),
    "mistral": ("MistralForCausalLM", _config("MistralConfig", num_key_value_heads=2, **H), "text"),
    "qwen2": ("Qwen2ForCausalLM", _config("Qwen2Config", num_key_value_heads=2, **H), "text"),
    "qwen3": ("Qwen3ForCausalLM", _config("Qwen3Config", num_key_value_heads=2, head_dim=16, **H), "text"),
    "gemma": ("GemmaForCausalLM", _config("GemmaConfig", num_key_value_heads=2, head_dim=16, **H), "text"),
    "gemma2": ("Gemma2ForCausalLM", _config("Gemma2Config", num_key_value_heads=2, head_dim=16, **H), "text"),
    "phi": ("PhiForCausalLM", _config("PhiConfig", **H), "text"),
    "phi3": ("Phi3ForCausalLM", _config("Phi3Config", num_key_value_heads=2, pad_token_id=0, **H), "text"),
    "gpt2": ("GPT2LMHeadModel", _config("GPT2Config", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                        n_positions=64, bos_token_id=1, eos_token_id=1), "text"),
    "gpt_neox": ("GPTNeoXForCausalLM", _config("GPTNeoXConfig", **H), "text"),
    "opt": ("OPTForCausalLM", _config("OPTConfig", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                      word_embed_proj_dim=64), "text"),
    "falcon": ("FalconForCausalLM", _config("FalconConfig", hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=VOCAB), "text"),
    "bloom": ("BloomForCausalLM", _config("BloomConfig", hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),
              "text"),
    "mixtral": ("MixtralForCausalLM", _config("MixtralConfig", num_key_value_heads=2, num_local_experts=4,
                                              num_experts_per_tok=2, **H), "text"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", _config("Qwen2MoeConfig", num_key_value_heads=2, num_experts=4,
                                                 num_experts_per_tok=2, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=64, **H), "text"),
    "bert": ("BertModel", _config("BertConfig", **H), "text"),
    "roberta": ("RobertaModel", _config("RobertaConfig", pad_token_id=1, **H), "text"),
    "distilbert": ("DistilBertModel", _config("DistilBertConfig", dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                              vocab_size=VOCAB, max_position_embeddings=64), "text"),
    "t5_encoder": ("T5EncoderModel", _config("T5Config", d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                             vocab_size=VOCAB), "text"),
    "vit": ("ViTModel", _config("ViTConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=8), "image"),
    "resnet": ("ResNetModel", _config("ResNetConfig", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                      embedding_size=16), "image"),
    "whisper_encoder": ("WhisperModel", _config("WhisperConfig", d_model=64, encoder_layers=2, decoder_layers=1,
                                                encoder_attention_heads=4, decoder_attention_heads=4,
                                                num_mel_bins=16, max_source_positions=32, vocab_size=VOCAB,
                                                encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                        "audio"),
}
EAGER_ATTENTION = {"t5_encoder", "gemma2", "bloom"}
"""Families without an SDPA path in transformers (or whose SDPA path is the same code): built with eager attention."""

SLOW_RUNS = [("round_robin", "thread"), ("two_batch_overlap", "thread"), ("sequential", "serial"),
             ("auto", "serial"), ("nanoflow", "cuda"), ("nanoflow", "cuda-graphs")]


def build(name: str, **overrides: Any) -> torch.nn.Module:
    cls_name, config, _ = ARCHS[name]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    cfg = config()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if name != "resnet":
        cfg._attn_implementation = "eager" if name in EAGER_ATTENTION else "sdpa"
    torch.manual_seed(0)
    model = cls(cfg)
    if name == "whisper_encoder":
        model = model.get_encoder()
    return model.eval()


def inputs(name: str, batch: int) -> dict[str, torch.Tensor]:
    """One call's inputs; text rows are left-padded by ``row % 3`` tokens, so the padding mask matters."""
    g = torch.Generator().manual_seed(batch)
    kind = ARCHS[name][2]
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if kind == "audio":
        return {"input_features": torch.randn(batch, 16, 64, generator=g)}
    ids = torch.randint(2, VOCAB, (batch, SEQ), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : row % 3] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if "CausalLM" in ARCHS[name][0] or "LMHead" in ARCHS[name][0]:
        kw["use_cache"] = False
    return kw


def tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for part in out for t in tensors(part)]
    return []


def check(name: str, strategy: str, executor: str) -> None:
    torch._dynamo.reset()  # many model classes share transformers' wrapper frames: no recompile limit
    model = build(name)
    options: dict[str, Any] = dict(strategy=strategy, nano_batches=2)
    fake = executor.startswith("cuda")
    if fake:
        options.update(executor="cuda", config={"cuda_graphs": True} if executor == "cuda-graphs" else None)
    else:
        options["executor"] = executor
    with faked_cuda() if fake else contextlib.nullcontext():
        compiled = dynaflow.compile(model, **options)
        for batch in BATCHES:
            kw = inputs(name, batch)
            theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            with grad_off():
                want = tensors(model(**theirs))
                for _ in range(3 if executor == "cuda-graphs" else 1):  # warm-ups, a capture, a replay
                    got = tensors(compiled(**kw))
            assert len(got) == len(want) > 0
            for i, (g, w) in enumerate(zip(got, want)):
                torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"{name} output {i}, batch {batch}: {m}")
            for key, value in kw.items():
                assert not isinstance(value, torch.Tensor) or torch.equal(value, theirs[key]), f"{name}: {key} changed"
    segments = [s for g in compiled.graphs for s in g.segmented.segments]
    assert any(s.kind is dynaflow.SegmentKind.SPLIT for s in segments), compiled.explain()
    written = [s for s in segments if s.kind is dynaflow.SegmentKind.BARRIER and "in place" in s.reason]
    assert not written, [f"{s.name}: {s.reason}" for s in written]


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_equals_eager(name):
    check(name, "nanoflow", "serial")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,executor", SLOW_RUNS, ids=[f"{s}-{e}" for s, e in SLOW_RUNS])
@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_equals_eager_on_every_path(name, strategy, executor):
    check(name, strategy, executor)


SLIDING_WINDOW = {"mistral", "gemma2"}
"""Families whose default static cache has sliding-window layers: the transformers hook refuses them by name."""
DECODERS = [n for n, (cls, _, _) in ARCHS.items() if "CausalLM" in cls or "LMHead" in cls]


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODERS)
def test_generate_with_a_static_cache_equals_eager(name):
    """``dynaflow.integrations.transformers.enable`` on each decoder family: greedy tokens and every step's
    logits equal eager ``generate`` with a static cache (left-padded prompts, batch 4, two nano-batches)."""
    from dynaflow.integrations import transformers as df_hf

    torch._dynamo.reset()
    model = build(name)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    for row in range(4):
        ids[row, : row % 3], mask[row, : row % 3] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True, cache_implementation="static")
    with grad_off():
        ref = model.generate(ids, **kw)
        hook = df_hf.enable(model, strategy="nanoflow", nano_batches=2, executor="serial")
        try:
            if name in SLIDING_WINDOW:
                with pytest.raises(dynaflow.ConfigError, match="sliding-window layers .*sliding_window=None"):
                    model.generate(ids, **kw)
                return
            out = model.generate(ids, **kw)
        finally:
            df_hf.disable(model)
    assert_same_generation(out, ref)
    assert hook.calls == 4 and all(g.last_plan.split.num == 2 for g in hook.compiled.graphs)


def _generate_kw(batch: int = 4) -> tuple[torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        ids[row, : row % 3], mask[row, : row % 3] = 0, 0
    return ids, dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                     return_dict_in_generate=True, output_logits=True, cache_implementation="static")


@pytest.mark.parametrize("name", sorted(SLIDING_WINDOW))
def test_a_sliding_window_family_built_as_the_refusal_says_equals_eager(name):
    """The refusal of a sliding-window static cache names the config setting behind it and the fix; a model built
    that way (no window, every layer full attention) generates through dynaflow as eager does."""
    from dynaflow.integrations import transformers as df_hf

    torch._dynamo.reset()
    model = build(name)
    ids, kw = _generate_kw()
    with grad_off():
        df_hf.enable(model, strategy="nanoflow", nano_batches=2, executor="serial")
        try:
            with pytest.raises(dynaflow.ConfigError, match=r"config \(sliding_window=\d+") as err:
                model.generate(ids, **kw)
        finally:
            df_hf.disable(model)
    assert "sliding_window=None" in str(err.value) and "'full_attention'" in str(err.value)
    full = {"sliding_window": None}
    if getattr(model.config, "layer_types", None) is not None:  # gemma2 has them; mistral has none to set
        full["layer_types"] = ["full_attention"] * model.config.num_hidden_layers
    model = build(name, **full)
    with grad_off():
        ref = model.generate(ids, **kw)
        hook = df_hf.enable(model, strategy="nanoflow", nano_batches=2, executor="serial")
        try:
            out = model.generate(ids, **kw)
        finally:
            df_hf.disable(model)
    assert_same_generation(out, ref)
    assert all(g.last_plan.split.num == 2 for g in hook.compiled.graphs)
