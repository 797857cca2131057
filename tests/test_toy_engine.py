"""The engine-shaped test model (``tests/toy_engine``): a paged-KV serving engine made of torch whose greedy
tokens must equal ``transformers`` ``generate`` with the same weights, eager and with dynaflow as its compile
backend (hooked up the way the vLLM integration is), on CPU here and with the cuda executor on a GPU.

Exactness: greedy tokens are compared for equality, never "mostly equal". The models run in float64 (the
parts ``transformers`` computes in float32, RMSNorm statistics and rotary cos/sin, are mirrored), so the
engine's logits differ from the reference by ~1e-12 at most, and the ``reference`` fixture asserts that every
greedy choice of the reference wins by a margin far above that: a token can only differ through a real bug.
"""

from __future__ import annotations

import collections

import pytest
import torch

from dynaflow.backend.capture_sizes import barrier_names

transformers = pytest.importorskip("transformers")

from dynaflow.integrations._tokens import input_name  # noqa: E402
from toy_engine.dynaflow_step import compile_step, unify_token_dims  # noqa: E402
from toy_engine.engine import ToyEngine  # noqa: E402
from toy_engine.model import ToyLlama  # noqa: E402

PROMPT_LENGTHS = (3, 20, 7, 12, 5, 16)
NEW_TOKENS = 8
TOKEN_BUDGET = 16  # below the longest prompts: chunked prefill, and mixed prefill+decode steps
MIN_MARGIN = 1e-3  # the reference's smallest top-1 minus top-2 logit must exceed this (see module docstring)



