"""vLLM's token inputs as one batch (``dynaflow.integrations.vllm._layout``; no vLLM needed).

vLLM marks ``input_ids`` and ``positions`` dynamic one by one, so Dynamo gives them separate size symbols; the
integration unifies the declared ones and refuses what it cannot place."""

from __future__ import annotations

import pytest
import torch

from dynaflow.integrations._common import IntegrationError
from dynaflow.integrations.vllm import _layout


def _capture(fn, *args, dynamic=(0, 1)):
    """Dynamo's graph of ``fn`` with each of ``args[i]`` (i in ``dynamic``) marked dynamic on its own."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for i in dynamic:
        torch._dynamo.mark_dynamic(args[i], args[i].dim() - 1 if i == 1 else 0)
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen[0]


def _sym(gm, name):
    node = next(n for n in gm.graph.find_nodes(op="placeholder") if _layout.input_name(n) == name)
    return node.meta["example_value"].shape[-1].node.expr


def forward(input_ids, positions):
    return input_ids.float() * 2, positions + 1  # the two never meet: Dynamo keeps two symbols


def test_declared_token_inputs_share_one_symbol():
    gm = _capture(forward, torch.zeros(6, dtype=torch.long), torch.arange(6))
    assert _sym(gm, "input_ids") != _sym(gm, "positions")
    assert len(_layout.unify_token_dims(gm)) == 2
    assert _sym(gm, "input_ids") == _sym(gm, "positions")


def test_mrope_positions_use_their_last_dim():
    gm = _capture(forward, torch.zeros(6, dtype=torch.long), torch.arange(18).view(3, 6))
    _layout.unify_token_dims(gm)
    assert _sym(gm, "input_ids") == _sym(gm, "positions")


def test_token_inputs_of_different_sizes_are_refused():
    gm = _capture(forward, torch.zeros(6, dtype=torch.long), torch.arange(7))
    with pytest.raises(IntegrationError, match=r"positions.*\(positions\) has 7 rows.*input_ids.*has 6.*step's tokens"):
        _layout.unify_token_dims(gm)


def test_an_undeclared_dynamic_input_is_refused():
    def fwd(input_ids, token_type_ids):
        return input_ids + 1, token_type_ids * 2

    gm = _capture(fwd, torch.zeros(6, dtype=torch.long), torch.zeros(5, dtype=torch.long), dynamic=(0, 1))
    with pytest.raises(IntegrationError, match=r"token_type_ids.*dynamic shape.*not one of the token inputs"):
        _layout.unify_token_dims(gm)


def test_vllm_kernel_rules_register():
    from dynaflow.frontend import aten_rules

    _layout.register_kernel_rules()
    assert {"_C::onednn_mm", "_C::rotary_embedding", "_C::rms_norm"} <= set(aten_rules.ruled_ops())
