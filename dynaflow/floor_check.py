"""The call-level floor check of ``auto``: whole calls through dynaflow against calls of the model itself.

``auto`` measures its candidates on the executor alone, and the model itself (the eager floor) on the captured
graph. A real call also pays what neither measurement holds: Dynamo's guards, the front end, the input checks
of a graph replay. On a GPU-bound step those are microseconds; but measured on an H200, they kept a ``sequential``
CUDA graph that ``auto`` had timed 1% faster than eager at 0.98x of eager per call. So after ``auto`` planned
a call, the next calls like it (same :func:`~dynaflow.api.call_key`) alternate between the model itself and
dynaflow, each timed whole (on a GPU with a device sync on either side: the time a caller that reads the step's
result waits); after :data:`SAMPLES` of each, the faster path keeps those calls, the model itself on a tie.
Both paths compute the answer eager computes, so the check changes nothing but the time.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["FloorCheck", "SAMPLES", "WARMUP"]

log = logging.getLogger(__name__)

SAMPLES = 5
"""Timed calls of each path before the verdict."""
WARMUP = {"floor": 1, "dynaflow": 2}
"""Untimed calls of each path first (dynaflow's: a CUDA-graph signature warms up, then captures)."""


@dataclass
class _Probe:
    calls: dict[str, int] = field(default_factory=lambda: {"floor": 0, "dynaflow": 0})
    times: dict[str, list[float]] = field(default_factory=lambda: {"floor": [], "dynaflow": []})


@dataclass(frozen=True)
class Verdict:
    """Medians of the two paths for one kind of call, and which one keeps it."""

    what: str
    floor_s: float
    dynaflow_s: float

    @property
    def keeps_dynaflow(self) -> bool:
        return self.dynaflow_s < self.floor_s

    def __repr__(self) -> str:
        winner = "dynaflow" if self.keeps_dynaflow else "the model itself"
        return (f"{self.what}: dynaflow {self.dynaflow_s * 1e3:.3f} ms, the model itself {self.floor_s * 1e3:.3f} ms "
                f"(medians of {SAMPLES} whole calls): {winner} runs them")


class FloorCheck:
    """Per call key under probation, which path the next call takes and the times so far (module docstring)."""

    def __init__(self) -> None:
        self._probes: dict[Any, _Probe] = {}
        self._decided: set[Any] = set()
        self.verdicts: list[Verdict] = []
        self._lock = threading.Lock()
        """Guards the bookkeeping (not the timed calls): callers on several threads share one check."""

    @property
    def active(self) -> bool:
        return bool(self._probes)

    def start(self, key: Any) -> None:
        """Put calls with ``key`` on probation (after the call that planned them), once per key."""
        with self._lock:
            if key not in self._decided:
                self._probes.setdefault(key, _Probe())

    def run(self, key: Any, what: str, floor: Callable[[], Any], dynaflow: Callable[[], Any],
            cuda: bool) -> tuple[Any, Verdict | None]:
        """One call of ``key``: the path whose turn it is, timed; the verdict when this call completed the probe.
        Returns ``(output, verdict)``; a key not on probation runs ``dynaflow``. Callers on other threads may
        run at the same time: each call's turn and time are booked under a lock, and one call gives the verdict."""
        probe = self._probes.get(key)
        if probe is None or (cuda and torch.cuda.is_current_stream_capturing()):
            return dynaflow(), None  # inside a caller's graph capture nothing may synchronise
        with self._lock:
            calls = probe.calls
            # the path with more calls left goes next: dynaflow warms up first, then the two alternate
            path = max(("dynaflow", "floor"), key=lambda p: WARMUP[p] + SAMPLES - calls[p])
            calls[path] += 1
            timed = calls[path] > WARMUP[path]
        fn = floor if path == "floor" else dynaflow
        if not timed:
            return fn(), None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        with self._lock:
            times = probe.times
            times[path].append(elapsed)
            if self._probes.get(key) is not probe or min(len(v) for v in times.values()) < SAMPLES:
                return out, None  # more samples to come, or another thread's call gave the verdict
            del self._probes[key]
            self._decided.add(key)
            verdict = Verdict(what, statistics.median(times["floor"]), statistics.median(times["dynaflow"]))
            self.verdicts.append(verdict)
        log.info("auto's floor check: %r", verdict)
        return out, verdict