@pytest.fixture(scope="module")
def reference():
    """A random float64 Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128), prompts, and its greedy
    tokens from ``generate`` (one prompt at a time, no padding, no EOS)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    tokens, margin = [], float("inf")
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)
            tokens.append(out.sequences[0, len(p):].tolist())
            for scores in out.scores:
                top = scores[0].topk(2).values
                margin = min(margin, float(top[0] - top[1]))
    assert all(len(t) == NEW_TOKENS for t in tokens)
    assert margin > MIN_MARGIN, f"reference greedy margin {margin:.2e}: pick another seed"
    return hf, prompts, tokens


def _engine(hf, device="cpu", options=None, steps=None, **kw) -> ToyEngine:
    model = ToyLlama.from_hf(hf).to(device)
    forward = compile_step(model, options, steps) if options is not None else None
    return ToyEngine(model, forward=forward, token_budget=TOKEN_BUDGET, **kw)


def _check_dynaflow_run(steps, nano: int) -> None:
    """One graph for every step size; input_ids and positions unified, so nothing (rotary included) is a
    barrier; and the attention contexts really were installed per nano-batch."""
    assert len(steps) == 1, f"{len(steps)} graphs compiled (a recompile per step size?)"
    step = steps[0]
    assert len(step.unified) == 2
    assert barrier_names(step.graph.segmented) == ()
    per_step = [len(s) for s in step.nano_seen]
    if nano == 1:
        assert max(per_step) == 0  # one nano-batch: attention runs under the whole step's context
    else:
        assert max(per_step) == nano, per_step
        assert sum(n > 1 for n in per_step) >= 5, per_step


def test_eager_toy_engine_equals_generate(reference):
    hf, prompts, tokens = reference
    engine = _engine(hf)
    assert engine.generate(prompts, NEW_TOKENS) == tokens
    steps = engine.steps
    assert any(set(s.phases) == {"prefill", "decode"} for s in steps), "no mixed prefill+decode step"
    prefill_steps = collections.Counter(r.rid for s in steps for r, p in zip(s.requests, s.phases) if p == "prefill")
    assert max(prefill_steps.values()) >= 2, "no prompt was prefilled over several steps (chunked prefill)"
    assert max(len(s.requests) for s in steps) == len(prompts)  # continuous batching: all in flight at once
    assert all(s.num_tokens <= TOKEN_BUDGET for s in steps)


def test_token_inputs_are_unified_into_one_symbol(reference):
    """The engine marks input_ids and positions dynamic one by one and the rotary op relates nothing, so
    Dynamo gives them two size symbols; ``unify_token_dims`` makes them one."""
    hf, _, _ = reference
    model = ToyLlama.from_hf(hf)
    seen = {}

    def backend(gm, example_inputs):
        def syms():
            return {input_name(n): n.meta["example_value"].shape[0].node.expr
                    for n in gm.graph.find_nodes(op="placeholder") if input_name(n) in ("input_ids", "positions")}
        seen["before"] = syms()
        seen["unified"] = unify_token_dims(gm)
        seen["after"] = syms()
        return gm.forward

    ids, pos = torch.zeros(5, dtype=torch.long), torch.arange(5)
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(pos, 0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="outside set_forward_context"):
        torch.compile(model, backend=backend, fullgraph=True)(ids, pos)  # traced, then run without an engine
    assert len(set(seen["before"].values())) == 2
    assert len(seen["unified"]) == 2 and len(seen["before"]) == 2
    assert len(set(seen["after"].values())) == 1


CPU_CASES = [(ex, 1, "sequential") for ex in ("serial", "thread")] + [
    (ex, nano, strategy) for ex in ("serial", "thread") for nano in (2, 3) for strategy in ("sequential", "nanoflow")
] + [(ex, 2, "round_robin") for ex in ("serial", "thread")]


@pytest.mark.parametrize("executor,nano,strategy", CPU_CASES, ids=[f"{e}-nb{n}-{s}" for e, n, s in CPU_CASES])
def test_dynaflow_toy_engine_equals_generate(reference, executor, nano, strategy):
    hf, prompts, tokens = reference
    steps = []
    engine = _engine(hf, options={"executor": executor, "nano_batches": nano, "strategy": strategy}, steps=steps)
    assert engine.generate(prompts, NEW_TOKENS) == tokens
    _check_dynaflow_run(steps, nano)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["streams", "cuda-graphs"])
@pytest.mark.parametrize("nano,strategy", [(2, "nanoflow"), (3, "sequential")])
def test_dynaflow_toy_engine_cuda_executor_lowering_on_cpu(reference, monkeypatch, nano, strategy, cuda_graphs):
    """The GPU cases below with torch.cuda's streams, events and graphs faked on CPU (``tests/fake_cuda.py``):
    the cuda executor's lowering, stream protocol and graph capture/replay at fixed addresses, per-nano-batch
    contexts included. A fake replay re-runs the launches' Python (a real one does not), so a context built on
    the host alone would pass here and fail on a GPU: ``-m cuda`` covers that."""
    import fake_cuda

    hf, prompts, tokens = reference
    replays = []
    real_replay = fake_cuda.FakeGraph.replay
    monkeypatch.setattr(fake_cuda.FakeGraph, "replay", lambda g: replays.append(g) or real_replay(g))
    steps = []
    with fake_cuda.faked_cuda():
        options = {"executor": "cuda", "nano_batches": nano, "strategy": strategy, "cuda_graphs": cuda_graphs}
        engine = _engine(hf, "cpu", options, steps)
        assert engine.generate(prompts, NEW_TOKENS) == tokens
    assert (len(replays) > 0) == cuda_graphs
    assert max(len(s) for s in steps[0].nano_seen) == nano
    assert barrier_names(steps[0].graph.segmented) == ()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_toy_engine_outer_cuda_graph_on_gpu(reference):
    """The engine alone on a GPU with its decode steps replayed from its own CUDA graph (sanity for the
    dynaflow cases below: a failure here is the toy engine's, not dynaflow's)."""
    hf, prompts, tokens = reference
    engine = _engine(hf, "cuda", decode_cuda_graph=True)
    assert engine.generate(prompts, NEW_TOKENS) == tokens
    assert engine.replays > 0


GPU_MODES = {
    "cuda-executor": ({"cuda_graphs": False}, False),
    "cuda-executor-outer-graph": ({"cuda_graphs": False}, True),  # dynaflow's step inside the engine's capture
    "cuda-executor-cuda-graphs": ({"cuda_graphs": True}, False),  # dynaflow captures the step itself
}


@pytest.mark.parametrize("nano,strategy", [(2, "nanoflow"), (3, "sequential")])
@pytest.mark.parametrize("mode", sorted(GPU_MODES))
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dynaflow_toy_engine_on_gpu_equals_generate(reference, mode, nano, strategy):
    """dynaflow's cuda executor on a GPU (float64): eager streams, inside the engine's decode CUDA graph, and
    capturing the step itself (``cuda_graphs=True``)."""
    hf, prompts, tokens = reference
    extra, outer = GPU_MODES[mode]
    steps = []
    options = {"executor": "cuda", "nano_batches": nano, "strategy": strategy, **extra}
    engine = _engine(hf, "cuda", options, steps, decode_cuda_graph=outer)
    assert engine.generate(prompts, NEW_TOKENS) == tokens
    if outer:
        assert engine.replays > 0
    # under graphs enter() runs at warm-up and capture, not on replay: per-call counts are lower bounds
    assert max(len(s) for s in steps[0].nano_seen) == nano
    assert barrier_names(steps[0].graph.segmented) == ()
