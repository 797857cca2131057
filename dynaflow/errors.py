"""The error hierarchy: every error dynaflow raises on bad input is a :class:`DynaflowError`.

Messages say what went wrong, where (node, segment, strategy or option, with shapes), and how to
fix it. :func:`node_context` appends a node's fx text and the user's source line.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

__all__ = [
    "DynaflowError",
    "ConfigError",
    "CaptureError",
    "PartitionError",
    "BatchCouplingError",
    "StrategyError",
    "ScheduleError",
    "BackendError",
    "node_context",
    "did_you_mean",
]


class DynaflowError(Exception):
    """Base of every error dynaflow raises on bad input or a broken invariant."""


class ConfigError(DynaflowError, ValueError):
    """An option has a bad value (nano_batches, batch_dim, executor, ...)."""


class CaptureError(DynaflowError):
    """The model could not be captured as an fx graph with a symbolic batch dimension."""


class PartitionError(DynaflowError):
    """A split rule is malformed or matches nothing."""


class BatchCouplingError(DynaflowError):
    """A segment mixes rows of the batch and ``strict=True`` forbids running it as a barrier."""


class StrategyError(DynaflowError):
    """A strategy could not be resolved, or returned an invalid split config or schedule."""


class ScheduleError(DynaflowError):
    """A schedule violates an invariant: missing/duplicated op, broken dependency, deadlock."""


class BackendError(DynaflowError):
    """The executor failed: a wait timed out, a lane raised, or the program is malformed."""


def node_context(node: Any) -> str:
    """Describe an fx node for an error message: its fx text and the user's source line."""
    try:
        text = node.format_node()
    except Exception:  # pragma: no cover - format_node is best effort
        text = str(node)
    trace = (getattr(node, "meta", {}) or {}).get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    where = ""
    # The last 'File ...' line of the trace is the user's line; the line after it is its text.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            where = lines[i] + (f"\n      {lines[i + 1]}" if i + 1 < len(lines) else "")
            break
    return f"    node: {text}" + (f"\n    at {where}" if where else "")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix for the nearest valid name, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""
