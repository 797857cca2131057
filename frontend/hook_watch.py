"""Module hooks added or removed after a capture, noticed for a fraction of what Dynamo's guards on them cost.

Dynamo skips guards on module hook dicts by default, so a cached graph ignores a forward hook added after the
first call (a different answer, no error). Turning those guards on is correct but costs every call a check of
each hook dict of each module: on a CPU, 7 µs of a 2-layer Llama's graphed decode step and 84 µs of a 32-layer
one (``benchmarks/results/call_overhead_cpu_hookwatch_*.json``). A :class:`HookWatch` gets the same answer per call for a
counter compare: every hook registration creates a ``RemovableHandle``, whose class counter moves, and a removal
shrinks a dict that was not empty. Only when one of those moved are the watched modules' hook dicts compared
with the snapshot; a real change drops Dynamo's compiled code for dynaflow's captures (:func:`drop_captures`),
so the call captures the model again, with its hooks as they now are.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch.nn.modules import module as nn_module
from torch.utils.hooks import RemovableHandle

__all__ = ["HookWatch", "drop_captures", "module_of"]

log = logging.getLogger(__name__)

_GLOBAL_DICTS = tuple(name for name in ("_global_forward_pre_hooks", "_global_forward_hooks",
                                        "_global_forward_hooks_always_called", "_global_forward_hooks_with_kwargs",
                                        "_global_backward_pre_hooks", "_global_backward_hooks")
                      if isinstance(getattr(nn_module, name, None), dict))
"""torch.nn's process-wide hooks (``register_module_forward_hook`` ...), which run around every module call."""


def _hook_dicts(mod: torch.nn.Module) -> Iterable[tuple[str, dict[Any, Any]]]:
    """The forward and backward hook dicts of one module (``_forward_hooks``, ``_forward_pre_hooks_with_kwargs``,
    ``_backward_hooks``, ...): what a module call runs besides ``forward``."""
    for name, value in vars(mod).items():
        if name.endswith("hooks") and name.startswith(("_forward", "_backward")) and isinstance(value, dict):
            yield name, value


def module_of(fn: Any) -> torch.nn.Module | None:
    """The module a compiled callable runs, when that is known: the module itself or a bound method of one. A
    plain function may call any module, so it has none (its compiles keep Dynamo's hook guards)."""
    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


class HookWatch:
    """Whether any hook of ``modules`` (and their submodules) or any global module hook changed since the
    snapshot; see the module docstring."""

    def __init__(self, roots: Iterable[torch.nn.Module]):
        self.roots = tuple(roots)
        self._snapshot()

    def _snapshot(self) -> None:
        self._next_id = RemovableHandle.next_id
        self.modules = tuple(dict.fromkeys(m for root in self.roots for m in root.modules()))  # a submodule added since
        owners = [(nn_module, name, getattr(nn_module, name)) for name in _GLOBAL_DICTS]
        owners += [(m, name, d) for m in self.modules for name, d in _hook_dicts(m)]
        self._filled = tuple((owner, name, d, len(d)) for owner, name, d in owners if d)
        """(owner, attribute, dict, length) of each hook dict that is not empty: a removal shrinks one of them."""
        self._state = tuple((owner, name, tuple(d)) for owner, name, d, _ in self._filled)
        """The hooks themselves (their handle ids), what :meth:`changed` compares."""

    def moved(self) -> bool:
        """Whether the hooks may have changed since the snapshot: the call-time check, a counter compare plus a
        length check per hook dict that was not empty."""
        return not (RemovableHandle.next_id == self._next_id and all(
            len(d) == n and getattr(owner, name) is d for owner, name, d, n in self._filled))

    def changed(self) -> bool:
        """Whether the hooks differ from the snapshot, which then moves to them (a handle made elsewhere, a
        tensor hook or another model's, moves the counter without a change here). Callers serialise it."""
        if not self.moved():
            return False
        before = self._state
        self._snapshot()
        return self._state != before


def drop_captures(why: str) -> None:
    """Drop Dynamo's compiled code that calls dynaflow's capture backend, so the next call of those frames
    captures again. Dynamo keys its cache by code object: a frame's entries of other ``torch.compile`` users go
    too (they compile again once). Where this torch lacks the cache-entry API, all of Dynamo's caches are reset."""
    from dynaflow.frontend.capture import SHARED_BACKEND

    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code
        from torch._dynamo import convert_frame

        with convert_frame.compile_lock:
            dropped = 0
            for ref in list(convert_frame.input_codes.seen):
                code = ref()
                if code is not None and any(getattr(e.backend, "compiler_fn", e.backend) is SHARED_BACKEND
                                            for e in _debug_get_cache_entry_list(code)):
                    reset_code(code)
                    dropped += 1
    except (ImportError, AttributeError, TypeError) as exc:  # another torch's internals: the whole cache
        reason = f"this torch has no per-frame cache API: {exc}"
    else:
        if dropped:
            log.info("%s: dropped Dynamo's compiled code of %d frame(s); the next call captures again", why, dropped)
            return
        reason = "no compiled frame names dynaflow's backend"  # never keep a capture that may hold the old hooks
    log.warning("%s: torch._dynamo.reset() (%s); every compiled model in this process compiles again once", why,
                reason)
    torch._dynamo.reset()
