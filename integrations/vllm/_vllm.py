"""The step vLLM runs in whole-graph mode: vLLM's Dynamo graph planned by dynaflow, and per step the request
layout and per-nano-batch forward contexts read from vLLM's forward context.

Private, loaded on first use (vLLM is imported only in this package's underscore modules). The vLLM symbols
used are pinned by ``tests/integration/test_vllm_contract.py``; a release that moves one fails there by name.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import warnings
from typing import Any, Mapping

import torch
import torch.fx
import vllm.forward_context as vllm_fc

from dynaflow.api import CompiledGraph
from dynaflow.frontend.rules import Where, default_rules, op_name
from dynaflow.integrations._common import HOST_STATE_META, IntegrationError, matching_rules, thread_mutations
from dynaflow.integrations.vllm import _layout, _metadata, _settings, _setup
from dynaflow.nanocontext import nano_context
from dynaflow.requests import requests

log = logging.getLogger("dynaflow.integrations.vllm")

HOST_OPS = ("vllm.unified_attention", "vllm.unified_mla_attention", "vllm.unified_kv_cache_update",
            "vllm.unified_mla_kv_cache_update")
"""Op-name prefixes of vLLM's opaque ops that read the forward context (metadata, slot mapping by layer)."""


def is_host_op(node: torch.fx.Node) -> bool:
    """Does ``node`` call one of vLLM's forward-context-reading attention ops?"""
    return node.op == "call_function" and op_name(node).startswith(HOST_OPS)


def _reads_host_state(node: torch.fx.Node) -> bool:
    return bool(node.meta.get(HOST_STATE_META))


ATTENTION_RULE = Where(_reads_host_state, name="attention", tags=("memory", "nano-context", "batch-local"))
"""vLLM's attention ops (and the aliases of the buffers they fill) as their own nano-context segments."""


def make_step(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: Mapping[str, Any]) -> Any:
    """Partition vLLM's whole Dynamo graph (attention ops in their own nano-context segments); a graph with a
    dynamic input whose rows dynaflow cannot tell from the step's tokens (vLLM's transformers backend passes
    ``input_ids`` of shape ``(1, tokens)`` through ``**kwargs``) is handed back as is, with a warning."""
    _setup.check_aot_compile()
    _setup.check_cuda_graphs()
    _layout.register_kernel_rules()
    try:
        _layout.unify_token_dims(gm)
    except IntegrationError as exc:  # inputs whose rows dynaflow cannot tell: this graph runs as vLLM captured it
        # a warning, not only a log line: the engine's processes configure no logging for dynaflow, and a user who
        # turned dynaflow on must hear that this graph runs without it
        warnings.warn(f"{exc} dynaflow runs this vLLM graph unsplit, as vLLM captured it.", RuntimeWarning,
                      stacklevel=2)
        AS_IS.append(str(exc))
        return gm
    thread_mutations(gm, is_host_op)
    if not any(_reads_host_state(n) for n in gm.graph.nodes):
        log.info("vLLM graph has no forward-context op; it is planned like any model")
    cfg, strategy = _settings.vllm_strategy(opts)
    c_kernels = any(n.op == "call_function" and op_name(n).startswith("_C.") for n in gm.graph.nodes)
    cfg = cfg.replace(executor=_setup.cpu_executor(cfg.executor, c_kernels))
    base = cfg.rules if cfg.rules is not None else (strategy.rules() or default_rules())
    cfg = cfg.replace(rules=matching_rules(gm, [ATTENTION_RULE, *base]))
    graph = CompiledGraph(gm, cfg, strategy, label=f"vllm{len(STEPS)}").prepare()
    step = VllmStep(graph, _token_positions(gm))
    STEPS.append(step)
    return step


def _token_positions(gm: torch.fx.GraphModule) -> tuple[tuple[int, int], ...]:
    """(argument index, token dim) of each declared token input, dynamic or not: the step's token count is read
    from them (a graph with a static size has no batch symbol to find it by), and they must agree every call."""
    out = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        name = _layout.input_name(node)
        val = node.meta.get("example_value", node.meta.get("val"))
        if name in _layout.TOKEN_INPUTS and isinstance(val, torch.Tensor) and val.dim() > 0:
            out.append((i, _layout.TOKEN_INPUTS[name] % val.dim()))
    return tuple(out)


AS_IS: list[str] = []
"""Why each graph dynaflow handed back to vLLM unsplit (an input whose rows it cannot tell) was, oldest first."""

STEPS: list["VllmStep"] = []
"""Every step callable made in this process, oldest first (for explain() and tests)."""


