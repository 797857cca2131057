"""The toy engine's step loop: schedule, fill the persistent buffers, install the forward context, run the
model step, sample greedily.

``forward`` is what runs the model step: the eager model, or a ``torch.compile``d one (the dynaflow backend of
:mod:`toy_engine.dynaflow_step`). With ``decode_cuda_graph=True`` (CUDA only) decode-only steps are captured
in an **outer CUDA graph** per token count, as vLLM and SGLang capture decode: the first decode step of a
size runs eagerly (the warm-up), is then captured, and later steps of that size replay the graph after the
persistent input and metadata buffers were refilled. Whatever the step does inside must therefore be
capture-safe: no host read of device data, no allocation outside the graph's pool, per-nano-batch metadata
in the builders' persistent buffers, recomputed on the device on replay.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .context import ForwardContext, set_forward_context
from .metadata import MetadataBuffers, NanoBatchBuilder
from .model import ToyLlama
from .scheduler import Request, ScheduledStep, Scheduler


class ToyEngine:
    def __init__(self, model: ToyLlama, *, forward: Callable[..., torch.Tensor] | None = None, block_size: int = 4,
                 num_blocks: int = 64, token_budget: int = 16, max_reqs: int = 8, max_blocks: int = 8,
                 nano_builders: int = 4, decode_cuda_graph: bool = False):
        p = next(model.parameters())
        self.model, self.device = model, p.device
        self.forward = forward or model
        if decode_cuda_graph and self.device.type != "cuda":
            raise ValueError("decode_cuda_graph needs the model on a CUDA device")
        self.decode_cuda_graph = decode_cuda_graph
        self.block_size = block_size
        self.sched = Scheduler(block_size, num_blocks, token_budget, max_reqs, max_blocks)
        self.kv_caches = [tuple(torch.zeros(num_blocks * block_size, model.num_kv_heads, model.head_dim,
                                            dtype=p.dtype, device=p.device) for _ in range(2))
                          for _ in model.layers]
        self.buffers = MetadataBuffers(max_reqs, max_blocks, token_budget, p.device)
        self.builders = [NanoBatchBuilder(i, MetadataBuffers(max_reqs, max_blocks, token_budget, p.device))
                         for i in range(nano_builders)]
        self.input_ids = torch.zeros(token_budget, dtype=torch.long, device=p.device)
        self.positions = torch.zeros(token_budget, dtype=torch.long, device=p.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.steps: list[ScheduledStep] = []
        self.replays = 0

    def generate(self, prompts: Sequence[Sequence[int]], max_new: int) -> list[list[int]]:
        reqs = [Request(i, list(p), max_new) for i, p in enumerate(prompts)]
        for r in reqs:
            self.sched.add(r)
        while not self.sched.done:
            self.step()
        return [r.output for r in reqs]

    @torch.no_grad()
    def step(self) -> None:
        s = self.sched.schedule()
        n = s.num_tokens
        self.input_ids[:n].copy_(torch.tensor(s.token_ids))
        self.positions[:n].copy_(torch.tensor(s.positions))
        blocks = [r.blocks for r in s.requests]
        meta = self.buffers.fill(s.query_lens, s.seq_lens, blocks, s.slot_mapping)
        ctx = ForwardContext(meta, self.kv_caches, self.block_size, tuple(s.query_lens), tuple(s.phases),
                             self.builders)
        with set_forward_context(ctx):
            hidden = self._run(n, s.decode_only)
        last = torch.tensor(s.query_lens).cumsum(0) - 1
        tokens = self.model.logits(hidden[last.to(self.device)]).argmax(-1).tolist()
        sampled = [t if r.num_computed + q == len(r.tokens) else None
                   for r, q, t in zip(s.requests, s.query_lens, tokens)]
        self.steps.append(s)
        self.sched.update(s, sampled)

    def _run(self, n: int, decode_only: bool) -> torch.Tensor:
        ids, pos = self.input_ids[:n], self.positions[:n]
        if not (self.decode_cuda_graph and decode_only):
            return self.forward(ids, pos)
        if n in self.graphs:
            graph, out = self.graphs[n]
            graph.replay()
            self.replays += 1
            return out
        out = self.forward(ids, pos)  # warm-up: this step's real result (compiles, plans, allocates)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the warm-up already wrote this step's K/V
            static_out = self.forward(ids, pos)
        self.graphs[n] = (graph, static_out)
        return out.clone()
