"""A real SGLang ``LlamaForCausalLM`` on CPU: tiny random weights, a small fake attention backend, a hand-built
``ForwardBatch`` and forward context.

The fake backend stands in for the engine's kernels only. Like SGLang's real backends it is *stateful*:
``init_forward_metadata(forward_batch)`` prepares per-batch metadata, and its attention is an opaque custom op
(``dftest_sgl::attention``) that looks the backend up through SGLang's global forward context, writes K/V at
``out_cache_loc`` and reads each request's history through ``req_to_token``. So it is right only when each
nano-batch runs with its own batch's backend state.

On CPU, ``sglang_shim`` stands in for torchvision (see there). Import after ``require("sglang")``; importing
sets up SGLang's process state once (runtime config, a world-size-1 gloo group).
"""

from __future__ import annotations

import contextlib
import tempfile

import sglang_shim

sglang_shim.install()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from sglang.srt import runtime_context  # noqa: E402
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context, get_attn_backend  # noqa: E402
from sglang.srt.model_executor.runner_backend_utils.tc_piecewise_cuda_graph import (  # noqa: E402
    set_tc_piecewise_forward_context)
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.test.layer_ut_utils import init_single_process_dist  # noqa: E402

VOCAB = 128
CONFIG = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
HF = transformers.LlamaForCausalLM(CONFIG).eval()
_PATH = tempfile.mkdtemp(prefix="tiny-llama-sgl-")
HF.save_pretrained(_PATH)
runtime_context.publish(ServerArgs(model_path=_PATH, device="cpu", skip_tokenizer_init=True), role="test")
init_single_process_dist()

from sglang.srt.models.llama import LlamaForCausalLM  # noqa: E402  (needs the published config)
from sglang.srt.layers import radix_attention  # noqa: E402
from sglang.srt.utils.common import sglang_lib  # noqa: E402


def _unified_attention_with_output_cpu(query, key, value, output, save_kv_cache, layer_id, *,
                                       use_mha_companion=False, key_value_num_tokens=None, q_rope=None, k_rope=None,
                                       sinks=None, attn_sink=None, cos_sin_cache=None, is_neox=None,
                                       llama_4_scaling=None, topk_indices=None):
    """SGLang's ``sglang::unified_attention_with_output`` for the CPU dispatch key. The wheel registers the op for
    CUDA only; its registered function is exactly this forward to SGLang's own ``_unified_attention_with_output_impl``
    (context lookup, token narrowing, backend call, output copy), so the op under test is SGLang's."""
    radix_attention._unified_attention_with_output_impl(
        query, key, value, output, save_kv_cache, layer_id, use_mha_companion, False,
        key_value_num_tokens=key_value_num_tokens, q_rope=q_rope, k_rope=k_rope, sinks=sinks, attn_sink=attn_sink,
        cos_sin_cache=cos_sin_cache, is_neox=is_neox, llama_4_scaling=llama_4_scaling, topk_indices=topk_indices)


sglang_lib.impl("unified_attention_with_output", _unified_attention_with_output_cpu, "CPU")


@torch.library.custom_op("dftest_sgl::attention", mutates_args=())
def fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, heads: int, kv_heads: int,
                   head_dim: int, scale: float) -> torch.Tensor:
    backend = get_attn_backend()
    meta = backend.forward_metadata
    cache_k, cache_v = backend.cache[layer_id]
    q, k, v = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
    cache_k[meta["out_cache_loc"]] = k
    cache_v[meta["out_cache_loc"]] = v
    out = torch.empty_like(q)
    qsl = meta["qsl"]
    for qs, qe, L, req in zip(qsl[:-1], qsl[1:], meta["seq_lens"], meta["reqs"]):
        slots = backend.req_to_token[req, :L]
        kk = cache_k[slots].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        vv = cache_v[slots].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        n = qe - qs
        mask = torch.ones(n, L, dtype=torch.bool).tril(L - n)
        out[qs:qe] = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), kk, vv, attn_mask=mask,
                                                    scale=scale).transpose(0, 1)
    return out.view(-1, heads * head_dim)


@fake_attention.register_fake
def _(q, k, v, layer_id, heads, kv_heads, head_dim, scale):
    return q.new_empty(q.shape[0], heads * head_dim)


