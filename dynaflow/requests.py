"""Per-step request layout: ``with dynaflow.requests(lengths, phases): model(x)``.

Serving engines know which rows of the batch belong to which request and whether a request is in prefill
or decode; dynaflow cannot see that from shapes. The engine states it for the step it is about to run and
the strategy's ``split_config`` receives it in :class:`~dynaflow.ir.InputInfo`, so nano-batches can be cut
on request boundaries (no request's KV written by one nano-batch and read by another).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Sequence

from dynaflow.errors import ConfigError
from dynaflow.ir import PHASES, as_ints

__all__ = ["RequestLayout", "requests", "current_requests"]


@dataclass(frozen=True)
class RequestLayout:
    """Rows per request along the batch dim, in batch order, and optionally each request's phase."""

    lengths: tuple[int, ...]
    phases: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        lengths = as_ints(self.lengths, "dynaflow.requests lengths", "rows per request, e.g. [5, 1, 1]")
        if any(n < 0 for n in lengths):  # zero rows pass here: a step with no rows is never split
            raise ConfigError(f"dynaflow.requests lengths {lengths}: each is a request's rows along the batch dim, "
                              "so none may be negative.")
        object.__setattr__(self, "lengths", lengths)
        if self.phases is not None:
            phases = (self.phases,) if isinstance(self.phases, str) else tuple(self.phases)
            bad = [p for p in phases if p not in PHASES]
            if bad or len(phases) != len(lengths):
                raise ConfigError(
                    f"dynaflow.requests phases {phases}: give one phase per request ({len(lengths)}), each one of "
                    f"{PHASES}" + (f"; {bad[0]!r} is not." if bad else ".")
                )
            object.__setattr__(self, "phases", phases)

    def __repr__(self) -> str:
        phases = f", phases={'/'.join(p[0] for p in self.phases)}" if self.phases else ""
        return f"RequestLayout({len(self.lengths)} requests, {sum(self.lengths)} rows{phases})"


_CURRENT: contextvars.ContextVar[RequestLayout | None] = contextvars.ContextVar("dynaflow_requests", default=None)


@contextlib.contextmanager
def requests(lengths: Sequence[int], phases: Sequence[str] | None = None) -> Iterator[RequestLayout]:
    """Declare the request layout of the batch for the calls made inside the ``with`` block.

    Example: three requests, a 5-token prefill then two 1-token decodes (batch dim of 7 rows)::

        with dynaflow.requests([5, 1, 1], ["prefill", "decode", "decode"]):
            logits = compiled(tokens)
    """
    layout = RequestLayout(lengths, phases)
    token = _CURRENT.set(layout)
    try:
        yield layout
    finally:
        _CURRENT.reset(token)


def current_requests() -> RequestLayout | None:
    """The layout declared by the innermost active :func:`requests` block, if any."""
    return _CURRENT.get()
