"""Typed options for :func:`dynaflow.compile`; unknown keys are rejected with the nearest valid name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dynaflow.errors import ConfigError, did_you_mean

__all__ = ["DynaflowConfig", "EXECUTORS"]

EXECUTORS = ("auto", "serial", "thread", "cuda", "sim")


@dataclass
class DynaflowConfig:
    """Everything :func:`dynaflow.compile` accepts; ``DynaflowConfig.from_dict`` for YAML/JSON sources."""

    strategy: Any = "nanoflow"
    """A strategy name, class, instance or ``"pkg.module:Class"``."""
    nano_batches: int | None = None
    """Nano-batch count; ``None`` lets the strategy choose."""
    rules: Sequence[Any] | None = None
    """Split rules (``Op``, ``Mod``, ``Seq``, predicates); ``None`` uses the strategy's or the defaults."""
    executor: str = "auto"
    """One of ``EXECUTORS``; ``auto`` picks cuda for CUDA inputs, else thread."""
    batch_dim: int = 0
    """The batch dimension of the inputs."""
    strict: bool = False
    """Raise instead of inserting a barrier when a segment couples the batch."""
    verify: bool = False
    """Verify graphs and schedules on every plan (also on with ``DYNAFLOW_VERIFY=1``)."""
    wait_timeout: float | None = None
    """Seconds a lane waits on an event before failing; ``None`` uses ``DYNAFLOW_WAIT_TIMEOUT``."""
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword options passed to the strategy's constructor when it is given by name or class."""
    distributed_agree: bool | None = None
    """Ranks agree on the nano-batch count on every call (one small all_reduce); ``None``: on when
    torch.distributed is initialized and the captured graph has collectives. See docs/distributed.md."""
    lane_communicators: bool = True
    """Each lane that issues collectives gets its own communicator (a clone of the group); ``False``: one
    per group, and collectives on several lanes must be ordered by dependencies (else ScheduleError)."""

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(
                f"executor={self.executor!r} is not one of {EXECUTORS}.{did_you_mean(str(self.executor), EXECUTORS)}"
            )
        if self.nano_batches is not None and (not isinstance(self.nano_batches, int) or self.nano_batches < 1):
            raise ConfigError(
                f"nano_batches={self.nano_batches!r} must be an int >= 1 (or None to let the strategy choose)."
            )
        if not isinstance(self.batch_dim, int) or self.batch_dim < 0:
            raise ConfigError(f"batch_dim={self.batch_dim!r} must be a non-negative int (the batch dimension index).")
        if self.distributed_agree not in (None, True, False):
            raise ConfigError(f"distributed_agree={self.distributed_agree!r} must be True, False or None (auto).")
        if not isinstance(self.lane_communicators, bool):
            raise ConfigError(f"lane_communicators={self.lane_communicators!r} must be True or False.")
        if self.wait_timeout is not None and self.wait_timeout <= 0:
            raise ConfigError(f"wait_timeout={self.wait_timeout!r} must be > 0 seconds.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DynaflowConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"Unknown dynaflow option {key!r}.{did_you_mean(key, names)} Valid options: {', '.join(names)}.")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "DynaflowConfig":
        return dataclasses.replace(self, **changes)

    def compute_hash(self) -> str:
        """A stable hash of the options that change the plan (for caches)."""
        data = {f.name: repr(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
