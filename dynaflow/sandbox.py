"""Runs that must leave no trace: timing a candidate, warming a compiled segment, checking a split.

dynaflow runs a step again on the caller's inputs to measure or prepare it. Such a run must not change what
the caller sees afterwards: the inputs the graph writes in place (a KV cache row, a step counter, a norm's
running statistics) are written only on private copies, and the global random number generators (dropout in
training draws from them) are put back as they were, so the caller's next call — and next draw — give what
eager would. A run repeated on the same copies (timing takes several) starts each time from the caller's
values (:meth:`Sandbox.reset`): a static KV cache's fill level advances with every step, and a copy stepped
ten times would index past the cache's end where the caller's one step does not.
"""

from __future__ import annotations

import contextlib
from typing import Any, Collection, Iterator, Sequence

import torch

__all__ = ["Sandbox", "private_writes", "rng_preserved", "sandboxed"]


def private_writes(inputs: Sequence[Any], written: Collection[int]) -> list[Any]:
    """``inputs`` with every input the graph writes in place replaced by a copy (the others shared)."""
    return [x.clone() if i in written and isinstance(x, torch.Tensor) else x for i, x in enumerate(inputs)]


class Sandbox:
    """The inputs of runs that leave no trace: ``inputs`` holds private copies of the ones the graph writes,
    which :meth:`reset` puts back to the caller's values in place (their addresses stay, so a CUDA graph captured
    on them replays on the reset values)."""

    def __init__(self, inputs: Sequence[Any], written: Collection[int]):
        self.inputs = private_writes(inputs, written)
        self._pairs = [(mine, theirs) for mine, theirs in zip(self.inputs, inputs)
                       if mine is not theirs and isinstance(mine, torch.Tensor)]

    def reset(self) -> None:
        """Every private copy holds the caller's values again: the next run starts where the caller's does."""
        with torch.no_grad():
            for mine, theirs in self._pairs:
                mine.copy_(theirs)

    def __repr__(self) -> str:
        return f"Sandbox({len(self._pairs)} private of {len(self.inputs)} inputs)"


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """The CPU generator and every initialized CUDA generator are where they were when the block ends."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def sandboxed(inputs: Sequence[Any], written: Collection[int]) -> Iterator[Sandbox]:
    """A :class:`Sandbox` for these inputs, with the generators preserved."""
    with rng_preserved():
        yield Sandbox(inputs, written)
