"""Per-nano-batch host state: ``with dynaflow.nanocontext.nano_context(enter): model(x)``.

Serving engines run attention as an opaque op that reads *global per-step state*: vLLM looks its attention
metadata up by layer name in a module-global forward context, SGLang asks a global attention backend that
was prepared for the whole batch. When dynaflow runs that op on nano-batch ``i`` (rows ``[start, stop)``),
the op must see nano-batch ``i``'s state, not the whole batch's. This module is the generic hook for that:

* a host integration declares, for the calls made inside a ``with nano_context(enter):`` block, a callable
  ``enter(nano_index, (start, stop)) -> context manager`` that installs nano-batch ``nano_index``'s state;
* segments tagged with the ``nano-context`` hint (rules: ``Op(..., tags=("nano-context",))``) are the ops
  that read that state; every executor runs each *nano-batch* launch of such a segment inside
  ``enter(i, rows)``. Launches that run on the whole batch (barriers, or a program with one nano-batch:
  the fast path) run under the caller's whole-batch state, unchanged.

Thread safety: the host state is usually a process global (vLLM's ``_forward_context``), so two lanes
must never have their own nano-batch state installed at the same time. All ``nano-context`` launches
therefore take one process-wide re-entrant lock (``LAUNCH_LOCK``) for the duration of enter → op → exit.
Ops without the hint never take it and keep overlapping; on a GPU the locked region is a kernel launch,
not the kernel. Segments that read host state but are not tagged are not protected: tag them.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

from dynaflow.errors import BackendError, ConfigError
from dynaflow.ir import ALL, SplitConfig

__all__ = ["NANO_CONTEXT_HINT", "NanoContext", "nano_context", "current_nano_context", "launch_context", "LAUNCH_LOCK"]

NANO_CONTEXT_HINT = "nano-context"
"""The segment hint that asks executors to run nano-batch launches inside the active :class:`NanoContext`."""

LAUNCH_LOCK = threading.RLock()
"""Serialises every ``nano-context`` launch in the process (the state it swaps is global)."""

Enter = Callable[[int, tuple[int, int]], ContextManager[Any]]


@dataclass(frozen=True)
class NanoContext:
    """A per-step provider of nano-batch host state: ``enter(nano_index, (start, stop))`` → context manager."""

    enter: Enter
    name: str = "nano-context"

    def __repr__(self) -> str:
        return f"NanoContext({self.name!r})"


_CURRENT: contextvars.ContextVar[NanoContext | None] = contextvars.ContextVar("dynaflow_nano_context", default=None)


@contextlib.contextmanager
def nano_context(enter: Enter, name: str = "nano-context") -> Iterator[NanoContext]:
    """Install ``enter`` as the nano-batch state provider for the calls made inside the block.

    Executors read it on the calling thread when a step starts and hand it to every lane, so it works
    with the thread executor too.
    """
    if not callable(enter):
        raise ConfigError(
            f"nano_context(enter={enter!r}): enter must be a callable (nano_index, (start, stop)) -> context "
            "manager that installs that nano-batch's host state."
        )
    ctx = NanoContext(enter, name)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def current_nano_context() -> NanoContext | None:
    """The provider of the innermost active :func:`nano_context` block on this thread, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def launch_context(ctx: NanoContext | None, segment: Any, nano: int, split: SplitConfig) -> Iterator[None]:
    """What executors wrap around one launch: nothing unless ``segment`` carries the ``nano-context`` hint
    and a provider is active; then the launch lock, plus ``ctx.enter(nano, rows)`` for a nano-batch launch
    of a program with more than one nano-batch."""
    if ctx is None or NANO_CONTEXT_HINT not in segment.hints:
        yield
        return
    split = split.for_segment(segment)  # a per-resource re-split has its own row ranges
    with LAUNCH_LOCK:
        if nano == ALL or split.num == 1:
            yield  # whole batch: the caller's state is already the right one
            return
        rows = split.boundaries[nano]
        try:
            cm = ctx.enter(nano, rows)
            if not hasattr(cm, "__enter__") or not hasattr(cm, "__exit__"):
                raise TypeError(f"it returned {type(cm).__name__}, not a context manager")
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                f"{ctx!r} could not provide the state of nano-batch {nano} (rows {rows[0]}:{rows[1]} of "
                f"{split.batch_size}) for segment {segment.name!r}: {type(exc).__name__}: {exc}. The provider must "
                "return a context manager for every nano-batch of the split."
            ) from exc
        with cm:
            yield
