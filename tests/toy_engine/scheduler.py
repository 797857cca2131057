"""Continuous batching with chunked prefill, in the manner of vLLM's v1 scheduler (much reduced).

Every request has ``num_computed`` tokens whose K/V are in the cache; each step gives each running request
``min(tokens still to compute, budget left)`` tokens (a decode needs one: its last sampled token), then
admits waiting requests while budget and request slots last. A prompt longer than the budget is therefore
prefilled over several steps, and a step mixes decodes with (chunks of) prefills. Blocks of the paged KV
cache are allocated as a request's tokens need them and freed when it finishes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new: int
    output: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return len(self.output) >= self.max_new


@dataclasses.dataclass
class ScheduledStep:
    """One step's host-side layout, requests in batch order."""

    requests: list[Request]
    query_lens: list[int]
    token_ids: list[int]
    positions: list[int]
    seq_lens: list[int]
    slot_mapping: list[int]
    phases: list[str]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_only(self) -> bool:
        return all(p == "decode" for p in self.phases)


class Scheduler:
    def __init__(self, block_size: int, num_blocks: int, token_budget: int, max_reqs: int, max_blocks: int):
        self.block_size, self.token_budget, self.max_reqs, self.max_blocks = block_size, token_budget, max_reqs, max_blocks
        self.free_blocks = list(range(num_blocks))
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        if -(-(len(req.prompt) + req.max_new) // self.block_size) > self.max_blocks:
            raise ValueError(f"request {req.rid} needs more than {self.max_blocks} blocks")
        self.waiting.append(req)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> ScheduledStep:
        budget = self.token_budget
        plan: list[tuple[Request, int]] = []
        for req in self.running:
            n = min(len(req.tokens) - req.num_computed, budget)
            if n > 0:
                plan.append((req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_reqs:
            req = self.waiting.pop(0)
            self.running.append(req)
            n = min(len(req.prompt), budget)
            plan.append((req, n))
            budget -= n
        step = ScheduledStep([], [], [], [], [], [], [])
        for req, n in plan:
            start, end = req.num_computed, req.num_computed + n
            while len(req.blocks) * self.block_size < end:
                req.blocks.append(self.free_blocks.pop(0))
            step.requests.append(req)
            step.query_lens.append(n)
            step.token_ids += req.tokens[start:end]
            step.positions += list(range(start, end))
            step.seq_lens.append(end)
            step.slot_mapping += [req.blocks[p // self.block_size] * self.block_size + p % self.block_size
                                  for p in range(start, end)]
            step.phases.append("decode" if start >= len(req.prompt) else "prefill")
        return step

    def update(self, step: ScheduledStep, sampled: Sequence[int | None]) -> None:
        """After the step: advance each request; ``sampled[i]`` is request ``i``'s next token, or ``None`` for
        a prefill chunk that did not reach the end of its prompt."""
        for req, n, tok in zip(step.requests, step.query_lens, sampled):
            req.num_computed += n
            if tok is not None:
                req.output.append(tok)
            if req.finished:
                self.running.remove(req)
                self.free_blocks += req.blocks
                req.blocks = []
