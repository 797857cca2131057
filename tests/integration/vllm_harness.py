"""A real vLLM ``LlamaForCausalLM`` on CPU: tiny random weights, a small fake attention, hand-built metadata.

The fake attention stands in for the engine's kernel only: it writes each token's K/V into a per-layer cache
at ``slot_mapping`` and attends over the request's history read back through ``block_table`` (block size 1),
so it is right only when every nano-batch sees its own requests' metadata. Everything else (layers, custom
ops, the forward-context lookup by layer name, the torch.compile integration) is vLLM's own code.
Import this module only after ``require("vllm")``.
"""

from __future__ import annotations

import os
import tempfile
import types
from dataclasses import dataclass

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # the PyPI wheel cannot infer a device without a GPU
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # dynaflow's step callable is not serializable
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))

import torch
import torch.nn.functional as F
import transformers
from vllm.config import CompilationConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed.parallel_state import (init_distributed_environment, initialize_model_parallel,
                                             model_parallel_is_initialized)
from vllm.forward_context import set_forward_context
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.v1.attention.backend import CommonAttentionMetadata

VOCAB = 128
SLOTS = 512


def hf_llama() -> tuple[transformers.LlamaForCausalLM, str]:
    """A tiny random HF Llama (the reference) saved to a temp dir (vLLM reads its config from there)."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tempfile.mkdtemp(prefix="tiny-llama-")
    hf.save_pretrained(path)
    return hf, path


def _fake_attention(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                    output_block_scale=None):
    m = attn_metadata
    H, KH, D = self.num_heads, self.num_kv_heads, self.head_size
    q, k, v = query.view(-1, H, D), key.view(-1, KH, D), value.view(-1, KH, D)
    cache_k, cache_v = layer._df_cache
    cache_k[m.slot_mapping] = k
    cache_v[m.slot_mapping] = v
    qsl, seq = m.query_start_loc_cpu.tolist(), m.seq_lens.tolist()
    out = output.view(-1, H, D)
    for r in range(m.num_reqs):
        qs, qe, L = qsl[r], qsl[r + 1], seq[r]
        if qe == qs:
            continue
        slots = m.block_table_tensor[r, :L]
        kk = cache_k[slots].repeat_interleave(H // KH, 1).transpose(0, 1)
        vv = cache_v[slots].repeat_interleave(H // KH, 1).transpose(0, 1)
        n = qe - qs
        mask = torch.ones(n, L, dtype=torch.bool).tril(L - n)
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), kk, vv, attn_mask=mask, scale=self.scale)
        out[qs:qe] = o.transpose(0, 1)


@dataclass
class Engine:
    """A vLLM model plus what a model runner would own: config, per-layer caches, slot allocation."""

    model: LlamaForCausalLM
    config: VllmConfig

    @property
    def layers(self) -> list[str]:
        return list(self.config.compilation_config.static_forward_context)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, meta: CommonAttentionMetadata) -> torch.Tensor:
        """One forward under a hand-built forward context; returns the logits of every token."""
        with torch.no_grad(), set_current_vllm_config(self.config), \
                set_forward_context({n: meta for n in self.layers}, self.config, num_tokens=ids.shape[0]):
            hidden = self.model(ids, positions)
            return self.model.compute_logits(hidden)


def build(hf: transformers.LlamaForCausalLM, path: str, compilation: dict | None, piecewise: bool = False) -> Engine:
    """Construct the real vLLM Llama (eager when ``compilation`` is None), load ``hf``'s weights and swap the
    attention kernel for the fake one.

    ``piecewise=True`` forces vLLM's piecewise mode (VLLM_COMPILE) after config post-init: vLLM's CPU platform
    rewrites mode 3 to mode 2, so on CPU this is the only way to reach VllmBackend's splitting and the
    piecewise backend; the Inductor-only fusion passes (undefined without CUDA) are switched off."""
    mc = ModelConfig(model=path, dtype="float32", skip_tokenizer_init=True, enforce_eager=compilation is None)
    cc = CompilationConfig(**(compilation or {"mode": 0}), custom_ops=["none"])
    vc = VllmConfig(model_config=mc, compilation_config=cc)
    if piecewise:
        cc = vc.compilation_config
        cc.mode = 3
        cc.backend = "inductor"  # the name vLLM accepts in mode 3; dynaflow's make_compiler wrapper takes over
        cc.splitting_ops = ["vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"]
        cc.compile_sizes = cc.compile_sizes or []
        for name, value in list(vars(cc.pass_config).items()):
            if name.startswith(("fuse", "enable_")) and isinstance(value, bool):
                setattr(cc.pass_config, name, False)
    with set_current_vllm_config(vc):
        if not model_parallel_is_initialized():
            init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{path}/dist",
                                         local_rank=0, backend="gloo")
            initialize_model_parallel(1, 1)
        model = LlamaForCausalLM(vllm_config=vc).eval()
    model.load_weights(hf.state_dict().items())
    process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    for layer in vc.compilation_config.static_forward_context.values():
        layer.impl.forward = types.MethodType(_fake_attention, layer.impl)
        layer._df_cache = (torch.zeros(SLOTS, layer.num_kv_heads, layer.head_size),
                           torch.zeros(SLOTS, layer.num_kv_heads, layer.head_size))
    return Engine(model, vc)


def metadata(q_lens: list[int], seq_lens: list[int], slots: list[list[int]]) -> CommonAttentionMetadata:
    """vLLM's CommonAttentionMetadata for requests with ``q_lens`` new tokens, ``seq_lens`` total tokens, and
    ``slots[r]`` the cache slot of each of request r's tokens (block size 1: block table = slots)."""
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    bt = torch.zeros(len(q_lens), max(seq_lens), dtype=torch.int64)
    new_slots: list[int] = []
    for r, (ql, L, sl) in enumerate(zip(q_lens, seq_lens, slots)):
        bt[r, :L] = torch.tensor(sl[:L])
        new_slots += sl[L - ql:L]
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=len(q_lens),
        num_actual_tokens=sum(q_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_table_tensor=bt,
        slot_mapping=torch.tensor(new_slots, dtype=torch.int64), causal=True, seq_lens_cpu_upper_bound=seq.clone())


