"""dynaflow.network: the link table and the ring / pairwise collective cost formulas."""

from __future__ import annotations

import doctest

import pytest

from dynaflow import network
from dynaflow.errors import ConfigError
from dynaflow.network import (LINKS, Link, all_gather_time, all_reduce_time, all_to_all_time, collective_time, link,
                              reduce_scatter_time)

MiB = 2**20


def test_docstring_examples():
    assert doctest.testmod(network).failed == 0


def test_link_table_values():
    assert LINKS["nvlink4"].bandwidth == 450e9
    assert LINKS["pcie5"].bandwidth == 64e9
    assert LINKS["ib_ndr"].bandwidth == 50e9  # 400 Gb/s
    assert all(l.latency > 0 for l in LINKS.values())
    assert repr(LINKS["nvlink4"]) == "Link('nvlink4', 450 GB/s, 2 µs)"


def test_all_reduce_ring_formula_by_hand():
    # 8 ranks: 14 steps of 8 MiB each at 450 GB/s, plus 14 latencies
    t = all_reduce_time(64 * MiB, 8, "nvlink4")
    assert t == pytest.approx(14 * 2e-6 + 14 * 8 * MiB / 450e9)


def test_one_rank_and_zero_bytes():
    for fn in (all_reduce_time, all_gather_time, reduce_scatter_time, all_to_all_time):
        assert fn(MiB, 1, "nvlink4") == 0.0
        assert fn(0, 4, "nvlink4") == pytest.approx((1 if fn is not all_reduce_time else 2) * 3 * 2e-6)


def test_all_reduce_is_reduce_scatter_plus_all_gather():
    for n in (2, 4, 8):
        ar = all_reduce_time(32 * MiB, n, "ib_ndr")
        assert ar == pytest.approx(reduce_scatter_time(32 * MiB, n, "ib_ndr") + all_gather_time(32 * MiB, n, "ib_ndr"))


def test_bandwidth_term_approaches_two_s_over_beta():
    big = 2**34
    t = all_reduce_time(big, 1024, LINKS["pcie5"].scaled(latency=0.0))
    assert t == pytest.approx(2 * big / 64e9, rel=2e-3)


def test_monotone_in_bytes_and_slower_links():
    assert all_to_all_time(2 * MiB, 4, "nvlink4") > all_to_all_time(MiB, 4, "nvlink4")
    assert all_reduce_time(MiB, 4, "ib_ndr") > all_reduce_time(MiB, 4, "pcie5") > all_reduce_time(MiB, 4, "nvlink4")


def test_scaled_link_and_custom_link():
    eff = LINKS["nvlink4"].scaled(0.8)
    assert eff.bandwidth == pytest.approx(360e9) and eff.latency == 2e-6
    mine = Link("mine", 100e9, 1e-6)
    assert all_gather_time(MiB, 2, mine) == pytest.approx(1e-6 + 0.5 * MiB / 100e9)


def test_collective_time_dispatch_accepts_op_names():
    for kind, fn in [("all_reduce", all_reduce_time), ("all_gather_into_tensor", all_gather_time),
                     ("reduce_scatter_tensor", reduce_scatter_time), ("all_to_all_single", all_to_all_time),
                     ("all_reduce_", all_reduce_time)]:
        assert collective_time(kind, MiB, 4, "nvlink4") == fn(MiB, 4, "nvlink4")


def test_errors_name_the_option_and_the_fix():
    with pytest.raises(ConfigError, match=r"Unknown link 'nvlink'\. Did you mean 'nvlink4'"):
        link("nvlink")
    with pytest.raises(ConfigError, match=r"world size must be an int >= 1; got 0"):
        all_reduce_time(MiB, 0, "nvlink4")
    with pytest.raises(ConfigError, match=r"nbytes must be >= 0"):
        all_gather_time(-1, 2, "nvlink4")
    with pytest.raises(ConfigError, match=r"No network cost formula for collective 'broadcast'"):
        collective_time("broadcast", MiB, 2, "nvlink4")
    with pytest.raises(ConfigError, match=r"bandwidth must be > 0"):
        Link("bad", 0, 1e-6)
