"""What vLLM's compiled forward declares about its inputs, turned into facts dynaflow's analysis can use.

vLLM marks each token-sized input dynamic on its own (``input_ids`` dim 0, ``positions`` dim -1,
``inputs_embeds`` and every ``intermediate_tensors`` tensor dim 0), so Dynamo gives each its own size symbol
even though all hold the step's token count. :func:`unify_token_dims` tells the graph's shape environment
that they are one symbol, so every one of them is cut per nano-batch (``positions`` included: a nano-batch
with its own rows of ``q`` but all rows of ``positions`` makes vLLM's in-place rotary kernel write past
``q``). Inputs with another dynamic size are not guessed at: the step fails closed.

:data:`KERNEL_RULES` are batch rules for vLLM's own row-wise kernels (``_C::rms_norm``, ``_C::onednn_mm``, ...);
an op outside it couples, as every op without a rule does.
"""

from __future__ import annotations

from typing import Mapping

import torch.fx

from dynaflow.frontend.aten_rules import BatchRule, register_batch_rule, rows
from dynaflow.integrations import _tokens
from dynaflow.integrations._tokens import input_name

__all__ = ["TOKEN_INPUTS", "KERNEL_RULES", "register_kernel_rules", "unify_token_dims", "input_name"]

TOKEN_INPUTS: Mapping[str, int] = {"input_ids": 0, "positions": -1, "inputs_embeds": 0, "intermediate_tensors": 0}
"""The token dim of each input of vLLM's compiled decoder forward (``support_torch_compile``'s dynamic dims)."""

KERNEL_RULES: Mapping[str, BatchRule] = {
    "_C::onednn_mm": rows(c=0, a=0),
    "_C::onednn_scaled_mm": rows(c=0, a=0, a_scales=0),
    "_C::rotary_embedding": rows(positions=-1, query=0, key=0),
    "_C::rms_norm": rows(out=0, input=0),
    "_C::fused_add_rms_norm": rows(input=0, residual=0),
    "_C::silu_and_mul": rows(out=0, input=0),
    "_C::gelu_and_mul": rows(out=0, input=0),
    "_C::gelu_tanh_and_mul": rows(out=0, input=0),
    "_C::cpu_fused_moe": rows(output=0, input=0, topk_weights=0, topk_id=0),
}
"""vLLM kernels that treat each token row on its own (their schemas mark the outputs written in place)."""

def register_kernel_rules() -> None:
    """Register :data:`KERNEL_RULES` (idempotent)."""
    for name, rule in KERNEL_RULES.items():
        register_batch_rule(name, rule)


def unify_token_dims(gm: torch.fx.GraphModule) -> list[str]:
    """vLLM's :data:`TOKEN_INPUTS` as one batch symbol (see :func:`dynaflow.integrations._tokens.unify_token_dims`)."""
    return _tokens.unify_token_dims(gm, TOKEN_INPUTS, "vLLM")
