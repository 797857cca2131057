"""A real SGLang ``LlamaForCausalLM`` on CPU: tiny random weights, a small fake attention backend, a hand-built
``ForwardBatch`` and forward context.

The fake backend stands in for the engine's kernels only. Like SGLang's real backends it is *stateful*:
``init_forward_metadata(forward_batch)`` prepares per-batch metadata, and its attention is an opaque custom op
(``dftest_sgl::attention``) that looks the backend up through SGLang's global forward context, writes K/V at
``out_cache_loc`` and reads each request's history through ``req_to_token``. So it is right only when each
nano-batch runs with its own batch's backend state.

On CPU, ``sglang_shim`` stands in for torchvision (see there). Import after ``require("sglang")``.
"""
# ruff: noqa: E402
import sglang_shim

sglang_shim.install()

import dataclasses, tempfile, torch, transformers
import torch.nn.functional as F
cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
hf = transformers.LlamaForCausalLM(cfg).eval()
d = tempfile.mkdtemp(); hf.save_pretrained(d)
from sglang.srt.server_args import ServerArgs
from sglang.srt import runtime_context as rc
rc.publish(ServerArgs(model_path=d, device="cpu", skip_tokenizer_init=True), role="test")
from sglang.test.layer_ut_utils import init_single_process_dist
init_single_process_dist()
from sglang.srt.models.llama import LlamaForCausalLM
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context, get_attn_backend

@torch.library.custom_op("dftest_sgl::attention", mutates_args=())
def fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, heads: int, kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    be = get_attn_backend()
    meta = be.forward_metadata
    ck, cv = be.cache[layer_id]
    q = q.view(-1, heads, head_dim); k = k.view(-1, kv_heads, head_dim); v = v.view(-1, kv_heads, head_dim)
    ck[meta["out_cache_loc"]] = k; cv[meta["out_cache_loc"]] = v
    out = torch.empty_like(q)
    for r, (qs, qe, L, req) in enumerate(zip(meta["qsl"][:-1], meta["qsl"][1:], meta["seq_lens"], meta["reqs"])):
        slots = be.req_to_token[req, :L]
        kk = ck[slots].repeat_interleave(heads // kv_heads, 1).transpose(0, 1); vv = cv[slots].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        n = qe - qs
        mask = torch.ones(n, L, dtype=torch.bool).tril(L - n)
        out[qs:qe] = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), kk, vv, attn_mask=mask, scale=scale).transpose(0, 1)
    return out.view(-1, heads * head_dim)

@fake_attention.register_fake
def _(q, k, v, layer_id, heads, kv_heads, head_dim, scale):
    return torch.empty_like(q).view(q.shape[0], heads * head_dim)

class FakeBackend(AttentionBackend):
    def __init__(self, layers, slots=512, reqs=16, max_len=64, kv_heads=2, head_dim=8):
        self.cache = {i: (torch.zeros(slots, kv_heads, head_dim), torch.zeros(slots, kv_heads, head_dim)) for i in range(layers)}
        self.req_to_token = torch.zeros(reqs, max_len, dtype=torch.int64)
    def init_forward_metadata(self, fb):
        if fb.forward_mode.is_decode():
            qlens = [1] * fb.batch_size
        else:
            qlens = list(fb.extend_seq_lens_cpu)
        qsl = [0]
        for n in qlens: qsl.append(qsl[-1] + n)
        self.forward_metadata = {"qsl": qsl, "seq_lens": fb.seq_lens_cpu.tolist(), "reqs": fb.req_pool_indices.tolist(), "out_cache_loc": fb.out_cache_loc}
    def _fwd(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        return torch.ops.dftest_sgl.attention(q, k, v, layer.layer_id, layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim, layer.scaling)
    forward_extend = _fwd
    forward_decode = _fwd

def build():
    m = LlamaForCausalLM(cfg).eval()
    m.load_weights(hf.state_dict().items())
    return m

def make_batch(be, new, tokens, slots, gen):
    # new: {req: n}
    ids, pos, ocl, qlens, seqs, reqs, prefix = [], [], [], [], [], [], []
    for r, n in new.items():
        if r not in tokens: tokens[r] = []; slots[r] = []
        fresh = torch.randint(0, 128, (n,), generator=gen).tolist()
        start = len(tokens[r]); tokens[r] += fresh
        base = 50 * r + start
        ns = list(range(base, base + n)); slots[r] += ns
        be.req_to_token[r, :len(slots[r])] = torch.tensor(slots[r])
        ids += fresh; pos += list(range(start, start + n)); ocl += ns; qlens.append(n); seqs.append(len(tokens[r])); reqs.append(r); prefix.append(start)
    T = len(ids)
    decode = all(n == 1 for n in qlens) and all(p > 0 for p in prefix)
    fb = ForwardBatch(forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND, batch_size=len(qlens), input_ids=torch.tensor(ids), req_pool_indices=torch.tensor(reqs),
        seq_lens=torch.tensor(seqs), out_cache_loc=torch.tensor(ocl), seq_lens_sum=sum(seqs), seq_lens_cpu=torch.tensor(seqs), positions=torch.tensor(pos),
        extend_seq_lens=torch.tensor(qlens), extend_prefix_lens=torch.tensor(prefix), extend_start_loc=torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)[:-1].tolist())),
        extend_seq_lens_cpu=qlens, extend_prefix_lens_cpu=prefix, extend_num_tokens=T)
    return fb

def reference(new, tokens):
    with torch.no_grad():
        return torch.cat([hf(torch.tensor(tokens[r])[None]).logits[0, -n:] for r, n in new.items()])

def run(model_fn, steps, seed=1):
    be = FakeBackend(2)
    tokens, slots = {}, {}; gen = torch.Generator().manual_seed(seed)
    outs = []
    for new in steps:
        fb = make_batch(be, new, tokens, slots, gen)
        be.init_forward_metadata(fb)
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=be)):
            h = model_fn(fb.input_ids, fb.positions, fb)
        outs.append((h, reference(new, tokens)))
    return outs

