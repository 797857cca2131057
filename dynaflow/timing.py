"""Interleaved wall-clock timing of two callables: medians with their spread, and the per-pair ratio.

Timing A in one block and B in the next lets machine load that drifts between the blocks decide the ratio;
alternating A and B call by call (and which of the pair goes first) exposes both to the same load, and the
median of the per-pair ratios cancels what drift remains.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Spread", "Comparison", "spread", "interleave"]


@dataclass(frozen=True)
class Spread:
    """Median of a sample with its interquartile range (25th and 75th percentiles)."""

    median: float
    low: float
    high: float

    def format(self, unit: str = "", digits: int = 2) -> str:
        """``12.31 ms [12.05–12.80]``: the median, then the interquartile range."""
        return f"{self.median:.{digits}f}{unit} [{self.low:.{digits}f}–{self.high:.{digits}f}]"

    def overlaps(self, other: "Spread") -> bool:
        """Whether the two interquartile ranges share a value (the samples agree within their spread)."""
        return self.low <= other.high and other.low <= self.high


def spread(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of ``values`` (one value: a zero-width range)."""
    if not values:
        raise ValueError("spread() of an empty sample")
    if len(values) == 1:
        return Spread(values[0], values[0], values[0])
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(q2, q1, q3)


@dataclass(frozen=True)
class Comparison:
    """What :func:`interleave` measured: per-callable times in ms and the ratio ``b / a`` per pair."""

    a_ms: Spread
    b_ms: Spread
    ratio: Spread
    pairs: int


def interleave(a: Callable[[], Any], b: Callable[[], Any], pairs: int, warmup: int = 2) -> Comparison:
    """Time ``a`` and ``b`` alternately, ``pairs`` times each after ``warmup`` untimed pairs; odd pairs run
    ``b`` first so neither always inherits the other's cache state."""
    for _ in range(warmup):
        a()
        b()
    a_ms: list[float] = []
    b_ms: list[float] = []
    for i in range(max(1, pairs)):
        order = ((a, a_ms), (b, b_ms)) if i % 2 == 0 else ((b, b_ms), (a, a_ms))
        for fn, out in order:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    ratios = [y / x for x, y in zip(a_ms, b_ms)]
    return Comparison(spread(a_ms), spread(b_ms), spread(ratios), len(a_ms))
