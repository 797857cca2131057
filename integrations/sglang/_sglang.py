"""Everything that imports SGLang (private: loaded on first use by ``dynaflow.integrations.sglang``).

The symbols used here are pinned by ``tests/integration/test_sglang.py`` (contract section).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx

import sglang
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_executor import forward_context as sgl_fc
from sglang.srt.model_executor.runner_backend_utils.tc_piecewise_cuda_graph import context_manager as sgl_tc

from dynaflow.api import CompiledGraph
from dynaflow.frontend.capture import SHARED_BACKEND, GraphEntry, mark_batch_dynamic, run_dynamo
from dynaflow.frontend.hook_watch import HookWatch, drop_captures, module_of
from dynaflow.frontend.rules import Where, default_rules, op_name
from dynaflow.integrations._common import (HOST_STATE_META, IntegrationError, make_strategy, matching_rules,
                                           thread_mutations)
from dynaflow.integrations.sglang._settings import HOST_OP_PATTERNS, SUPPORTED, options
from dynaflow.nanocontext import nano_context
from dynaflow.requests import requests
from dynaflow.strategies import get as get_strategy

log = logging.getLogger("dynaflow.integrations.sglang")

PATCH_MODEL = "sglang.srt.compilation.torch_compile_decoration.patch_model"
INSTALL_COMPILED = "sglang.srt.compilation.compile.install_torch_compiled"

TOKEN_FIELDS = ("input_ids", "positions", "out_cache_loc", "out_cache_loc_virtual")
"""ForwardBatch fields indexed by token: sliced by the nano-batch's token range."""
REQUEST_FIELDS = ("req_pool_indices", "seq_lens", "seq_lens_cpu", "extend_seq_lens", "extend_prefix_lens",
                  "extend_prefix_lens_cpu", "extend_seq_lens_cpu", "extend_logprob_start_lens_cpu", "lora_ids",
                  "rids", "orig_seq_lens")
"""ForwardBatch fields indexed by request: sliced by the nano-batch's request range."""


def check_version() -> None:
    """Raise :class:`IntegrationError` unless the installed SGLang is in :data:`SUPPORTED`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if Version(sglang.__version__) not in SpecifierSet(SUPPORTED):
        raise IntegrationError(
            f"dynaflow's SGLang integration supports sglang{SUPPORTED}; found sglang {sglang.__version__}. Install "
            "a supported version, or run the contract tests (pytest -m integration) against it and widen SUPPORTED."
        )


# -- hooks ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _patch_model_hook(original: Callable[..., Any], model: torch.nn.Module, enable_compile: bool, *args: Any,
                      **kwargs: Any):
    """AROUND ``patch_model``: keep SGLang's side effects (custom ops to torch-native, comm backup), but
    yield dynaflow's compiled forward instead of Inductor's."""
    with original(model, enable_compile, *args, **kwargs) as forward:
        if not enable_compile:
            yield forward
            return
        yield SglangStep(torch.no_grad()(model.forward), options(), model=model)


def _install_compiled_hook(original: Callable[..., Any], module: torch.nn.Module, *args: Any, **kwargs: Any):
    """AROUND ``install_torch_compiled``: dynaflow's backend when the caller chose no backend_factory."""
    if kwargs.get("backend_factory") is None:
        kwargs["backend_factory"] = backend
    return original(module, *args, **kwargs)


_REGISTERED = False


def register_hooks(apply: bool) -> None:
    global _REGISTERED
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not _REGISTERED:
        HookRegistry.register(PATCH_MODEL, _patch_model_hook, HookType.AROUND)
        HookRegistry.register(INSTALL_COMPILED, _install_compiled_hook, HookType.AROUND)
        _REGISTERED = True
    if apply:
        HookRegistry.apply_hooks()


# -- planning -------------------------------------------------------------------------------------------
def is_host_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and any(re.search(p, op_name(node)) for p in HOST_OP_PATTERNS)


def _reads_host_state(node: torch.fx.Node) -> bool:
    return bool(node.meta.get(HOST_STATE_META))


ATTENTION_RULE = Where(_reads_host_state, name="attention", tags=("memory", "nano-context", "batch-local"))


def make_graph(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: Mapping[str, Any],
               label: str = "sglang") -> CompiledGraph:
    """Plan one Dynamo graph of an SGLang model. A graph whose batch dim is static (a fragment between graph
    breaks that holds no token-indexed tensor) runs as one nano-batch."""
    thread_mutations(gm, is_host_op)
    cfg, strategy = make_strategy(opts)
    base = cfg.rules if cfg.rules is not None else (strategy.rules() or default_rules())
    cfg = cfg.replace(rules=matching_rules(gm, [ATTENTION_RULE, *base]))
    graph = CompiledGraph(gm, cfg, strategy, label=label).prepare()
    if graph.segmented is not None and graph.segmented.batch_symbol is None:
        graph.strategy = get_strategy("sequential", nano_batches=1)
    return graph


