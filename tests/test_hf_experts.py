"""transformers MoE experts through the hook: one row-wise op, so MoE layers split without a barrier.

Greedy tokens and every step's logits equal eager ``generate`` (static cache, left-padded prompts, batch 4,
two nano-batches) on MoE families whose experts differ in layout: Mixtral (concatenated gate/up), Qwen2-MoE
(a shared expert beside the routed ones) and GPT-OSS (transposed weights, biases, its own gate). With the
wrapper off the grouped-GEMM dispatch (a sort over tokens) is a barrier again, which shows the test can fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dynaflow
from models import assert_same_generation

transformers = pytest.importorskip("transformers")
from dynaflow.integrations import transformers as df_hf  # noqa: E402
from dynaflow.integrations.transformers import _experts  # noqa: E402

H = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
         max_position_embeddings=64, num_key_value_heads=2)
FAMILIES = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=64)),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                                          layer_types=["full_attention"] * 2)),
}


def build(name: str, **overrides: Any) -> torch.nn.Module:
    cls, config, kw = FAMILIES[name]
    torch.manual_seed(0)
    return getattr(transformers, cls)(getattr(transformers, config)(**{**H, **kw, **overrides})).eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, 128, (4, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row in range(4):
        ids[row, : row % 3], mask[row, : row % 3] = 0, 0
    return ids, mask


def generate(model: torch.nn.Module, **enable: Any) -> tuple[Any, Any, Any]:
    """Eager generate, then generate through the hook; returns (eager, dynaflow, hook)."""
    torch._dynamo.reset()
    ids, mask = prompts()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        hook = df_hf.enable(model, strategy="nanoflow", nano_batches=2, executor="serial", verify=True, **enable)
        try:
            out = model.generate(ids, **kw)
        finally:
            df_hf.disable(model)
    assert_same_generation(out, ref)
    return ref, out, hook


def barriers(hook: Any) -> list[str]:
    """Barrier reasons other than the static cache's length counter (one per layer, batch-free)."""
    return [s.reason for g in hook.compiled.graphs for s in g.segmented.segments
            if s.kind is dynaflow.SegmentKind.BARRIER and "cumulative_length" not in s.reason]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_moe_layers_split_without_a_barrier(name):
    model = build(name)
    _, _, hook = generate(model)
    assert barriers(hook) == []
    for g in hook.compiled.graphs:  # prefill and decode: one experts op per layer, in split segments
        assert g.segmented.graph_text.count("= torch.ops.dynaflow_hf.experts(") == model.config.num_hidden_layers
        assert g.last_plan.split.num == 2
    assert not any("_dynaflow_own_forward" in m.__dict__ for m in model.modules())  # disable unwrapped them


def test_without_the_wrapper_the_dispatch_is_a_barrier():
    _, _, hook = generate(build("mixtral"), row_wise_experts=False)
    reasons = barriers(hook)
    assert reasons and all("sort" in r for r in reasons), reasons
    assert all("dynaflow_hf.experts" not in g.segmented.graph_text for g in hook.compiled.graphs)


def test_an_unread_implementation_is_left_to_the_analysis(monkeypatch):
    """An implementation outside ROW_WISE runs the module's own forward: no op, so no trust is given."""
    model = build("mixtral")
    monkeypatch.setattr(_experts, "ROW_WISE", frozenset({"batched_mm"}))
    _, _, hook = generate(model)
    assert all("dynaflow_hf.experts" not in g.segmented.graph_text for g in hook.compiled.graphs)
    assert any("sort" in r for r in barriers(hook))


def test_the_op_matches_the_module_and_its_fake():
    model = build("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    assert _experts.wrap(model) == model.config.num_hidden_layers and _experts.wrap(model) == 0  # idempotent
    try:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(5, 64, generator=g)
        index = torch.randint(0, 4, (5, 2), generator=g)
        weights = torch.rand(5, 2, generator=g)
        with torch.no_grad():
            want = experts._dynaflow_own_forward(hidden, index, weights)
            got = experts(hidden, index, weights)  # through the op
            rows = torch.cat([experts(hidden[i:i + 1], index[i:i + 1], weights[i:i + 1]) for i in range(5)])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-6)  # what the batch rule claims
        handle = next(h for h, m in _experts._MODULES.items() if m is experts)
        params = list(experts.parameters())
        torch.library.opcheck(torch.ops.dynaflow_hf.experts.default, (handle, hidden, index, weights, params),
                              test_utils=("test_schema", "test_faketensor"))
        # autograd on: the module's own forward, so a backward still works
        hidden.requires_grad_(True)
        experts(hidden, index, weights).sum().backward()
        assert hidden.grad is not None
    finally:
        _experts.unwrap(model)
    assert "forward" not in experts.__dict__


def test_a_freed_module_is_a_clear_error():
    with pytest.raises(dynaflow.BackendError, match="is gone"):
        torch.ops.dynaflow_hf.experts(10**9, torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.long),
                                      torch.ones(2, 1), [])


def test_plain_compile_of_a_moe_model_splits_with_row_wise_experts():
    """``dynaflow.compile(model)`` without the generate hook: ``row_wise_experts(model)`` switches the experts to
    the row-wise op, so the forward splits without a barrier and equals eager; switched off, the sort is back."""
    model = build("mixtral")
    ids, mask = prompts()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
    barriers_of = {}
    for on in (True, False):
        torch._dynamo.reset()
        assert df_hf.row_wise_experts(model, on) == (model.config.num_hidden_layers if on else 0)
        compiled = dynaflow.compile(lambda i, m: model(i, attention_mask=m, use_cache=False).logits,
                                    strategy="nanoflow", nano_batches=2, executor="serial")
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, mask), want, rtol=1e-5, atol=1e-5)
        barriers_of[on] = [s.reason for g in compiled.graphs for s in g.segmented.segments
                           if s.kind is dynaflow.SegmentKind.BARRIER]
    df_hf.row_wise_experts(model, False)
    assert not any("sort" in r for r in barriers_of[True]), barriers_of[True]
    assert sum("sort" in r for r in barriers_of[False]) == model.config.num_hidden_layers, barriers_of[False]


def test_the_op_computes_from_the_weights_it_is_given():
    """The op is a function of its arguments: a deep copy of a switched model (its modules still registered
    under the original's handles) computes with its own weights, as do dynaflow's sandbox copies."""
    import copy

    model = build("mixtral")
    df_hf.row_wise_experts(model)
    try:
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(1.5)
        g = torch.Generator().manual_seed(0)
        hidden, index = torch.randn(5, 64, generator=g), torch.randint(0, 4, (5, 2), generator=g)
        weights = torch.rand(5, 2, generator=g)
        for m in (model, twin):
            experts = m.model.layers[0].mlp.experts
            with torch.no_grad():
                torch.testing.assert_close(experts(hidden, index, weights),  # through the op
                                           experts._dynaflow_own_forward(hidden, index, weights), rtol=0, atol=0)
        assert twin.model.layers[0].mlp.experts._dynaflow_handle == model.model.layers[0].mlp.experts._dynaflow_handle
    finally:
        df_hf.row_wise_experts(model, False)
