"""Cost model: how long one (segment, nano size) launch takes on a lane with a given SM share.

Three sources, one interface (:class:`CostModel.estimate`):

* :class:`RooflineCost` — FLOPs and bytes counted per segment (``dynaflow.flops``) against a device's
  peak numbers (:data:`DEVICES`): ``time = max(flops / peak·share, bytes / bandwidth(share))``.
* :class:`MeasuredCost` — per-segment timings measured at a few nano sizes (``dynaflow.profile``),
  interpolated in the row count; SM shares scale it by the segment's bound.
* :class:`TableCost` — a synthetic table, for tests and what-if studies.

:class:`CombinedCost` asks the measured model first and falls back to the roofline: measured wins where
present. An :class:`Estimate` also says how much of each shared resource (SM throughput, memory bandwidth,
the network link) the launch uses while it runs, which the simulator needs for contention.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

from dynaflow.errors import ConfigError, did_you_mean
from dynaflow.ir import Resource, Segment

__all__ = [
    "DeviceSpec", "DEVICES", "device_spec", "Estimate", "CostModel", "LinearCount", "RooflineCost",
    "MeasuredCost", "TableCost", "CombinedCost", "bandwidth_share",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpec:
    """Peak numbers of one device. ``peak_flops`` is the *achievable* dense matmul rate at 16-bit
    precision; other dtypes scale by ``dtype_scale``. ``bw_saturation`` is the SM share at which a
    memory-bound kernel already reaches full bandwidth (a third to a half of the SMs on Hopper)."""

    name: str
    peak_flops: float
    mem_bandwidth: float
    num_sms: int = 1
    sm_granularity: int = 1
    launch_overhead: float = 5e-6
    bw_saturation: float = 0.5
    link_bandwidth: float = 0.0
    """Bytes/s of the device's collective link (NVLink per GPU, per direction); 0 for none."""
    link_latency: float = 0.0
    dtype_scale: Mapping[str, float] = field(default_factory=lambda: {"float32": 1.0})
    wait_latency: float = 0.0
    """Seconds a lane blocked on another lane's event pays to resume (thread hand-off on CPU)."""
    host_bandwidth: float = 25e9
    """Bytes/s of host <-> device copies from pinned memory (PCIe), per direction: what a ``transfer`` segment
    moves its bytes at, on the copy engines (assumed: ~80% of PCIe 4.0 x16; set per device below)."""

    def flops_for(self, dtype: str) -> float:
        return self.peak_flops * self.dtype_scale.get(dtype.replace("torch.", ""), 1.0)

    def __repr__(self) -> str:
        return (f"DeviceSpec({self.name}: {self.peak_flops / 1e12:.0f} TFLOP/s, "
                f"{self.mem_bandwidth / 1e9:.0f} GB/s, {self.num_sms} SMs)")


_GPU_DTYPES = {"bfloat16": 1.0, "float16": 1.0, "float32": 0.068, "float8_e4m3fn": 2.0}

DEVICES: dict[str, DeviceSpec] = {
    # Achievable rates, assumed: ~80% of the data-sheet dense bf16 peak (790 of 989 TFLOP/s)
    # and ~90% of HBM bandwidth. float32 without TF32 runs on the CUDA cores (67 TFLOP/s on H100/H200).
    # host_bandwidth: PCIe 5.0 x16, ~50 GB/s per direction achievable from pinned memory (assumed).
    "h200": DeviceSpec("NVIDIA H200", 790e12, 4.3e12, 132, 8, 4e-6, 0.4, 450e9, 3e-6, _GPU_DTYPES, 2e-6, 50e9),
    "h100": DeviceSpec("NVIDIA H100 SXM", 790e12, 3.0e12, 132, 8, 4e-6, 0.4, 450e9, 3e-6, _GPU_DTYPES, 2e-6, 50e9),
    "a100": DeviceSpec("NVIDIA A100 SXM", 250e12, 1.8e12, 108, 2, 5e-6, 0.5, 300e9, 4e-6,
                       {"bfloat16": 1.0, "float16": 1.0, "float32": 0.078}, 2e-6),
    # A generic 2-core VM: numbers are order-of-magnitude; profile for anything that matters.
    # wait_latency: ~40 µs per blocking cross-lane wait measured on the 2-core CI VM (thread hand-off).
    "cpu": DeviceSpec("cpu", 5e10, 1e10, 1, 1, 5e-6, 1.0, 0.0, 0.0, {"float32": 1.0, "bfloat16": 0.25}, 40e-6),
}


