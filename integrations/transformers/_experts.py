"""transformers' MoE experts as one row-wise op, so a split MoE layer is not a barrier.

transformers 5 runs a MoE layer's experts through ``ExpertsInterface``; its default ``grouped_mm`` sorts the
(token, expert) pairs by expert, gathers the tokens, runs one grouped GEMM and scatters the rows back. Every
token's output depends only on its own hidden state, expert ids and routing weights, but the sort crosses
rows, so the batch analysis (rightly, op by op) reads it as coupling: one join per MoE layer.

While the hook is enabled, each experts module's forward runs its configured implementation inside the
custom op ``dynaflow_hf::experts`` with a batch rule that says what the implementation guarantees: each row
of ``hidden_states``, ``top_k_index`` and ``top_k_weights`` is treated on its own (the vLLM integration
declares its fused-MoE kernel the same way). Only implementations whose code was read for this are wrapped
(:data:`ROW_WISE`); any other, and every call with autograd on, runs the module's own forward. The op
computes from the weights it is passed (a shallow twin of the module holds them), so the split check's
clones and a deep copy of the model compute with their own weights.
"""

from __future__ import annotations

import copy
import itertools
import types
import weakref
from typing import Any

import torch

from dynaflow.errors import BackendError
from dynaflow.frontend.aten_rules import register_batch_rule, rows

__all__ = ["ROW_WISE", "OP_NAME", "is_experts", "wrap", "unwrap"]

ROW_WISE = frozenset({"grouped_mm", "batched_mm"})
"""``config._experts_implementation`` values that compute each token's output from its own row alone
(read in ``transformers.integrations.moe`` of 5.17 and 5.24: sort or repeat by expert, grouped or batched GEMMs, weighted
sum over the token's top-k, scatter back). Both have no host sync, so they run under CUDA graph capture."""

OP_NAME = "dynaflow_hf::experts"

_MODULES: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


@torch.library.custom_op(OP_NAME, mutates_args=())
def _experts(handle: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
             params: list[torch.Tensor]) -> torch.Tensor:
    module = _MODULES.get(handle)
    if module is None:
        raise BackendError(f"{OP_NAME}: experts module #{handle} is gone (the model was freed while a compiled "
                           "step still refers to it). Re-enable dynaflow on the model.")
    out = type(module).forward(_with_tensors(module, params), hidden_states, top_k_index, top_k_weights)
    if out.shape != hidden_states.shape or out.dtype != hidden_states.dtype:
        raise BackendError(
            f"{OP_NAME}: {type(module).__name__} returned {tuple(out.shape)} {out.dtype} for hidden_states "
            f"{tuple(hidden_states.shape)} {hidden_states.dtype}; dynaflow's wrapper expects the same shape and "
            "dtype. Disable dynaflow's experts op with enable(..., row_wise_experts=False) and please report it."
        )
    return out.clone() if _aliases(out, hidden_states) else out


def _with_tensors(module: torch.nn.Module, tensors: list[torch.Tensor]) -> torch.nn.Module:
    """A shallow twin of ``module`` holding ``tensors`` as its own parameters and buffers: the op computes from
    the tensors it is given (the caller's weights, the split check's clones, a deep copy's), never from shared state,
    and mutates nothing another thread could see. When they are the module's own, the module itself serves."""
    names = _tensor_names(module)
    if len(names) != len(tensors):
        raise BackendError(f"{OP_NAME}: {type(module).__name__} holds {len(names)} tensors but the call passed "
                           f"{len(tensors)}; re-enable dynaflow on the model.")
    if all(getattr(module, kind)[name] is t for (kind, name), t in zip(names, tensors)):
        return module  # the module's own tensors (every call but the split check's): no twin needed
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    for (kind, name), t in zip(names, tensors):
        getattr(twin, kind)[name] = t
    return twin


@_experts.register_fake
def _(handle: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
      params: list[torch.Tensor]) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape)


register_batch_rule(OP_NAME, rows(hidden_states=0, top_k_index=0, top_k_weights=0))


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def is_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module dispatched by ``use_experts_implementation`` (its
    decorator wraps the forward and sets ``has_gate`` in every 5.x read: 5.17 and 5.24)."""
    forward = type(module).forward
    return (hasattr(forward, "__wrapped__") and hasattr(module, "has_gate")
            and hasattr(getattr(module, "config", None), "_experts_implementation"))


def _tensor_names(module: torch.nn.Module) -> list[tuple[str, str]]:
    return ([("_parameters", n) for n, t in module._parameters.items() if t is not None]
            + [("_buffers", n) for n, t in module._buffers.items() if t is not None])


def _tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's own parameters and buffers (not its submodules'), in :func:`_tensor_names` order."""
    return [getattr(module, kind)[name] for kind, name in _tensor_names(module)]


def _row_wise_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The experts module's forward while wrapped (bound to the module, so a copy of the module calls its own)."""
    own = self._dynaflow_own_forward
    if (args or kwargs or torch.is_grad_enabled()
            or self.config._experts_implementation not in ROW_WISE or hidden_states.dim() != 2):
        return own(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    return torch.ops.dynaflow_hf.experts(self._dynaflow_handle, hidden_states, top_k_index, top_k_weights,
                                         _tensors_of(self))


def wrap(model: torch.nn.Module) -> int:
    """Route each experts module of ``model`` through the row-wise op (see the module docstring); returns how
    many were switched over. Idempotent; a copy of a wrapped module gets a registration of its own."""
    n = 0
    for module in model.modules():
        if not is_experts(module):
            continue
        if "_dynaflow_own_forward" in module.__dict__ and _MODULES.get(module._dynaflow_handle) is module:
            continue
        handle = next(_HANDLES)
        _MODULES[handle] = module
        module.__dict__["_dynaflow_handle"] = handle
        module.__dict__["_dynaflow_own_forward"] = type(module).forward.__get__(module)
        module.__dict__["forward"] = types.MethodType(_row_wise_forward, module)
        n += 1
    return n


def unwrap(model: torch.nn.Module) -> None:
    """Undo :func:`wrap`."""
    for module in model.modules():
        if "_dynaflow_own_forward" in module.__dict__:
            for key in ("forward", "_dynaflow_own_forward", "_dynaflow_handle"):
                module.__dict__.pop(key, None)