def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> CompiledGraph:
    """The ``backend_factory`` the ``install_torch_compiled`` hook injects: plans one graph with the active
    options (the package's public ``backend`` calls this)."""
    return make_graph(gm, example_inputs, options())


def capturing() -> bool:
    """Is a CUDA graph being captured on this stream (SGLang's decode/prefill CUDA-graph runners)? Then the
    step runs as one nano-batch: the captured kernels would replay whatever per-nano-batch metadata existed at
    capture, while SGLang refreshes only its own buffers before each replay."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class SglangStep:
    """A dynaflow-compiled SGLang forward: every call reads the ``ForwardBatch`` argument for the request
    layout and installs per-nano-batch forward contexts; each Dynamo graph (graph breaks) is planned apart.
    ``model``: the module ``fn`` runs when ``fn`` is neither that module nor its bound method (a wrapped forward):
    its hooks are then watched per call instead of guarded by Dynamo per module, as for a compiled module."""

    def __init__(self, fn: Callable[..., Any], opts: Mapping[str, Any], model: torch.nn.Module | None = None):
        self.fn = fn
        self.opts = dict(opts)
        self.graphs: list[CompiledGraph] = []
        self._by_entry: dict[GraphEntry, CompiledGraph] = {}
        self._batch = 0
        self._compiled = torch.compile(fn, backend=SHARED_BACKEND, dynamic=None)
        self.model = model if model is not None else module_of(fn)
        self.hook_watch = HookWatch([self.model]) if self.model is not None else None
        """Read by the frontend's hook guards too: an owner with a watch gets no Dynamo guards on hook dicts."""

    def graph_for(self, entry: GraphEntry, inputs: Sequence[Any] = ()) -> CompiledGraph:
        """This step's CompiledGraph for a graph Dynamo captured (the frontend's shared Dynamo hook asks the
        owner whose call is in flight, with the graph's inputs); planned on first use from a private copy of the
        capture."""
        graph = self._by_entry.get(entry)
        if graph is None:
            graph = make_graph(entry.copy_gm(), [], self.opts, label=f"sglang{len(self.graphs)}")
            graph.batch_hint = lambda: self._batch
            self._by_entry[entry] = graph
            self.graphs.append(graph)
        return graph

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fb = next((a for a in (*args, *kwargs.values()) if isinstance(a, ForwardBatch)), None)
        if fb is None:
            raise IntegrationError(
                f"dynaflow.integrations.sglang.compile: no ForwardBatch among the arguments of {self.fn!r}; it compiles "
                "SGLang forwards fn(input_ids, positions, forward_batch, ...)."
            )
        state = StepState.from_batch(fb)
        self._batch = state.num_tokens
        tokens = (fb.input_ids, getattr(fb, "positions", None))  # token-indexed, whether passed or not
        mark_batch_dynamic((*tokens, *args), kwargs, 0)
        if self.hook_watch is not None and self.hook_watch.moved():
            self._check_hooks()
        owner = self.model if self.model is not None else self.fn
        if capturing():  # SGLang's CUDA-graph runner: nano-batch metadata built now would replay stale
            with requests([state.num_tokens]):
                return run_dynamo(self, self._compiled, args, kwargs, owner, 0, state.num_tokens)
        with requests(state.lengths, state.phases), nano_context(state.enter, name="sglang forward batch"):
            return run_dynamo(self, self._compiled, args, kwargs, owner, 0, state.num_tokens)

    def _check_hooks(self) -> None:
        """A hook of the model was added or removed since the captures: capture again (SGLang steps one batch
        at a time, so no lock)."""
        if self.hook_watch.changed() and self._by_entry:  # type: ignore[union-attr]
            drop_captures(f"{self!r}: module hooks changed since the capture")
            self.graphs.clear()
            self._by_entry.clear()

    def explain(self) -> str:
        return "\n\n".join(g.explain() for g in self.graphs) or "(not captured yet)"

    def __repr__(self) -> str:
        return f"SglangStep({getattr(self.fn, '__qualname__', self.fn)!r}, graphs={len(self.graphs)})"


