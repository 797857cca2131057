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

import re
from typing import Any, Mapping

import sympy
import torch
import torch.fx

from dynaflow.frontend.aten_rules import BatchRule, register_batch_rule, rows
from dynaflow.frontend.batching import meta_val
from dynaflow.integrations._common import IntegrationError

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

_SOURCE = re.compile(r"^L\['(\w+)'\]")
_NAME = re.compile(r"^L_(\w+?)_(?:tensors_|$)")


def register_kernel_rules() -> None:
    """Register :data:`KERNEL_RULES` (idempotent)."""
    for name, rule in KERNEL_RULES.items():
        register_batch_rule(name, rule)


def input_name(node: torch.fx.Node) -> str | None:
    """The forward argument a Dynamo placeholder came from (``L['positions']`` -> ``positions``)."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is not None:
        name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", "")
        m = _SOURCE.match(str(name))
        if m:
            return m.group(1)
    m = _NAME.match(node.name if node.name.startswith("L_") else node.target if isinstance(node.target, str) else "")
    return m.group(1) if m else None


def _symbol(size: Any) -> sympy.Symbol | None:
    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
        return size.node.expr
    return None


def unify_token_dims(gm: torch.fx.GraphModule, layout: Mapping[str, int] = TOKEN_INPUTS) -> list[str]:
    """Make every input that ``layout`` names carry one token symbol; returns the inputs unified.

    The equality goes into the graph's shape environment (``torch._check``), the way Dynamo itself unifies
    sizes it sees meet. An input whose size at its declared dim differs from ``input_ids`` at capture, or an
    undeclared input with a dynamic size, raises :class:`IntegrationError` (fail closed, never a guess)."""
    token: tuple[str, torch.SymInt] | None = None
    unified: list[str] = []
    others: list[tuple[torch.fx.Node, torch.Tensor]] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = meta_val(node)
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        name = input_name(node)
        if name not in layout:
            others.append((node, val))
            continue
        size = val.shape[layout[name] % val.dim()]
        if _symbol(size) is None:
            continue  # static size (a profiling run): nothing to unify
        if token is None:
            token = (node.name, size)
        elif int(size.node.hint) != int(token[1].node.hint):
            raise IntegrationError(
                f"vLLM input {node.name!r} ({name}) has {size.node.hint} rows at dim {layout[name]} but "
                f"{token[0]!r} has {token[1].node.hint}: dynaflow takes every declared token input "
                f"({sorted(layout)}) to hold the step's tokens. Run with nano_batches=1.")
        else:
            torch._check(size == token[1])
        unified.append(node.name)
    tokens = {token[1].node.expr} if token is not None else set()
    for node, val in others:
        stray = [s for s in val.shape if _symbol(s) is not None and s.node.expr not in tokens]
        if stray:
            raise IntegrationError(
                f"vLLM graph input {node.name!r} has a dynamic shape {tuple(val.shape)} but is not one of the "
                f"token inputs dynaflow knows ({sorted(layout)}); it cannot tell whether its rows are the step's "
                "tokens. Run with nano_batches=1, or report the model's forward signature to dynaflow.")
    return unified
