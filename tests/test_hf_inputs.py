"""Inputs the way users pass them: a transformers model with ``labels=`` and an exported module with kwargs.

``labels=`` makes the model compute a loss, a mean over the rows of the batch; Dynamo specialises the batch
dim of that graph, which dynaflow runs once on the whole batch (a barrier) instead of failing the capture.
"""

from __future__ import annotations

import pytest
import torch

import dynaflow
from dynaflow.errors import BatchCouplingError

transformers = pytest.importorskip("transformers")

BATCH, SEQ, VOCAB = 4, 12, 128


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["nanoflow", pytest.param("round_robin", marks=pytest.mark.slow)])
def test_gpt2_with_labels_equals_eager_with_the_loss_as_a_barrier(strategy):
    model, ids = tiny_gpt2(), token_ids()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids, use_cache=False)
        fast = dynaflow.compile(model, strategy=strategy, nano_batches=2, executor="serial")
        got = fast(input_ids=ids, labels=ids, use_cache=False)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    split = [g for g in fast.graphs if g.segmented.batch_symbol is not None]
    whole = [g for g in fast.graphs if g.whole_batch]
    assert split and max(p.split.num for g in split for p in g.plans.values()) == 2  # the body is split
    assert whole and all(p.split.num == 1 for g in whole for p in g.plans.values())  # the loss runs whole
    assert "the whole graph is a barrier" in fast.explain()


class _SpecialisingLoss(torch.nn.Module):
    """Loops over the rows in Python, so Dynamo unrolls the loop and specialises the batch dim of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(x)
        per_row = [torch.nn.functional.cross_entropy(a, b) for a, b in zip(logits.unbind(0), labels.unbind(0))]
        return logits, torch.stack(per_row).mean()


def test_specialised_batch_runs_whole_and_strict_names_the_coupling():
    model, x, labels = _SpecialisingLoss(), torch.randn(4, 3, 8), torch.randint(0, 16, (4, 3))
    with torch.no_grad():
        ref = model(x, labels)
        fast = dynaflow.compile(model, nano_batches=2, executor="serial")
        torch.testing.assert_close(fast(x, labels), ref)
        assert [g.whole_batch for g in fast.graphs] == [True]
        torch._dynamo.reset()
        strict = dynaflow.compile(model, nano_batches=2, strict=True, executor="serial")
        with pytest.raises(BatchCouplingError, match=r"specialised the batch dim.*strict=True"):
            strict(x, labels)


def test_specialised_batch_runs_whole_under_a_stage_split_too():
    """One main nano-batch with a memory stage of two still splits: a graph Dynamo specialised runs whole under
    it as well (found by the random-model search: the stage split a static-batch graph)."""
    from dynaflow.strategies.nanoflow import NanoFlow

    model, x, labels = _SpecialisingLoss(), torch.randn(4, 3, 8), torch.randint(0, 16, (4, 3))
    staged = NanoFlow(nano_batches=1, stage_nano_batches={"memory": 2, "compute": 2})
    with torch.no_grad():
        ref = model(x, labels)
        fast = dynaflow.compile(model, strategy=staged, executor="serial")
        torch.testing.assert_close(fast(x, labels), ref)
    assert [g.whole_batch for g in fast.graphs] == [True]
    assert all(p.split.max_num == 1 for g in fast.graphs for p in g.plans.values())


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
        return self.proj(x) * scale + shift


def test_exported_module_takes_keyword_arguments():
    model, x, scale = _Scaled().eval(), torch.randn(6, 8), torch.tensor(3.0)
    ep = torch.export.export(model, (x,), {"scale": scale},
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}, "scale": None})
    module = ep.module()
    fast = dynaflow.compile(module, strategy="round_robin", nano_batches=2, executor="serial")
    with torch.no_grad():
        torch.testing.assert_close(fast(x, scale=scale), module(x, scale=scale))
        torch.testing.assert_close(fast(x=x, scale=scale), model(x, scale=scale))
    assert fast.graphs[0].plans[6].split.num == 2


def test_exported_gpt2_takes_keyword_arguments():
    model, ids = tiny_gpt2(), token_ids(2)
    model.config.use_cache = False
    ep = torch.export.export(model, (), {"input_ids": ids},
                             dynamic_shapes={"input_ids": {0: torch.export.Dim("batch", min=2, max=16)}}, strict=False)
    module = ep.module()
    fast = dynaflow.compile(module, nano_batches=2, executor="serial")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        torch.testing.assert_close(fast(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_gpt_neox_with_an_attention_mask_is_split():
    """``input_ids`` and ``attention_mask`` get different size symbols from Dynamo; the batch is the one the
    layers carry (not the first input's), so the layers split instead of running whole as ``shared``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=2)
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    kinds = [s.kind.value for s in compiled.last_graph.segmented.segments]
    layer_kinds = [s.kind.value for s in compiled.last_graph.segmented.segments if s.name.startswith(("attention", "mlp"))]
    assert layer_kinds and set(layer_kinds) == {"split"}, kinds
