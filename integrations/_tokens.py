"""An engine's token inputs as one batch: every input the engine declares token-sized gets the same size symbol.

Engines mark each token-sized input dynamic on its own (vLLM: ``input_ids`` dim 0, ``positions`` dim -1), so
Dynamo gives each its own symbol although all hold the step's token count; cut per nano-batch must be all of
them or none. :func:`unify_token_dims` puts the equality into the graph's shape environment (``torch._check``),
the way Dynamo itself unifies sizes it sees meet. What the declared layout does not name is not guessed at.
"""

from __future__ import annotations

from typing import Any, Mapping

import sympy
import torch
import torch.fx

from dynaflow.frontend.batching import meta_val
from dynaflow.frontend.graph_inputs import input_name
from dynaflow.integrations._common import IntegrationError

__all__ = ["input_name", "unify_token_dims"]

def _symbol(size: Any) -> sympy.Symbol | None:
    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
        return size.node.expr
    return None


def unify_token_dims(gm: torch.fx.GraphModule, layout: Mapping[str, int], engine: str) -> list[str]:
    """Make every input that ``layout`` names (argument name -> token dim) carry one token symbol; returns the
    placeholders unified. An input whose size at its declared dim differs from the first one's at capture, or an
    undeclared input with a dynamic size, raises :class:`IntegrationError` naming ``engine`` (fail closed)."""
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
                f"{engine} input {node.name!r} ({name}) has {size.node.hint} rows at dim {layout[name]} but "
                f"{token[0]!r} has {token[1].node.hint}: dynaflow takes every declared token input "
                f"({sorted(layout)}) to hold the step's tokens.")
        else:
            torch._check(size == token[1])
        unified.append(node.name)
    tokens = {token[1].node.expr} if token is not None else set()
    for node, val in others:
        stray = [s for s in val.shape if _symbol(s) is not None and s.node.expr not in tokens]
        if stray:
            raise IntegrationError(
                f"{engine} graph input {node.name!r} has a dynamic shape {tuple(val.shape)} but is not one of the "
                f"token inputs dynaflow knows ({sorted(layout)}); it cannot tell whether its rows are the step's "
                "tokens. Report the model's forward signature to dynaflow.")
    return unified
