"""The engine's module-global forward context, the way ``vllm.forward_context`` works.

The engine installs one :class:`ForwardContext` around each model step; the opaque attention ops look it up
with :func:`get_forward_context` instead of taking the metadata as arguments, so Dynamo and dynaflow never
see the metadata. That is the situation dynaflow's ``nano_context`` hook exists for: when attention runs on
one nano-batch, the global must be swapped to that nano-batch's metadata (:func:`set_forward_context`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class AttnMetadata:
    """What the attention ops read, all device tensors of fixed shape (capture-safe):
    ``query_start_loc`` ``[max_reqs + 1]`` (padded with its last real value), ``seq_lens`` ``[max_reqs]``
    (tokens in the cache after the step; padded with 0), ``block_table`` ``[max_reqs, max_blocks]`` and
    ``slot_mapping`` ``[num_tokens]`` (the cache slot each token's K/V goes to)."""

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    """One step's state. ``query_lens``/``phases`` are host-side (the scheduler's), so the dynaflow step can
    declare the request layout without reading device memory; ``builders[i]`` builds nano-batch ``i``'s
    metadata."""

    meta: AttnMetadata
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    block_size: int
    query_lens: tuple[int, ...]
    phases: tuple[str, ...]
    builders: Sequence[Any] = ()


_FORWARD_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _FORWARD_CONTEXT is None:
        raise RuntimeError("toy engine: attention ran outside set_forward_context(...)")
    return _FORWARD_CONTEXT


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Install ``ctx`` as the global forward context for the block (restores the previous one)."""
    global _FORWARD_CONTEXT
    prev, _FORWARD_CONTEXT = _FORWARD_CONTEXT, ctx
    try:
        yield ctx
    finally:
        _FORWARD_CONTEXT = prev