def device_spec(device: str | DeviceSpec | None = None) -> DeviceSpec:
    """The spec for ``device``: a :data:`DEVICES` key, a torch device string (``"cuda:0"`` reads the GPU's
    name), or a DeviceSpec. Unknown GPUs get the H100 numbers with a warning."""
    if isinstance(device, DeviceSpec):
        return device
    key = (device or "cpu").lower()
    if key in DEVICES:
        return DEVICES[key]
    if key.startswith("cpu"):
        return DEVICES["cpu"]
    if key.startswith("cuda"):
        name = ""
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(torch.device(key))
        except Exception:  # pragma: no cover - no driver
            name = ""
        for k in ("h200", "h100", "a100"):
            if k in name.lower():
                return DEVICES[k]
        log.warning("No device table entry for GPU %r; using H100 numbers. Profile for real costs.", name or key)
        return DEVICES["h100"]
    raise ConfigError(f"Unknown device {device!r} for the cost model.{did_you_mean(key, DEVICES)} "
                      f"Known: {', '.join(DEVICES)}, or a torch device string like 'cuda:0'.")


def bandwidth_share(sm_share: float, saturation: float) -> float:
    """Fraction of the memory bandwidth a kernel confined to ``sm_share`` of the SMs can draw.

    Worked example: with saturation 0.4, a lane of 25% of the SMs gets 0.25 / 0.4 = 62.5% of the
    bandwidth; a lane of 50% already gets all of it.
    """
    if saturation <= 0:
        return 1.0
    return min(1.0, sm_share / saturation)


@dataclass(frozen=True)
class Estimate:
    """One launch's predicted time and the fraction of each shared resource it uses while it runs
    (``"sm"``: compute throughput of the whole device, ``"bw"``: memory bandwidth, ``"net"``: link)."""

    seconds: float
    demand: tuple[tuple[str, float], ...] = ()
    bound: str = "compute"

    def __repr__(self) -> str:
        use = ", ".join(f"{r}={d:.2f}" for r, d in self.demand)
        return f"Estimate({self.seconds * 1e6:.1f}µs, {self.bound}-bound{', ' + use if use else ''})"


class CostModel:
    """Predicts :class:`Estimate` for ``rows`` rows of ``segment`` on ``sm_share`` of the device."""

    name = "cost"

    def estimate(self, segment: Segment, rows: int, sm_share: float = 1.0) -> Estimate | None:  # pragma: no cover
        raise NotImplementedError

    def seconds(self, segment: Segment, rows: int, sm_share: float = 1.0) -> float:
        est = self.estimate(segment, rows, sm_share)
        if est is None:
            raise ConfigError(f"The {self.name} cost model has no estimate for segment {segment.name!r} at {rows} rows; "
                              "profile the model (dynaflow.profile) or give a roofline.")
        return est.seconds


def _demand_for(resource: Resource, sm_share: float, bw_frac: float = 1.0) -> tuple[tuple[str, float], ...]:
    if resource is Resource.TRANSFER:
        return (("copy", 1.0),)  # the copy engines: no SM, a little HBM
    if resource is Resource.COMPUTE:
        return (("sm", sm_share),)
    if resource is Resource.MEMORY:
        return (("bw", bw_frac), ("sm", 0.1 * sm_share))
    return (("net", 1.0), ("sm", NCCL_SM_SHARE))


NCCL_SM_SHARE = 0.08
"""Fraction of the SMs a collective's kernels occupy while they run (NCCL uses ~8-16 of 132 SMs on Hopper);
the simulator charges it so communication next to a GEMM is not entirely free."""