@dataclasses.dataclass
class StepState:
    """One step's ForwardBatch and request layout; builds (and caches) nano-batch forward contexts."""

    batch: Any
    starts: list[int]
    lengths: tuple[int, ...]
    phases: tuple[str, ...]
    num_tokens: int
    cache: dict[tuple[int, int], Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_batch(cls, fb: Any) -> "StepState":
        num_tokens = int(fb.input_ids.shape[0])
        if fb.forward_mode.is_decode():
            lengths = [1] * int(fb.batch_size)
            phases = ["decode"] * len(lengths)
        else:
            lengths = [int(n) for n in (fb.extend_seq_lens_cpu if fb.extend_seq_lens_cpu is not None
                                        else fb.extend_seq_lens.tolist())]
            prefix = fb.extend_prefix_lens_cpu or [0] * len(lengths)
            phases = ["decode" if n == 1 and p > 0 else "prefill" for n, p in zip(lengths, prefix)]
        if sum(lengths) > num_tokens or not lengths:
            raise IntegrationError(
                f"ForwardBatch declares {sum(lengths)} tokens over {len(lengths)} requests but input_ids has "
                f"{num_tokens} rows; dynaflow cannot map nano-batches to requests."
            )
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        lengths[-1] += num_tokens - sum(lengths)  # padding rides with the last request
        return cls(fb, starts, tuple(lengths), tuple(phases), num_tokens)

    def enter(self, nano: int, rows: tuple[int, int]) -> Any:
        ctx = self.cache.get(rows)
        if ctx is None:
            ctx = self.cache[rows] = self._context(*rows)
        return _entered(*ctx)

    def _context(self, start: int, stop: int) -> Any:
        starts = self.starts
        if start not in starts or (stop < starts[-1] and stop not in starts):
            raise IntegrationError(
                f"nano-batch rows {start}:{stop} cut a request (request starts {starts}); the split must fall on "
                "request boundaries. Use the integration's strategy wrapper (RequestAligned) or nano_batches=1."
            )
        r0, r1 = starts.index(start), (starts.index(stop) if stop < starts[-1] else len(starts) - 1)
        child = split_forward_batch(self.batch, slice(r0, r1), slice(start, stop))
        parent = sgl_fc.get_forward_context()
        backend = copy.copy(parent.attn_backend)  # shares pools and caches, gets its own forward_metadata
        backend.init_forward_metadata(child)
        piecewise = sgl_tc.get_tc_piecewise_forward_context()  # the piecewise attention op reads this one
        if piecewise is not None:
            real = child.global_num_token_non_padded_cpu
            piecewise = dataclasses.replace(piecewise, forward_batch=child, num_tokens=stop - start,
                                            raw_num_tokens=real if real is not None else stop - start)
        return dataclasses.replace(parent, attn_backend=backend), piecewise


@contextlib.contextmanager
def _entered(ctx: Any, piecewise: Any) -> Iterator[None]:
    """Install one nano-batch's contexts: SGLang's forward context (its attention backend) and, when the step
    runs under one, the piecewise forward context that ``sglang.unified_attention_with_output`` reads. Both are
    module globals; the executor serializes nano-context launches, so save/restore is safe on any lane."""
    with sgl_fc.forward_context(ctx):
        if piecewise is None:
            yield
            return
        saved = sgl_tc._tc_piecewise_forward_context
        sgl_tc._tc_piecewise_forward_context = piecewise
        try:
            yield
        finally:
            sgl_tc._tc_piecewise_forward_context = saved


def split_forward_batch(fb: Any, reqs: slice, tokens: slice) -> Any:
    """A shallow copy of ``fb`` holding only requests ``reqs`` (tokens ``tokens``): token- and request-indexed
    fields sliced, counts and ``extend_start_loc`` recomputed, everything else shared with ``fb``."""
    child = copy.copy(fb)
    for name in TOKEN_FIELDS:
        v = getattr(fb, name, None)
        if v is not None:
            setattr(child, name, v[tokens])
    for name in REQUEST_FIELDS:
        v = getattr(fb, name, None)
        if v is not None and not isinstance(v, (int, float)):
            setattr(child, name, v[reqs])
    child.batch_size = reqs.stop - reqs.start
    if getattr(child, "seq_lens_cpu", None) is not None:
        child.seq_lens_sum = int(child.seq_lens_cpu.sum())
    elif getattr(child, "seq_lens", None) is not None:
        child.seq_lens_sum = int(child.seq_lens.sum())
    real = getattr(fb, "global_num_token_non_padded_cpu", None)
    if isinstance(real, int):  # host count of real (unpadded) tokens: the part of the real ones in this slice
        child.global_num_token_non_padded_cpu = max(0, min(tokens.stop, real) - tokens.start)
    if getattr(child, "extend_seq_lens", None) is not None:
        lens = child.extend_seq_lens
        child.extend_start_loc = torch.cumsum(lens, 0) - lens
        child.extend_num_tokens = int(tokens.stop - tokens.start)
    return child