class VllmStep:
    """The callable vLLM runs each step: derive the request layout and per-nano-batch forward contexts from
    the active forward context, then run dynaflow's program. ``nano_counts`` counts steps by the number of
    nano-batches their attention ran in (``{1: 40, 2: 12}``)."""

    def __init__(self, graph: CompiledGraph, token_inputs: tuple[tuple[int, int], ...] = ()):
        self.graph = graph
        self.token_inputs = token_inputs
        self.nano_counts: collections.Counter[int] = collections.Counter()

    def __call__(self, *args: Any) -> Any:
        ctx = vllm_fc._forward_context if vllm_fc.is_forward_context_available() else None
        first = self.token_inputs[0] if self.token_inputs else None
        batch = int(args[first[0]].shape[first[1]]) if first else self.graph.batch_size(args)
        for i, d in self.token_inputs:
            if args[i].shape[d] != batch:
                raise IntegrationError(
                    f"vLLM step input {i} has {args[i].shape[d]} rows at dim {d} but the step has {batch} tokens: the "
                    "token inputs disagree, against the shapes vLLM declared when it compiled this graph (one token "
                    "count for all). Please report it with the model's architecture; DYNAFLOW_VLLM=0 runs the model "
                    "without dynaflow.")
        plan = StepState.from_context(ctx, batch)
        if plan is None:
            with requests([batch]):  # no attention metadata (e.g. a profiling run): one nano-batch
                out = self.graph(*args)
            self.nano_counts[1] += 1
            return out
        with requests(plan.lengths, plan.phases), nano_context(plan.enter, name="vllm forward context"):
            out = self.graph(*args)
        self.nano_counts[max(len(plan.cache), 1)] += 1
        return out

    def __repr__(self) -> str:
        return f"VllmStep({self.graph.label}, strategy={self.graph.strategy!r})"


def step_stats(*_: Any) -> dict[int, int]:
    """Steps run in this process by nano-batch count, over every step callable (``LLM.collective_rpc`` target:
    vLLM passes the worker as the first argument)."""
    total: collections.Counter[int] = collections.Counter()
    for step in STEPS:
        total.update(step.nano_counts)
    return dict(total)


@dataclasses.dataclass
class StepState:
    """One step's forward context and its request layout; builds (and caches) nano-batch contexts."""

    ctx: Any
    qsl: list[int]
    lengths: tuple[int, ...]
    phases: tuple[str, ...]
    batch: int
    cache: dict[tuple[int, int], Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_context(cls, ctx: Any, batch: int) -> "StepState | None":
        if ctx is None:
            return None
        meta = _first_metadata(ctx.attn_metadata)
        if meta is None:
            return None
        common = _metadata.common_of(meta)
        source = common if common is not None else meta
        qsl_t = getattr(source, "query_start_loc_cpu", None)
        if qsl_t is None:
            qsl_t = getattr(source, "query_start_loc", None)
        if qsl_t is None:
            raise IntegrationError(
                f"vLLM attention metadata {type(meta).__name__} has no query_start_loc(_cpu); dynaflow cannot find "
                "request boundaries. Register a slicer (register_metadata_slicer) for a metadata type that has them, "
                "or set nano_batches=1."
            )
        qsl = [int(v) for v in qsl_t.tolist()]
        lengths: list[int] = []
        for a, b in zip(qsl, qsl[1:]):
            if b > a:
                lengths.append(b - a)
        if qsl[-1] > batch or not lengths:
            raise IntegrationError(
                f"vLLM forward context covers {qsl[-1]} tokens but the model got {batch} (input_ids rows); the "
                "forward context does not belong to this call."
            )
        lengths[-1] += batch - qsl[-1]  # CUDA-graph padding rides with the last request
        phases = tuple("decode" if n == 1 else "prefill" for n in lengths)
        return cls(ctx, qsl, tuple(lengths), phases, batch)

    def enter(self, nano: int, rows: tuple[int, int]) -> Any:
        sub = self.cache.get(rows)
        if sub is None:
            sub = self.cache[rows] = self._slice(nano, *rows)
        return vllm_fc.override_forward_context(sub)

    def _slice(self, nano: int, start: int, stop: int) -> Any:
        qsl, n_req = self.qsl, len(self.qsl) - 1
        r0 = bisect.bisect_right(qsl, start) - 1  # the last request starting at or before `start`
        r1 = n_req if stop >= qsl[-1] else bisect.bisect_left(qsl, stop)
        if qsl[r0] != start or (stop < qsl[-1] and qsl[r1] != stop):
            raise IntegrationError(
                f"nano-batch rows {start}:{stop} cut a request (request starts {qsl}); the split must fall on request "
                "boundaries. Use the integration's strategy wrapper (RequestAligned) or nano_batches=1."
            )
        requests_, tokens = slice(r0, r1), slice(start, stop)
        memo: dict[int, Any] = {}

        def cut(layer: str, meta: Any) -> Any:
            if meta is None:
                return None
            if id(meta) not in memo:
                memo[id(meta)] = _metadata.for_nano_batch(meta, layer, nano, requests_, tokens)
            return memo[id(meta)]

        attn = self.ctx.attn_metadata
        if isinstance(attn, dict):
            new_attn: Any = {k: cut(k, m) for k, m in attn.items()}
        elif isinstance(attn, list):
            new_attn = [{k: cut(k, m) for k, m in d.items()} for d in attn]
        else:
            new_attn = cut("<all layers>", attn)
        slots = self.ctx.slot_mapping
        if isinstance(slots, dict):
            slots = {k: (v[tokens] if isinstance(v, torch.Tensor) else v) for k, v in slots.items()}
        elif isinstance(slots, list):
            slots = [{k: (v[tokens] if isinstance(v, torch.Tensor) else v) for k, v in d.items()} for d in slots]
        return dataclasses.replace(self.ctx, attn_metadata=new_attn, slot_mapping=slots, ubatch_slices=None)


def _first_metadata(attn: Any) -> Any:
    if isinstance(attn, list):
        attn = attn[0] if attn else None
    if isinstance(attn, dict):
        return next((m for m in attn.values() if m is not None), None)
    return attn
