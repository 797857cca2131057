"""Timelines: what ran on which lane and when, from any executor; exported as Perfetto / Chrome JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from dynaflow.errors import ConfigError

__all__ = ["TimelineEvent", "Timeline", "to_perfetto", "plot"]


@dataclass(frozen=True)
class TimelineEvent:
    """One launch: ``op`` ran on ``lane`` from ``start`` to ``end`` (seconds, relative to the step start)."""

    lane: str
    op: str
    start: float
    end: float
    resource: str = ""

    @property
    def duration(self) -> float:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"{self.op}@{self.lane} [{self.start * 1e6:.1f}µs → {self.end * 1e6:.1f}µs]"


@dataclass(frozen=True)
class Timeline:
    """The launches of one step, per lane, as recorded by an executor."""

    events: tuple[TimelineEvent, ...]
    executor: str = ""

    @property
    def lanes(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for e in self.events:
            seen.setdefault(e.lane, None)
        return tuple(seen)

    @property
    def makespan(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - min(e.start for e in self.events)

    def busy(self, lane: str) -> float:
        return sum(e.duration for e in self.events if e.lane == lane)

    def overlap(self) -> float:
        """Total busy time over makespan: 1.0 is serial, >1 means lanes overlapped."""
        span = self.makespan
        return sum(e.duration for e in self.events) / span if span else 0.0

    def of_lane(self, lane: str) -> tuple[TimelineEvent, ...]:
        return tuple(e for e in self.events if e.lane == lane)

    def __repr__(self) -> str:
        return (
            f"Timeline({self.executor or '?'}: {len(self.events)} launches on {len(self.lanes)} lanes, "
            f"makespan {self.makespan * 1e3:.3f} ms, overlap {self.overlap():.2f}x)"
        )


def _check(timeline: Any, who: str) -> None:
    if not isinstance(timeline, Timeline):
        raise ConfigError(
            f"{who} needs a Timeline, got {type(timeline).__name__}. compiled.last_timeline is None before the first "
            "call, and after a call that ran the captured graph as is (strategy 'eager', or 'auto' when its eager "
            "floor won: no launches to time). Pick a splitting strategy (e.g. strategy='sequential') to record one.")


def to_perfetto(timeline: Timeline, path: str | os.PathLike[str]) -> str:
    """Write ``timeline`` as Chrome trace-event JSON (opens in ui.perfetto.dev or chrome://tracing)."""
    _check(timeline, "to_perfetto")
    lanes: Sequence[str] = timeline.lanes
    events: list[dict[str, object]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"dynaflow ({timeline.executor})"}}
    ]
    for tid, lane in enumerate(lanes):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": lane}})
    tid_of = {lane: i for i, lane in enumerate(lanes)}
    for e in timeline.events:
        events.append(
            {
                "name": e.op,
                "cat": e.resource or "op",
                "ph": "X",
                "pid": 0,
                "tid": tid_of[e.lane],
                "ts": e.start * 1e6,
                "dur": max(e.duration * 1e6, 0.001),
                "args": {"lane": e.lane, "resource": e.resource},
            }
        )
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ns"}, f)
    return path


_COLOURS = {"compute": "#4C72B0", "memory": "#DD8452", "network": "#55A868", "transfer": "#8172B3", "": "#8C8C8C"}


def plot(timeline: Timeline, path: str | os.PathLike[str], title: str | None = None) -> str:
    """Draw ``timeline`` as a Gantt chart PNG: one row per lane, bars coloured by resource, the nano-batch
    id on each bar (``all`` for whole-batch ops). Needs matplotlib (``pip install dynaflow[plot]``)."""
    _check(timeline, "plot")
    from dynaflow.optional import require

    require("matplotlib", "dynaflow.timeline.plot").use("Agg", force=False)
    plt = require("matplotlib.pyplot", "dynaflow.timeline.plot")
    Patch = require("matplotlib.patches", "dynaflow.timeline.plot").Patch
    lanes = list(timeline.lanes)
    t0 = min((e.start for e in timeline.events), default=0.0)
    span = max(timeline.makespan, 1e-9)
    scale, unit = (1e3, "ms") if span >= 1e-3 else (1e6, "µs")
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(lanes) + 1.6), dpi=120)
    for row, lane in enumerate(lanes):
        for e in timeline.of_lane(lane):
            x, w = (e.start - t0) * scale, e.duration * scale
            ax.barh(row, w, left=x, height=0.6, color=_COLOURS.get(e.resource, _COLOURS[""]), edgecolor="white",
                    linewidth=0.6)
            nano = e.op[e.op.find("[") + 1:e.op.rfind("]")] if "[" in e.op else ""
            label = nano.replace("nb", "")
            if w > span * scale * 0.07:
                label = f"{e.op[:e.op.find('[')] if '[' in e.op else e.op} · {label}"
            if w > span * scale * 0.012:
                ax.text(x + w / 2, row, label, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(lanes)
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    used = sorted({e.resource for e in timeline.events} - {""}) or [""]
    ax.legend(handles=[Patch(color=_COLOURS.get(r, _COLOURS[""]), label=r or "op") for r in used],
              loc="upper right", fontsize=8, ncol=len(used))
    ax.set_title(title or f"{timeline!r}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
