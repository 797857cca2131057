"""Multi-process tests on gloo (``pytest -m distributed``): tensor- and expert-parallel examples under every
strategy and 1–3 nano-batches equal the eager (non-split) distributed run on every rank; mismatched collective
orders are rejected before anything runs; ranks agree on the split.

Each case spawns its ranks once (``dist_harness.run_ranks``) and loops over strategies × nano counts inside
(``dist_worker.py``); every process group has a 60 s timeout and the harness kills the ranks after
``CASE_TIMEOUT`` seconds, so a bug fails the test instead of hanging CI.
"""

from __future__ import annotations

import pytest

from dist_harness import run_ranks

pytestmark = pytest.mark.distributed

CASE_TIMEOUT = 300.0


def _check(results: list[dict], world: int) -> None:
    assert len(results) == world
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_llama_matches_eager(world):
    _check(run_ranks("tp", world, CASE_TIMEOUT), world)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_moe_matches_eager(world):
    _check(run_ranks("moe", world, CASE_TIMEOUT), world)


def test_order_mismatch_rejected_and_ranks_agree():
    results = run_ranks("checks", 2, CASE_TIMEOUT)
    _check(results, 2)
    for r in results:
        msg = r["mismatch_message"]
        assert "'rank_skewed' ordered collectives differently on different ranks" in msg
        assert f"rank {r['rank']} issues" in msg and "comm_0[nb0]:all_reduce@0" in msg and "Fix:" in msg
        msg = r["shared_message"]
        assert "'round_robin' lets collectives on process group '0' run concurrently" in msg
        assert "comm_0[nb0]" in msg and "comm_0[nb1]" in msg and "lane_communicators=True" in msg
        assert r["agreed"] == "SplitConfig(6 → 3/3)"