@dataclass(frozen=True)
class LinearCount:
    """FLOPs and bytes of one segment as ``fixed + per_row · rows`` (weights are the fixed bytes: re-read by
    every nano-batch, which is why splitting a small batch costs bandwidth)."""

    flops_fixed: float
    flops_per_row: float
    bytes_fixed: float
    bytes_per_row: float

    def flops(self, rows: int) -> float:
        return max(0.0, self.flops_fixed + self.flops_per_row * rows)

    def bytes(self, rows: int) -> float:
        return max(0.0, self.bytes_fixed + self.bytes_per_row * rows)

    @classmethod
    def fit(cls, a: tuple[int, float, float], b: tuple[int, float, float] | None) -> "LinearCount":
        """From counts ``(rows, flops, bytes)`` at one or two sizes (one size: all per-row)."""
        if b is None or a[0] == b[0]:
            n = max(a[0], 1)
            return cls(0.0, a[1] / n, 0.0, a[2] / n)
        (n1, f1, y1), (n2, f2, y2) = a, b
        fs, ys = (f1 - f2) / (n1 - n2), (y1 - y2) / (n1 - n2)
        return cls(f1 - fs * n1, fs, y1 - ys * n1, ys)

    def __repr__(self) -> str:
        return (f"LinearCount(flops {self.flops_fixed:.3g}+{self.flops_per_row:.3g}/row, "
                f"bytes {self.bytes_fixed:.3g}+{self.bytes_per_row:.3g}/row)")


class RooflineCost(CostModel):
    """``max(compute, memory)`` time per launch from counted FLOPs/bytes and a :class:`DeviceSpec`; network
    segments move their bytes over the device's link (``dynaflow.network`` has collective formulas)."""

    name = "roofline"

    def __init__(self, counts: Mapping[str, LinearCount], device: DeviceSpec | str = "cpu", dtype: str = "float32",
                 world: int = 1, link: object = None):
        self.counts = dict(counts)
        self.device = device_spec(device)
        self.dtype = dtype
        self.world = world
        self.link = link
        """A ``dynaflow.network`` link (name or Link) for collectives; ``None`` uses the device's own link."""

    def estimate(self, segment: Segment, rows: int, sm_share: float = 1.0) -> Estimate | None:
        c = self.counts.get(segment.name)
        if c is None:
            return None
        d = self.device
        share = max(min(sm_share, 1.0), 1e-3)
        t_compute = c.flops(rows) / (d.flops_for(self.dtype) * share)
        bw = bandwidth_share(share, d.bw_saturation)
        t_memory = c.bytes(rows) / (d.mem_bandwidth * bw)
        if segment.resource is Resource.TRANSFER:  # host <-> device over PCIe, on the copy engines
            t_copy = c.bytes(rows) / 2 / max(d.host_bandwidth, 1.0)  # counted bytes are input plus output
            return Estimate(t_copy + d.launch_overhead, _demand_for(Resource.TRANSFER, share), "transfer")
        if segment.resource is Resource.NETWORK:
            t_net = self._network_seconds(segment, c.bytes(rows))
            if t_net is not None:
                return Estimate(t_net + d.launch_overhead, _demand_for(Resource.NETWORK, share), "network")
        t = max(t_compute, t_memory, 0.0) + d.launch_overhead
        busy = max(t, 1e-12)
        # "host": the launching thread's share of the time (Python + dispatch; serialised by the GIL on CPU)
        demand = (("sm", share * min(1.0, t_compute / busy)), ("bw", bw * min(1.0, t_memory / busy)),
                  ("host", d.launch_overhead / busy))
        return Estimate(t, demand, "compute" if t_compute >= t_memory else "memory")

    def _network_seconds(self, segment: Segment, nbytes: float) -> float | None:
        """Collective time of a network segment: each of its collectives by the ring / pairwise formulas of
        ``dynaflow.network`` over ``world`` ranks; a segment's counted bytes are its input plus its output,
        so one collective moves half of them."""
        from dynaflow import network

        kinds = [c.split("@")[0] for c in getattr(segment, "collectives", ()) or ()]
        if self.world <= 1:
            return 0.0 if kinds else None
        spec = self.link
        if spec is None:
            if self.device.link_bandwidth <= 0:
                return None
            spec = network.Link(self.device.name, self.device.link_bandwidth, self.device.link_latency)
        per = nbytes / 2 / max(len(kinds), 1)
        return sum(network.collective_time(k, per, self.world, spec) for k in (kinds or ["all_reduce"]))

    def __repr__(self) -> str:
        return f"RooflineCost({len(self.counts)} segments on {self.device.name}, {self.dtype})"