class Conversation:
    """Requests with token histories; makes the inputs of prefill / decode / mixed steps and HF's answers."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens: list[list[int]] = []
        self.slots: list[list[int]] = []
        self.next_slot = 0

    def _alloc(self, n: int) -> list[int]:
        out = list(range(self.next_slot, self.next_slot + n))
        self.next_slot += n + 7  # gaps: slots are not contiguous across requests
        return out

    def step_inputs(self, new: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor, CommonAttentionMetadata]:
        """``new[r] = n``: request r (a new one when r == len(self.tokens)) gets n fresh tokens this step."""
        ids, pos, q_lens, seq_lens, slots = [], [], [], [], []
        for r, n in new.items():
            if r == len(self.tokens):
                self.tokens.append([])
                self.slots.append([])
            fresh = torch.randint(0, VOCAB, (n,), generator=self.gen).tolist()
            start = len(self.tokens[r])
            self.tokens[r] += fresh
            self.slots[r] += self._alloc(n)
            ids += fresh
            pos += list(range(start, start + n))
            q_lens.append(n)
            seq_lens.append(len(self.tokens[r]))
            slots.append(self.slots[r])
        return torch.tensor(ids), torch.tensor(pos), metadata(q_lens, seq_lens, slots)

    def reference(self, hf: transformers.LlamaForCausalLM, new: dict[int, int]) -> torch.Tensor:
        """HF logits for the tokens of the last step (each request run on its full history)."""
        outs = []
        with torch.no_grad():
            for r, n in new.items():
                full = torch.tensor(self.tokens[r])[None]
                outs.append(hf(full).logits[0, -n:])
        return torch.cat(outs)
