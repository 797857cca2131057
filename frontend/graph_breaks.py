"""Graph breaks: the reasons Dynamo gave for cutting a model into several graphs, for ``explain()``.

Each graph Dynamo hands over is planned on its own (split where its batch is symbolic, whole where it is
not); a user who sees more graphs than expected needs the reason, which Dynamo records in its global
counters (``graph_break``, and ``unimplemented`` for data-dependent control flow). :func:`recording`
collects the reasons that appear while a model is being captured.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["recording", "snapshot", "record_since"]

_KINDS = ("graph_break", "unimplemented")


_LAST: list[object] = [None, -1, {}]
"""(Dynamo's frame counter object, its total, the snapshot then): the reasons are counted only while Dynamo
converts a frame, which first bumps ``counters["frames"]["total"]``, so an unchanged total (of the same counter
object: ``torch._dynamo.reset()`` replaces it) means an unchanged snapshot. A process whose models broke graphs
anywhere would otherwise rebuild a dict of every reason on every call."""


_COUNTERS: list[object] = []
"""Dynamo's ``counters`` mapping, imported on first use (it is cleared on ``torch._dynamo.reset()``, never replaced)."""


def _snapshot() -> dict[tuple[str, str], int]:
    if not _COUNTERS:
        from torch._dynamo.utils import counters

        _COUNTERS.append(counters)
    counters: Any = _COUNTERS[0]
    frames = counters["frames"]
    total = frames.get("total", 0)
    if _LAST[0] is frames and _LAST[1] == total:
        return _LAST[2]  # type: ignore[return-value]
    if not (counters["graph_break"] or counters["unimplemented"]):  # nothing ever broke a graph
        snap: dict[tuple[str, str], int] = {}
    else:
        snap = {(kind, reason): n for kind in _KINDS for reason, n in counters[kind].items()}
    _LAST[:] = [frames, total, snap]
    return snap


def snapshot() -> dict[tuple[str, str], int]:
    """Dynamo's graph-break counts now (for :func:`record_since`); empty while nothing ever broke a graph."""
    return _snapshot()


def record_since(before: dict[tuple[str, str], int], into: list[str]) -> None:
    """Append to ``into`` the first line of every graph-break reason Dynamo counted since ``before``."""
    now = _snapshot()
    if now is before:  # no frame converted since: the same snapshot object
        return
    for key, n in now.items():
        if n > before.get(key, 0):
            line = _summary(key[1])
            if line not in into:
                into.append(line)


@contextlib.contextmanager
def recording(into: list[str]) -> Iterator[None]:
    """Append to ``into`` the first line of every graph-break reason Dynamo counts inside the block."""
    before = _snapshot()
    try:
        yield
    finally:
        record_since(before, into)


def _summary(reason: str) -> str:
    """The headline of a Dynamo graph-break reason, with its debug context (the op or call it stopped at)."""
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    if not lines:
        return reason
    context = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Developer debug context:")), "")
    return f"{lines[0]} ({context})" if context and context not in lines[0] else lines[0]
