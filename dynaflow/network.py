"""Network cost of collectives: a link table and the standard ring / pairwise formulas (the α–β model).

A collective over ``n`` ranks runs in steps; each step pays the link latency ``α`` and moves a chunk at the
link bandwidth ``β`` (bytes per second, per direction, per GPU). With ``S`` the message size in bytes:

=====================  =======================================  ===========================================
collective             ``S`` is                                 time
=====================  =======================================  ===========================================
all_reduce (ring)      the tensor on each rank                  ``2(n-1)·α + 2(n-1)/n · S/β``
all_gather (ring)      the gathered output (n × each input)     ``(n-1)·α + (n-1)/n · S/β``
reduce_scatter (ring)  the input on each rank (n × the output)  ``(n-1)·α + (n-1)/n · S/β``
all_to_all (pairwise)  all a rank sends, its own block included ``(n-1)·α + (n-1)/n · S/β``
=====================  =======================================  ===========================================

One rank (``n = 1``) costs nothing. Worked example — all-reduce of 64 MiB over 8 H100s on NVLink 4
(450 GB/s, 2 µs per step): ``14·2 µs + 2·7/8 · 67108864 B / 450e9 B/s = 28 µs + 261 µs ≈ 0.289 ms``::

    >>> round(all_reduce_time(64 * 2**20, 8, "nvlink4") * 1e3, 3)
    0.289

The bandwidths are per-direction peaks; measured NCCL bus bandwidth is typically 70–90% of them, and the
latencies are order-of-magnitude per-step costs. The simulator may scale both with ``Link.scaled``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dynaflow.errors import ConfigError, did_you_mean

__all__ = ["Link", "LINKS", "link", "all_reduce_time", "all_gather_time", "reduce_scatter_time", "all_to_all_time",
           "collective_time"]


@dataclass(frozen=True)
class Link:
    """One interconnect: ``bandwidth`` in bytes/s per direction per GPU, ``latency`` in seconds per step."""

    name: str
    bandwidth: float
    latency: float
    note: str = ""

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or self.latency < 0:
            raise ConfigError(f"Link {self.name!r}: bandwidth must be > 0 and latency >= 0; got "
                              f"bandwidth={self.bandwidth!r}, latency={self.latency!r}.")

    def scaled(self, efficiency: float = 1.0, latency: float | None = None) -> "Link":
        """This link at ``efficiency`` × its peak bandwidth (e.g. 0.8 for measured NCCL bus bandwidth)."""
        return dataclasses.replace(self, bandwidth=self.bandwidth * efficiency,
                                   latency=self.latency if latency is None else latency)

    def __repr__(self) -> str:
        return f"Link({self.name!r}, {self.bandwidth / 1e9:g} GB/s, {self.latency * 1e6:g} µs)"


LINKS: dict[str, Link] = {
    "nvlink4": Link("nvlink4", 450e9, 2e-6, "NVLink 4 (H100/H200 SXM): 18 links, 900 GB/s both directions"),
    "pcie5": Link("pcie5", 64e9, 5e-6, "PCIe Gen5 x16: ~64 GB/s per direction"),
    "ib_ndr": Link("ib_ndr", 50e9, 5e-6, "InfiniBand NDR 400 Gb/s per GPU NIC = 50 GB/s"),
}
"""The built-in links by name."""


def link(spec: Link | str) -> Link:
    """A :class:`Link` from itself or its name in :data:`LINKS`."""
    if isinstance(spec, Link):
        return spec
    if isinstance(spec, str) and spec in LINKS:
        return LINKS[spec]
    raise ConfigError(f"Unknown link {spec!r}.{did_you_mean(str(spec), LINKS)} Known links: {', '.join(LINKS)}; "
                      "or pass a dynaflow.network.Link(name, bandwidth_bytes_per_s, latency_s).")


def _check(nbytes: float, world: int, what: str) -> None:
    if not isinstance(world, int) or world < 1:
        raise ConfigError(f"{what}: world size must be an int >= 1; got {world!r}.")
    if nbytes < 0:
        raise ConfigError(f"{what}: nbytes must be >= 0; got {nbytes!r}.")


def _ring(nbytes: float, world: int, spec: Link | str, rounds: int, what: str) -> float:
    _check(nbytes, world, what)
    if world == 1:
        return 0.0
    ln = link(spec)
    steps = rounds * (world - 1)
    return steps * ln.latency + steps / world * nbytes / ln.bandwidth


def all_reduce_time(nbytes: float, world: int, spec: Link | str) -> float:
    """Ring all-reduce of an ``nbytes`` tensor: ``2(n-1)·α + 2(n-1)/n · S/β`` seconds.

    >>> round(all_reduce_time(64 * 2**20, 8, "nvlink4") * 1e3, 3)  # 64 MiB, 8 GPUs, NVLink 4
    0.289
    >>> round(all_reduce_time(64 * 2**20, 2, "pcie5") * 1e3, 3)   # 64 MiB, 2 GPUs over PCIe Gen5
    1.059
    """
    return _ring(nbytes, world, spec, 2, "all_reduce_time")


def all_gather_time(nbytes: float, world: int, spec: Link | str) -> float:
    """Ring all-gather producing ``nbytes`` in total: ``(n-1)·α + (n-1)/n · S/β`` seconds.

    >>> round(all_gather_time(8 * 2**20, 4, "ib_ndr") * 1e6, 1)  # gather 8 MiB over 4 nodes on NDR
    140.8
    """
    return _ring(nbytes, world, spec, 1, "all_gather_time")


def reduce_scatter_time(nbytes: float, world: int, spec: Link | str) -> float:
    """Ring reduce-scatter of an ``nbytes`` input (each rank keeps ``S/n``): same cost as all-gather.

    >>> reduce_scatter_time(2**20, 4, "nvlink4") == all_gather_time(2**20, 4, "nvlink4")
    True
    """
    return _ring(nbytes, world, spec, 1, "reduce_scatter_time")


def all_to_all_time(nbytes: float, world: int, spec: Link | str) -> float:
    """Pairwise all-to-all where each rank sends ``nbytes`` in total (``S/n`` to each rank, its own block
    included, which does not cross the link): ``(n-1)·α + (n-1)/n · S/β`` seconds.

    >>> round(all_to_all_time(16 * 2**20, 8, "nvlink4") * 1e6, 1)  # MoE dispatch, 16 MiB per rank, 8 GPUs
    46.6
    """
    return _ring(nbytes, world, spec, 1, "all_to_all_time")


_BY_KIND = {
    "all_reduce": all_reduce_time, "all_gather": all_gather_time, "all_gather_into_tensor": all_gather_time,
    "reduce_scatter": reduce_scatter_time, "reduce_scatter_tensor": reduce_scatter_time,
    "all_to_all": all_to_all_time, "all_to_all_single": all_to_all_time,
}


def collective_time(kind: str, nbytes: float, world: int, spec: Link | str) -> float:
    """Dispatch on a collective's name (``"all_reduce"`` or its ``_c10d_functional`` op name).

    >>> collective_time("all_reduce", 2**20, 8, "nvlink4") == all_reduce_time(2**20, 8, "nvlink4")
    True
    """
    fn = _BY_KIND.get(kind.rstrip("_"))
    if fn is None:
        raise ConfigError(f"No network cost formula for collective {kind!r}.{did_you_mean(kind, _BY_KIND)} "
                          f"Known: {', '.join(sorted(_BY_KIND))}.")
    return fn(nbytes, world, spec)
