"""One engine run, in its own process: ``python vllm_case.py MODEL_DIR MODE OUT.json`` (``make-model`` takes an
architecture of :data:`ARCHS` after OUT; ``llama`` by default).

MODE ``eager`` builds ``LLM(..., enforce_eager=True)``; ``piecewise`` asks for vLLM's mode 3; ``dynaflow`` builds
it with dynaflow as vLLM's whole-graph compile backend (options from ``DYNAFLOW_VLLM_OPTIONS``, vLLM's default
``custom_ops``). Either way it generates 12 greedy tokens for 8 token-ID prompts of 2 to 60 tokens with
``max_num_batched_tokens=32`` (chunked prefill, mixed prefill/decode steps) and writes the tokens, plus dynaflow's
steps by nano-batch count, to OUT; a :data:`POOLING` model embeds the prompts instead (128 tokens a step).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

PROMPT_LENGTHS = (2, 60, 7, 33, 15, 4, 48, 21)
NEW_TOKENS = 12
VOCAB = 256


LLAMA_LIKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
"""The size fields of every architecture here whose config names them the Llama way (head_dim 128 / 4 = 32)."""

ARCHS = {
    # name: (transformers config class, model class, config fields)
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(LLAMA_LIKE, head_dim=32, num_experts=4,
                                                                num_experts_per_tok=2, moe_intermediate_size=64)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(LLAMA_LIKE, head_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=128, n_layer=2, n_head=4, n_positions=256)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(LLAMA_LIKE)),  # vLLM runs it through its transformers backend
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        LLAMA_LIKE, layer_types=["mamba", "attention"], num_local_experts=0, shared_intermediate_size=256,
        mamba_n_heads=8, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=64)),
    "bert": ("BertConfig", "BertModel", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=256, max_position_embeddings=256)),
}
"""Tiny random models for the engine: Llama, MoE layers (vLLM's fused-MoE kernel and its workspaces, with and
without q/k norms), Gemma 2 (soft-capping, sliding-window layers), GPT-2 (learned positions, fused QKV) and OLMo 2,
which vLLM 0.32 runs through its transformers backend (``input_ids`` of shape ``(1, tokens)`` through ``**kwargs``),
a hybrid of Mamba 2 and attention layers (GraniteMoeHybrid: vLLM builds Mamba metadata per step too) and BERT, an
encoder-only pooling model (:data:`POOLING`: embedded, not generated)."""

POOLING = ("bert",)
"""Architectures the engine runs as pooling models (``runner="pooling"``, ``LLM.embed``); they need a tokenizer."""


def make_model(path: str, arch: str = "llama") -> None:
    """A tiny random ``arch`` (:data:`ARCHS`) saved for vLLM (head_dim 32: vLLM's CPU attention kernel needs it)."""
    import torch
    import transformers

    config, model, fields = ARCHS[arch]
    torch.manual_seed(0)
    lm = getattr(transformers, model)(getattr(transformers, config)(vocab_size=VOCAB, **fields))
    lm.to(torch.float32).save_pretrained(path)
    if arch in POOLING:  # vLLM's pooling runner reads special tokens from a tokenizer: a word-level one, no download
        from tokenizers import Tokenizer, models

        words = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
        transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t3", pad_token="t0", cls_token="t1",
                                             sep_token="t2").save_pretrained(path)


def prompts() -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def barriers(*_: object) -> list[str]:
    """The segments of the engine's dynaflow graphs that run whole, with why (run in the worker process)."""
    from dynaflow.integrations.vllm import _vllm

    return [f"{s.name}: {s.reason}" for step in _vllm.STEPS for s in step.graph.segmented.segments
            if s.kind.value == "barrier"]


def run(path: str, mode: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    pooling = json.loads((Path(path) / "config.json").read_text())["architectures"][0] == ARCHS["bert"][1]
    kw: dict = dict(model=path, skip_tokenizer_init=not pooling, dtype="float32",
                    max_num_batched_tokens=128 if pooling else 32,  # a pooled prompt is never chunked
                    max_model_len=128, max_num_seqs=8, seed=0,
                    kv_cache_memory_bytes=256 << 20)  # a fixed small cache: no claim on 92% of host memory
    if mode == "eager":
        kw["enforce_eager"] = True
    elif mode == "piecewise":  # vLLM's piecewise mode, dense pieces by dynaflow (option "piecewise": true)
        kw["compilation_config"] = {"mode": 3}
    else:
        kw["compilation_config"] = {"mode": 2, "backend": "dynaflow.integrations.vllm.backend"}
    if pooling:
        kw["runner"] = "pooling"
    llm = LLM(**kw)
    result: dict = {}
    if pooling:
        outs = llm.embed([TokensPrompt(prompt_token_ids=p) for p in prompts()])
        result["embeddings"] = [[float(x) for x in o.outputs.embedding] for o in outs]
    else:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts()],
                            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    if mode == "dynaflow":
        from dynaflow.integrations.vllm import step_stats

        per_worker = llm.collective_rpc(step_stats)
        result["steps_by_nano_batches"] = {str(k): v for k, v in per_worker[0].items()}
        result["barriers"] = llm.collective_rpc(barriers)[0]
    return result


if __name__ == "__main__":
    model, mode, out = sys.argv[1:4]
    if mode == "make-model":
        make_model(model, *sys.argv[4:5])
    else:
        with open(out, "w") as f:
            json.dump(run(model, mode), f)