def _interp(points: Mapping[int, float], rows: int) -> float:
    """Piecewise-linear in the row count through measured points; linear extrapolation beyond them.

    Worked example: points {2: 10µs, 4: 14µs} give 12µs at 3 rows and 18µs at 6 rows.
    """
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]] * rows / xs[0] if xs[0] else points[xs[0]]
    if rows <= xs[0]:
        lo, hi = xs[0], xs[1]
    elif rows >= xs[-1]:
        lo, hi = xs[-2], xs[-1]
    else:
        hi = next(x for x in xs if x >= rows)
        lo = xs[xs.index(hi) - 1]
        if hi == rows:
            return points[hi]
    slope = (points[hi] - points[lo]) / (hi - lo)
    return max(points[lo] + slope * (rows - lo), 0.0)


class MeasuredCost(CostModel):
    """Seconds per (segment, rows) measured at a few sizes on the full device, interpolated in rows. An SM
    share scales the time by the segment's bound (its resource tag): compute by ``1/share``, memory by the
    bandwidth a share can draw."""

    name = "measured"

    def __init__(self, timings: Mapping[str, Mapping[int, float]], device: DeviceSpec | str = "cpu"):
        self.timings = {k: dict(v) for k, v in timings.items() if v}
        self.device = device_spec(device)

    def estimate(self, segment: Segment, rows: int, sm_share: float = 1.0) -> Estimate | None:
        points = self.timings.get(segment.name)
        if not points:
            return None
        t = _interp(points, rows)
        share = max(min(sm_share, 1.0), 1e-3)
        bw = bandwidth_share(share, self.device.bw_saturation)
        if segment.resource is Resource.COMPUTE:
            t /= share
        elif segment.resource is Resource.MEMORY:
            t /= bw
        return Estimate(t, _demand_for(segment.resource, share, bw), segment.resource.value)

    def __repr__(self) -> str:
        return f"MeasuredCost({len(self.timings)} segments on {self.device.name})"


class TableCost(CostModel):
    """A synthetic cost table: ``{segment name: seconds}`` or ``{segment name: {rows: seconds}}`` (or a
    callable ``rows -> seconds``), scaled by SM share like :class:`MeasuredCost`. Used by tests and
    what-if studies; a segment missing from the table costs ``default`` seconds."""

    name = "table"

    def __init__(self, table: Mapping[str, object], default: float | None = None, bw_saturation: float = 1.0):
        self.table = dict(table)
        self.default = default
        self.bw_saturation = bw_saturation

    def estimate(self, segment: Segment, rows: int, sm_share: float = 1.0) -> Estimate | None:
        entry = self.table.get(segment.name, self.default)
        if entry is None:
            return None
        if callable(entry):
            t = float(entry(rows))
        elif isinstance(entry, Mapping):
            t = _interp(entry, rows)
        else:
            t = float(entry)  # type: ignore[arg-type]
        share = max(min(sm_share, 1.0), 1e-3)
        bw = bandwidth_share(share, self.bw_saturation)
        if segment.resource is Resource.COMPUTE:
            t /= share
        elif segment.resource is Resource.MEMORY:
            t /= bw
        demand = _demand_for(segment.resource, share, bw)
        if segment.resource is Resource.MEMORY:
            demand = (("bw", bw),)  # synthetic memory ops leave the SMs entirely to others
        return Estimate(t, demand, segment.resource.value)

    def __repr__(self) -> str:
        return f"TableCost({len(self.table)} segments)"


class CombinedCost(CostModel):
    """Ask each model in turn; the first with an estimate wins (put measured before roofline)."""

    name = "combined"

    def __init__(self, *models: CostModel):
        self.models = tuple(m for m in models if m is not None)

    def estimate(self, segment: Segment, rows: int, sm_share: float = 1.0) -> Estimate | None:
        for m in self.models:
            est = m.estimate(segment, rows, sm_share)
            if est is not None and math.isfinite(est.seconds):
                return est
        return None

    def __repr__(self) -> str:
        return f"CombinedCost({', '.join(m.name for m in self.models)})"
