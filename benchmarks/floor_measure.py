"""How the GPU-floor benchmark measures: one timing rule, one error rule, streams and graphs for the
hand-written baselines, and a time limit per row. Every row of every workload goes through these, so rows
are comparable.

* **Time**: on a GPU, CUDA events around each call on the caller's stream, median of ``repeats`` (≥ 20)
  after ``warmup`` calls; on a CPU (dry run) ``perf_counter`` medians. A workload's ``reset`` (the static
  cache's position counter of (c)) runs before each call, outside the events.
* **Error**: the relative error of every output tensor against eager (``‖out - ref‖ / ‖ref‖`` in float32),
  the largest over the outputs. ``TOLERANCE`` per dtype: bf16 rounds at 2^-8 ≈ 0.4% per op; a split GEMM may
  pick another kernel and another summation order, which after a few layers moves outputs by a few 1e-3.
* **Streams**: :class:`Streams` is real CUDA streams and events on a GPU and inline stand-ins on a CPU, so
  the hand-written multi-stream baselines run (and are checked against eager) in the dry run too.
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import threading
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["TOLERANCE", "tolerance", "rel_err", "median_ms", "Streams", "capture_graph", "RowTimeout", "time_limit"]

TOLERANCE = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 1e-4}
"""Largest relative error (see the module docstring) a row may have against eager and still count as equal."""


def tolerance(dtype: torch.dtype | str) -> float:
    return TOLERANCE[str(dtype).replace("torch.", "")]


def rel_err(out: Any, ref: Any) -> float:
    """Largest relative error over the tensors of ``out`` against those of ``ref`` (same structure)."""
    a = [t for t in tree_leaves(out) if torch.is_tensor(t)]
    b = [t for t in tree_leaves(ref) if torch.is_tensor(t)]
    if len(a) != len(b) or not b:
        raise ValueError(f"output has {len(a)} tensors, eager has {len(b)}")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ValueError(f"output shape {tuple(x.shape)} != eager {tuple(y.shape)}")
        y = y.float()
        den = y.norm().item() or 1.0
        e = (x.float() - y).norm().item() / den
        worst = max(worst, e if math.isfinite(e) else float("inf"))
    return worst


def median_ms(fn: Callable[[], Any], *, repeats: int, warmup: int, cuda: bool,
              reset: Callable[[], None] | None = None) -> float:
    """Median milliseconds of ``fn()`` (see the module docstring); ``reset()`` runs before each call, untimed."""
    for _ in range(warmup):
        if reset is not None:
            reset()
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if reset is not None:
            reset()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class _InlineStream:
    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass


class Streams:
    """CUDA streams and events (``cuda=True``) or stand-ins that run everything inline on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def new(self) -> Any:
        return torch.cuda.Stream() if self.cuda else _InlineStream()

    def current(self) -> Any:
        return torch.cuda.current_stream() if self.cuda else _InlineStream()

    def on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def record(self, stream: Any) -> Any:
        """An event recorded on ``stream`` now (None on a CPU)."""
        if not self.cuda:
            return None
        e = torch.cuda.Event()
        e.record(stream)
        return e

    def wait(self, stream: Any, event: Any) -> None:
        if event is not None:
            stream.wait_event(event)

    def fork(self, *streams: Any) -> None:
        """Every stream waits for the work issued so far on the caller's stream."""
        cur = self.current()
        for s in streams:
            s.wait_stream(cur)

    def join(self, *streams: Any) -> None:
        """The caller's stream waits for everything issued on ``streams``."""
        cur = self.current()
        for s in streams:
            cur.wait_stream(s)


def capture_graph(fn: Callable[[], Any], warm: int = 3) -> tuple[Any, Any]:
    """``fn`` captured as one CUDA graph after ``warm`` eager calls on a side stream (the usual recipe: lazy
    initialisation — cuBLAS workspaces, autotuning — must not happen inside the capture). Returns the graph
    and the static outputs its replays overwrite. ``fn`` must read the same input tensors on every call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class RowTimeout(Exception):
    """A row ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "row") -> Iterator[None]:
    """Raise :class:`RowTimeout` in the main thread when the block runs longer than ``seconds`` (SIGALRM:
    it interrupts Python code, not a kernel; the per-workload subprocess limit of ``gpu_floor.py`` is the
    hard stop). No limit off the main thread or where SIGALRM does not exist."""
    usable = seconds and seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise RowTimeout(f"{what} ran past its time limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
