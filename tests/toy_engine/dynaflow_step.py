"""dynaflow as the toy engine's compile backend, hooked up the way ``dynaflow.integrations.vllm`` hooks vLLM.

:func:`make_backend` returns a ``torch.compile`` backend that, for the model step's Dynamo graph:

1. makes ``input_ids`` and ``positions`` one batch symbol (:func:`unify_token_dims`): the engine marks each
   dynamic on its own, as vLLM does, so Dynamo gives them separate size symbols, and the in-place rotary op
   (whose fake impl relates nothing) never unifies them; without this, a nano-batch would get its own rows
   of ``q`` but every row of ``positions``;
2. registers the toy ops' row-local batch rules, threads the in-place writes (``thread_mutations``) and
   marks the forward-context ops, which become ``memory, nano-context, batch-local`` segments;
3. builds a dynaflow ``CompiledGraph`` with the request-aligned strategy (``make_strategy``).

Each step, :class:`ToyStep` declares the request layout from the forward context's host-side query lengths
(``dynaflow.requests``) and installs ``nano_context(enter)``: ``enter(i, (start, stop))`` installs a forward
context whose metadata nano-batch ``i``'s own builder cut from the step's. ``enter`` rebuilds on every call
(a few tiny device ops): under a CUDA-graph capture the rebuild is recorded with the launch, so a replay
re-derives the nano-batch metadata from the refreshed step buffers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.fx
import torch.fx.experimental._config as fx_config

from dynaflow.api import CompiledGraph
from dynaflow.frontend.rules import Where, default_rules, op_name
from dynaflow.integrations import _tokens
from dynaflow.integrations._common import HOST_STATE_META, make_strategy, matching_rules, thread_mutations
from dynaflow.nanocontext import nano_context
from dynaflow.requests import requests

from .context import get_forward_context, set_forward_context
from .ops import register_batch_rules

HOST_OPS = ("toyengine.write_kv", "toyengine.paged_attention")
TOKEN_INPUTS = {"input_ids": 0, "positions": 0}

ATTENTION_RULE = Where(lambda n: bool(n.meta.get(HOST_STATE_META)), name="attention",
                       tags=("memory", "nano-context", "batch-local"))


def is_host_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and op_name(node).startswith(HOST_OPS)


def unify_token_dims(gm: torch.fx.GraphModule) -> list[str]:
    """``input_ids`` and ``positions`` (dim 0 each) as one batch symbol, as the vLLM integration does for vLLM's
    token inputs (the shared :func:`dynaflow.integrations._tokens.unify_token_dims`)."""
    return _tokens.unify_token_dims(gm, TOKEN_INPUTS, "toy engine")


class ToyStep:
    """What the compiled step calls: the dynaflow program under the step's request layout and nano context.
    ``nano_seen[k]`` is the set of nano-batch indices whose context ``enter`` installed in call ``k``."""

    def __init__(self, graph: CompiledGraph, unified: list[str]):
        self.graph, self.unified = graph, unified
        self.nano_seen: list[set[int]] = []

    def __call__(self, *args: Any) -> Any:
        ctx = get_forward_context()
        batch = self.graph.batch_size(args)
        if sum(ctx.query_lens) != batch:
            raise RuntimeError(f"toy engine: forward context covers {sum(ctx.query_lens)} tokens, step got {batch}")
        seen: set[int] = set()
        self.nano_seen.append(seen)

        def enter(nano: int, rows: tuple[int, int]) -> Any:
            if nano >= len(ctx.builders):
                raise RuntimeError(f"toy engine: no metadata builder for nano-batch {nano}")
            seen.add(nano)
            return set_forward_context(dataclasses.replace(ctx, meta=ctx.builders[nano].build(ctx.meta, rows)))

        with requests(ctx.query_lens, ctx.phases), nano_context(enter, name="toy forward context"):
            return self.graph(*args)


def make_backend(options: Mapping[str, Any], steps: list[ToyStep] | None = None) -> Any:
    """A ``torch.compile`` backend: dynaflow with integration ``options`` (DynaflowConfig keys + ``min_rows``);
    every step callable it makes is appended to ``steps``."""
    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> ToyStep:
        register_batch_rules()
        unified = unify_token_dims(gm)
        thread_mutations(gm, is_host_op)
        cfg, strategy = make_strategy(options)
        base = cfg.rules if cfg.rules is not None else (strategy.rules() or default_rules())
        cfg = cfg.replace(rules=matching_rules(gm, [ATTENTION_RULE, *base]))
        step = ToyStep(CompiledGraph(gm, cfg, strategy, label="toy").prepare(), unified)
        if steps is not None:
            steps.append(step)
        return step

    return backend


def compile_step(model: torch.nn.Module, options: Mapping[str, Any], steps: list[ToyStep] | None = None) -> Any:
    """The model's step compiled through dynaflow, with each token input marked dynamic on its own."""
    compiled = torch.compile(model, backend=make_backend(options, steps), fullgraph=True)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_dynamic(input_ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        # size-oblivious sizes: a 1-token step reuses the graph instead of recompiling a static one (vLLM
        # compiles one graph for every token count too)
        with fx_config.patch(backed_size_oblivious=True):
            return compiled(input_ids, positions)

    return forward
