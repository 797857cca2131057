"""Runs that must leave no trace: timing a candidate, warming a compiled segment, checking a split.

dynaflow runs a step again on the caller's inputs to measure or prepare it. Such a run must not change what
the caller sees afterwards: the inputs the graph writes in place (a KV cache row, a step counter, a norm's
running statistics) are written only on private copies, and the global random number generators (dropout in
training draws from them) are put back as they were, so the caller's next call — and next draw — give what
eager would.
"""

from __future__ import annotations

import contextlib
from typing import Any, Collection, Iterator, Sequence

import torch

__all__ = ["private_writes", "rng_preserved", "sandboxed"]


def private_writes(inputs: Sequence[Any], written: Collection[int]) -> list[Any]:
    """``inputs`` with every input the graph writes in place replaced by a copy (the others shared)."""
    return [x.clone() if i in written and isinstance(x, torch.Tensor) else x for i, x in enumerate(inputs)]


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
def sandboxed(inputs: Sequence[Any], written: Collection[int]) -> Iterator[list[Any]]:
    """Inputs for a run that leaves no trace (:func:`private_writes`), with the generators preserved."""
    with rng_preserved():
        yield private_writes(inputs, written)
