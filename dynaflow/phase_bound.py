"""A time bound for one request phase in a split step: PD-multiplexing's contract, measured.

``prefill_decode`` runs prefill rows and decode rows on their own lanes; with SM partitions, the smaller the
decode partition the more SMs prefill gets, and the longer the decode rows take. ``auto`` may therefore shrink
the decode partition only as far as the decode rows still finish within ``factor`` times their standalone time
(SGLang's PD-Multiplexing sizes its partitions by the same rule). Both times come from executor timelines of real
runs (on a GPU, the cuda executor's CUDA events):

* **standalone**: the summed durations of the phase's launches in a sequential run of the same split — each ran
  alone on the whole device;
* **in the step**: the end of the phase's last launch in the candidate's own run, from the step's start.

A candidate whose split has no nano-batch of the phase is not bounded.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from dynaflow.errors import StrategyError

__all__ = ["PhaseBound", "phase_ops", "finish_time", "busy_time"]


@dataclass(frozen=True)
class PhaseBound:
    """The rows of ``phase`` must finish within ``factor`` × their standalone time."""

    phase: str = "decode"
    factor: float = 1.2

    def __post_init__(self) -> None:
        if not isinstance(self.factor, (int, float)) or not self.factor >= 1.0:
            raise StrategyError(f"Strategy 'auto': decode_bound={self.factor!r} must be a number >= 1.0 (the "
                                "decode rows' time in a split step over their standalone time), or None for no bound.")

    def applies(self, plan: Any) -> bool:
        """Whether ``plan``'s split has a nano-batch of this phase."""
        return self.phase in (plan.split.labels or ())

    def verdict(self, finish: float, alone: float) -> str | None:
        """Why a candidate whose phase finished at ``finish`` s (``alone`` s standalone) breaks the bound, or
        ``None`` when it keeps it."""
        if alone <= 0 or finish <= self.factor * alone:
            return None
        return (f"{self.phase} finished at {finish / alone:.2f}x of its standalone time "
                f"(bound {self.factor:g}x): not eligible")

    def __repr__(self) -> str:
        return f"PhaseBound({self.phase} <= {self.factor:g}x standalone)"


def phase_ops(program: Any, phase: str) -> frozenset[str]:
    """The timeline names of ``program``'s launches on the nano-batches labelled ``phase``."""
    labels = program.split.labels or ()
    nanos = {i for i, label in enumerate(labels) if label == phase}
    return frozenset(l.timeline_op for l in program.serial_order if l.op.nano in nanos)


def finish_time(timelines: Iterable[Any], ops: frozenset[str]) -> float:
    """Median over runs of the end of the last event among ``ops`` (seconds from the step's start)."""
    return _median([max((e.end for e in t.events if e.op in ops), default=0.0) for t in timelines])


def busy_time(timelines: Iterable[Any], ops: frozenset[str]) -> float:
    """Median over runs of the summed durations of the events among ``ops``."""
    return _median([sum(e.duration for e in t.events if e.op in ops) for t in timelines])


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0
