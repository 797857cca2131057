"""Persistent metadata buffers and the per-nano-batch metadata builder.

The engine owns one :class:`MetadataBuffers` for the step, filled from the scheduler's host lists before each
step (so a CUDA graph that captured views of them reads the new step on replay). Like vLLM's model runner,
which keeps one attention-metadata builder per micro-batch, the engine keeps one :class:`NanoBatchBuilder`
per nano-batch index, each with buffers of its own: nano-batch ``i``'s metadata never shares memory with
nano-batch ``j``'s, so their attention launches may be in flight together.

:meth:`NanoBatchBuilder.build` cuts the step's metadata to token rows ``[start, stop)`` with device ops only
(no host read of device data, fixed shapes): inside a CUDA graph capture (dynaflow's ``cuda_graphs=True``,
or the engine's own decode graph) the cut is captured too, so every replay re-cuts the refreshed step
buffers instead of replaying the capture step's nano-batch metadata.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .context import AttnMetadata


class MetadataBuffers:
    """Preallocated ``query_start_loc``/``seq_lens``/``block_table``/``slot_mapping`` (int64)."""

    def __init__(self, max_reqs: int, max_blocks: int, max_tokens: int, device: torch.device):
        self.max_reqs = max_reqs
        self.query_start_loc = torch.zeros(max_reqs + 1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_reqs, dtype=torch.long, device=device)
        self.block_table = torch.zeros(max_reqs, max_blocks, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(max_tokens, dtype=torch.long, device=device)

    def fill(self, query_lens: Sequence[int], seq_lens: Sequence[int], blocks: Sequence[Sequence[int]],
             slot_mapping: Sequence[int]) -> AttnMetadata:
        """Copy one step's host lists in (padded to the fixed shapes) and return views of the buffers."""
        n, t = len(query_lens), len(slot_mapping)
        if n > self.max_reqs or t > self.slot_mapping.shape[0]:
            raise ValueError(f"step of {n} requests / {t} tokens exceeds the buffers")
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        qsl += [qsl[-1]] * (self.max_reqs - n)
        table = torch.zeros(self.block_table.shape, dtype=torch.long)
        for r, bl in enumerate(blocks):
            table[r, :len(bl)] = torch.tensor(bl, dtype=torch.long)
        self.query_start_loc.copy_(torch.tensor(qsl))
        self.seq_lens.copy_(torch.tensor(list(seq_lens) + [0] * (self.max_reqs - n)))
        self.block_table.copy_(table)
        self.slot_mapping[:t].copy_(torch.tensor(slot_mapping, dtype=torch.long))
        return self.view(t)

    def view(self, num_tokens: int) -> AttnMetadata:
        return AttnMetadata(self.query_start_loc, self.seq_lens, self.block_table, self.slot_mapping[:num_tokens])


class NanoBatchBuilder:
    """Builds one nano-batch index's metadata into buffers of its own (one builder per nano-batch index)."""

    def __init__(self, index: int, buffers: MetadataBuffers):
        self.index = index
        self.buffers = buffers
        self.builds = 0

    def build(self, step: AttnMetadata, rows: tuple[int, int]) -> AttnMetadata:
        """The metadata of the requests whose tokens are rows ``[start, stop)`` of the step (the cut must fall
        on request boundaries: dynaflow's ``RequestAligned`` strategy makes it so)."""
        start, stop = rows
        buf, qsl = self.buffers, step.query_start_loc
        max_reqs = buf.max_reqs
        r0 = (qsl < start).sum()  # first request of the nano-batch (qsl[r0] == start)
        r1 = (qsl < stop).sum()  # one past its last request
        i = torch.arange(max_reqs + 1, device=qsl.device)
        buf.query_start_loc.copy_(qsl[torch.minimum(i + r0, r1)] - start)
        live = i[:-1] < r1 - r0
        rid = torch.clamp(i[:-1] + r0, max=max_reqs - 1)
        buf.seq_lens.copy_(torch.where(live, step.seq_lens[rid], 0))
        buf.block_table.copy_(step.block_table[rid])
        buf.slot_mapping[:stop - start].copy_(step.slot_mapping[start:stop])
        self.builds += 1
        return buf.view(stop - start)