class FakeBackend(AttentionBackend):
    """Per-layer K/V caches, a request → token-slot table, and per-batch metadata from init_forward_metadata."""

    def __init__(self, layers: int = 2, slots: int = 512, reqs: int = 16, max_len: int = 64):
        kv_heads, head_dim = CONFIG.num_key_value_heads, CONFIG.hidden_size // CONFIG.num_attention_heads
        self.cache = {i: (torch.zeros(slots, kv_heads, head_dim), torch.zeros(slots, kv_heads, head_dim))
                      for i in range(layers)}
        self.req_to_token = torch.zeros(reqs, max_len, dtype=torch.int64)

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        qlens = [1] * fb.batch_size if fb.forward_mode.is_decode() else list(fb.extend_seq_lens_cpu)
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        self.forward_metadata = {"qsl": qsl, "seq_lens": fb.seq_lens_cpu.tolist(),
                                 "reqs": fb.req_pool_indices.tolist(), "out_cache_loc": fb.out_cache_loc}

    def _attention(self, q, k, v, layer, fb, save_kv_cache=True, **kwargs):
        # like a real backend, which writes K/V at ``fb.out_cache_loc``: the batch handed in must be this call's
        if not torch.compiler.is_compiling() and fb.out_cache_loc.shape[0] != q.shape[0]:
            raise RuntimeError(f"forward_batch has {fb.out_cache_loc.shape[0]} cache slots for {q.shape[0]} query "
                               "rows: attention got another batch's ForwardBatch")
        return torch.ops.dftest_sgl.attention(q, k, v, layer.layer_id, layer.tp_q_head_num, layer.tp_k_head_num,
                                              layer.head_dim, layer.scaling)

    forward_extend = _attention
    forward_decode = _attention


def build() -> LlamaForCausalLM:
    """The real SGLang Llama with the reference model's weights."""
    model = LlamaForCausalLM(CONFIG).eval()
    model.load_weights(HF.state_dict().items())
    return model


class Conversation:
    """Requests with token histories and cache slots; makes each step's ForwardBatch and HF's answer."""

    def __init__(self, backend: FakeBackend, seed: int):
        self.backend = backend
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens: dict[int, list[int]] = {}
        self.slots: dict[int, list[int]] = {}

    def batch(self, new: dict[int, int]) -> ForwardBatch:
        """``new[r] = n``: request r gets n fresh tokens this step (a new request when r is unseen)."""
        ids, pos, out_loc, qlens, seqs, reqs, prefix = [], [], [], [], [], [], []
        for r, n in new.items():
            tokens, slots = self.tokens.setdefault(r, []), self.slots.setdefault(r, [])
            start = len(tokens)
            fresh = torch.randint(0, VOCAB, (n,), generator=self.gen).tolist()
            fresh_slots = list(range(50 * r + start, 50 * r + start + n))
            tokens += fresh
            slots += fresh_slots
            self.backend.req_to_token[r, :len(slots)] = torch.tensor(slots)
            ids += fresh
            pos += range(start, start + n)
            out_loc += fresh_slots
            qlens.append(n)
            seqs.append(len(tokens))
            reqs.append(r)
            prefix.append(start)
        decode = all(n == 1 for n in qlens) and all(p > 0 for p in prefix)
        qlens_t = torch.tensor(qlens)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND, batch_size=len(qlens),
            input_ids=torch.tensor(ids), req_pool_indices=torch.tensor(reqs), seq_lens=torch.tensor(seqs),
            out_cache_loc=torch.tensor(out_loc), seq_lens_sum=sum(seqs), seq_lens_cpu=torch.tensor(seqs),
            positions=torch.tensor(pos), extend_seq_lens=qlens_t, extend_prefix_lens=torch.tensor(prefix),
            extend_start_loc=torch.cumsum(qlens_t, 0) - qlens_t, extend_seq_lens_cpu=qlens,
            extend_prefix_lens_cpu=prefix, extend_num_tokens=len(ids), global_num_token_non_padded_cpu=len(ids))

    def reference(self, new: dict[int, int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([HF(torch.tensor(self.tokens[r])[None]).logits[0, -n:] for r, n in new.items()])


def run(model_fn, steps: list[dict[int, int]], seed: int = 1,
        piecewise_layers: list | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model_fn(input_ids, positions, forward_batch)`` over ``steps`` as SGLang's model runner would
    (metadata init, forward context); returns (logits, HF reference) per step.

    ``piecewise_layers`` (the model's ``RadixAttention`` layers by layer id): extend steps run under SGLang's
    piecewise forward context, as its piecewise CUDA-graph runner sets it, so attention goes through SGLang's own
    opaque op ``sglang.unified_attention_with_output``, which finds its layer and batch in that context."""
    backend = FakeBackend()
    conv = Conversation(backend, seed)
    outs = []
    for new in steps:
        fb = conv.batch(new)
        backend.init_forward_metadata(fb)
        piecewise = contextlib.nullcontext()
        if piecewise_layers is not None and fb.forward_mode.is_extend():
            n = int(fb.input_ids.shape[0])
            piecewise = set_tc_piecewise_forward_context(fb, piecewise_layers, None, [], [], num_tokens=n,
                                                         raw_num_tokens=n)
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)), piecewise:
            logits = model_fn(fb.input_ids, fb.positions, fb)
        outs.append((logits, conv.reference(new)))
    return outs


def attention_layers(model: LlamaForCausalLM) -> list:
    """The model's ``RadixAttention`` layers, indexed by layer id (what SGLang's runner puts in the context)."""
    return [layer.self_attn.attn for layer in model.model.layers]
