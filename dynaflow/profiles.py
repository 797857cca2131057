"""Measured per-segment timings, keyed by (model hash, device, dtype), saved as JSON.

A :class:`Profile` holds ``{segment: {rows: seconds}}`` for one captured graph; ``dynaflow.profile``
measures it on any executor, and the cost model prefers it to the roofline where it has an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from dynaflow.errors import ConfigError
from dynaflow.segmented import SegmentedModule

__all__ = ["Profile", "model_hash", "load_profiles", "save_profiles"]


def model_hash(seg: SegmentedModule) -> str:
    """A stable hash of a segmented graph's code and segment names (what a profile is valid for). Dynamo's
    symbol names (``s23``) differ from one capture to the next, so they are normalised first."""
    code = re.sub(r"\b[su]\d+\b", "s", seg.graph_text)
    text = code + "|" + ",".join(s.name for s in seg.segments)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Profile:
    """Median seconds per (segment, rows) for one graph on one device and dtype."""

    model: str
    device: str
    dtype: str
    timings: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.device}/{self.dtype}"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "dtype": self.dtype, "meta": dict(self.meta),
                "timings": {seg: {str(r): t for r, t in sorted(pts.items())} for seg, pts in self.timings.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Profile":
        try:
            timings = {seg: {int(r): float(t) for r, t in pts.items()} for seg, pts in data["timings"].items()}
            return cls(str(data["model"]), str(data["device"]), str(data["dtype"]), timings, dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"Not a dynaflow profile ({type(exc).__name__}: {exc}); expected keys model, device, "
                              "dtype, timings as written by dynaflow.profile(...).save(path).") from None

    def __repr__(self) -> str:
        pts = sum(len(v) for v in self.timings.values())
        return f"Profile({self.key}: {len(self.timings)} segments, {pts} points)"


def save_profiles(profiles: list[Profile], path: str | os.PathLike[str]) -> str:
    """Write profiles as one JSON file (merging into an existing file, newest entry per key wins)."""
    path = os.fspath(path)
    existing = {p.key: p for p in load_profiles(path)} if os.path.exists(path) else {}
    existing.update({p.key: p for p in profiles})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"profiles": [p.to_json() for p in existing.values()]}, f, indent=1)
    return path


def load_profiles(path: str | os.PathLike[str]) -> list[Profile]:
    """Read a file written by :func:`save_profiles`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # (nesting too deep)
        raise ConfigError(f"Cannot read profile file {os.fspath(path)!r}: {exc}. Write it with "
                          "dynaflow.profile(model, *inputs).save(path).") from None
    profiles = data.get("profiles", []) if isinstance(data, dict) else None
    if not isinstance(profiles, list) or not all(isinstance(p, dict) for p in profiles):
        raise ConfigError(f"Profile file {os.fspath(path)!r} holds {type(data).__name__} data, not "
                          "{'profiles': [...]} as dynaflow.profile(model, *inputs).save(path) writes it.")
    return [Profile.from_json(p) for p in profiles]
