"""Typed options for :func:`dynaflow.compile`; unknown keys are rejected with the nearest valid name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from dynaflow.errors import ConfigError, did_you_mean

__all__ = ["DynaflowConfig", "EXECUTORS", "OVER_CAPTURE"]

EXECUTORS = ("auto", "serial", "thread", "cuda", "sim")
OVER_CAPTURE = ("error", "eager")


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
    profile: Any = None
    """Measured segment timings for the cost model: a path written by ``dynaflow.profile(...).save`` or
    Profile objects. The roofline (FLOP/byte counts) covers what it lacks."""
    cost: Any = None
    """A ``dynaflow.cost.CostModel`` asked before the profile and the roofline (what-if studies, tests)."""
    cost_link: Any = None
    """Interconnect the cost model assumes for collectives: a ``dynaflow.network.LINKS`` name (``"nvlink4"``,
    ``"pcie5"``, ``"ib_ndr"``) or a Link; ``None`` = the device table's own link."""
    cost_device: Any = None
    """Device the cost model (``executor="sim"``, ``strategy="auto"``) assumes: a key of
    ``dynaflow.cost.DEVICES`` such as ``"h200"`` (what-if planning on a CPU machine) or a ``DeviceSpec``;
    ``None`` = the inputs' device."""
    inductor: bool = False
    """Compile every segment (except ones tagged ``no-inductor``) with TorchInductor, once per nano-batch
    shape, warmed before the first step runs (and before any CUDA-graph capture)."""
    cuda_graphs: bool = False
    """On the cuda executor: capture the whole multi-lane step as one CUDA graph per input bucket."""
    capture_sizes: Sequence[int] | None = None
    """Batch sizes to capture CUDA graphs for (a batch is padded up to the next one); ``None`` captures
    each batch size as it comes."""
    over_capture: str = "error"
    """What a batch larger than the largest capture size does: ``"error"`` or ``"eager"`` (run uncaptured)."""
    gpu_timeline: bool = False
    """On the cuda executor: time every launch with CUDA events (adds events and a sync per step)."""
    copy_outputs: bool = True
    """On the cuda executor: return fresh output tensors (``False``: views of static buffers that the next
    step overwrites)."""
    static_inputs: Sequence[Any] = ()
    """With ``cuda_graphs=True``: inputs the caller keeps in the same storage every step (a serving engine's
    KV cache), by forward-argument name (``"kv_caches"`` covers each tensor in it), module attribute path or
    position; a capture reads them in place and a call that passes them moved raises instead of copying.
    Undeclared inputs whose storage stays the same are found by observation and read in place too."""
    distributed_agree: bool | None = None
    """Ranks agree on the nano-batch count on every call (one small all_reduce); ``None``: on when
    torch.distributed is initialized and the captured graph has collectives. See docs/distributed.md."""
    lane_communicators: bool = True
    """Each lane that issues collectives gets its own communicator (a clone of the group); ``False``: one
    per group, and collectives on several lanes must be ordered by dependencies (else ScheduleError)."""

    def __post_init__(self) -> None:
        if not isinstance(self.executor, str) or not self.executor:
            raise ConfigError(f"executor={self.executor!r} must be a registered executor name (built in: {EXECUTORS}).")
        if self.nano_batches is not None and (not isinstance(self.nano_batches, int) or isinstance(self.nano_batches, bool)
                                              or self.nano_batches < 1):
            raise ConfigError(
                f"nano_batches={self.nano_batches!r} must be an int >= 1 (or None to let the strategy choose)."
            )
        for name in ("strict", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False.")
        if not isinstance(self.strategy_options, Mapping) or not all(isinstance(k, str) for k in self.strategy_options):
            raise ConfigError(f"strategy_options={self.strategy_options!r} must be a dict of the strategy's options "
                              "by name, e.g. strategy_options={'sm_counts': {'compute': 100, 'memory': 32}}.")
        if not isinstance(self.batch_dim, int) or isinstance(self.batch_dim, bool) or self.batch_dim < 0:
            raise ConfigError(f"batch_dim={self.batch_dim!r} must be a non-negative int (the batch dimension index).")
        if self.rules is not None and (isinstance(self.rules, (str, bytes)) or not isinstance(self.rules, Iterable)):
            raise ConfigError(f"rules={self.rules!r:.80} must be a list of split rules, e.g. "
                              "rules=[dynaflow.Op(r'linear'), dynaflow.Mod('attn')], or None for the strategy's.")
        self._check_cost_sources()
        if self.cost_link is not None:
            from dynaflow.network import link

            link(self.cost_link)  # unknown link names fail here, with the known ones listed
        if self.cost_device is not None:
            from dynaflow.cost import DeviceSpec, device_spec

            if not isinstance(self.cost_device, (str, DeviceSpec)):
                raise ConfigError(f"cost_device={self.cost_device!r} must be a device name such as 'h200' (a key of "
                                  "dynaflow.cost.DEVICES), a DeviceSpec, or None for the inputs' device.")

            device_spec(self.cost_device)  # unknown names fail here, with the known ones listed
        if self.distributed_agree not in (None, True, False):
            raise ConfigError(f"distributed_agree={self.distributed_agree!r} must be True, False or None (auto).")
        if not isinstance(self.lane_communicators, bool):
            raise ConfigError(f"lane_communicators={self.lane_communicators!r} must be True or False.")
        if self.wait_timeout is not None and (isinstance(self.wait_timeout, bool)
                                              or not isinstance(self.wait_timeout, (int, float))):
            raise ConfigError(f"wait_timeout={self.wait_timeout!r} must be a number of seconds > 0 (e.g. 60), "
                              f"not {type(self.wait_timeout).__name__}; or None to use DYNAFLOW_WAIT_TIMEOUT.")
        if self.wait_timeout is not None and not self.wait_timeout > 0:  # (NaN is not > 0 either)
            raise ConfigError(f"wait_timeout={self.wait_timeout!r} must be > 0 seconds (float('inf') waits forever).")
        self._check_cuda_options()

    def _check_cuda_options(self) -> None:
        for name in ("inductor", "cuda_graphs", "gpu_timeline", "copy_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False.")
        entries = self.static_inputs
        if isinstance(entries, (str, int)) and not isinstance(entries, bool):
            entries = self.static_inputs = (entries,)
        if not isinstance(entries, Sequence) or any(isinstance(e, bool) or not isinstance(e, (str, int)) for e in entries):
            raise ConfigError(f"static_inputs={entries!r} must be a sequence of input names or positions, "
                              "e.g. static_inputs=['kv_caches'].")
        self.static_inputs = tuple(entries)
        if self.over_capture not in OVER_CAPTURE:
            raise ConfigError(
                f"over_capture={self.over_capture!r} is not one of {OVER_CAPTURE}."
                f"{did_you_mean(str(self.over_capture), OVER_CAPTURE)}"
            )
        if self.capture_sizes is not None:
            sizes = self.capture_sizes
            if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
                raise ConfigError(f"capture_sizes={sizes!r} must be a non-empty sequence of batch sizes, e.g. (1, 2, 4, 8).")
            bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s < 1]
            if bad:
                raise ConfigError(f"capture_sizes={tuple(sizes)!r}: {bad[0]!r} is not a batch size (an int >= 1).")
            self.capture_sizes = tuple(sorted(set(sizes)))

    def _check_cost_sources(self) -> None:
        """``profile`` and ``cost`` are read on the first call that plans by cost (``auto``, ``executor="sim"``):
        a value of the wrong kind is refused now, not there."""
        import os

        from dynaflow.cost import CostModel
        from dynaflow.profiles import Profile

        source = self.profile
        items = source if isinstance(source, (list, tuple)) else [source]
        if source is not None and not isinstance(source, (str, os.PathLike)) and not all(
                isinstance(p, Profile) for p in items):
            raise ConfigError(f"profile={source!r:.80} must be a path written by dynaflow.profile(...).save(path), a "
                              "Profile, a list of Profiles, or None.")
        if self.cost is not None and not isinstance(self.cost, CostModel):
            raise ConfigError(f"cost={self.cost!r:.80} must be a dynaflow.cost.CostModel (an object with "
                              "estimate(segment, rows, sm_share)), or None.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DynaflowConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"dynaflow options must be a dict (or a DynaflowConfig), not {type(data).__name__} "
                              f"({data!r}); e.g. config={{'cuda_graphs': True}}.")
        cls.check_names(data)
        return cls(**dict(data))

    @classmethod
    def check_names(cls, keys: Iterable[str]) -> None:
        """A :class:`ConfigError` for the first of ``keys`` that is not an option, with the closest one."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in keys:
            if key not in names:
                raise ConfigError(f"Unknown dynaflow option {key!r}.{did_you_mean(str(key), names)} "
                                  f"Valid options: {', '.join(names)}.")

    def replace(self, **changes: Any) -> "DynaflowConfig":
        return dataclasses.replace(self, **changes)

    def compute_hash(self) -> str:
        """A stable hash of the options that change the plan (for caches)."""
        data = {f.name: repr(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
