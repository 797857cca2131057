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


def test_autotune_runs_in_lockstep_and_every_rank_picks_the_same_winner():
    results = run_ranks("auto", 2, CASE_TIMEOUT)
    _check(results, 2)
    r0, r1 = sorted(results, key=lambda r: r["rank"])
    assert r0["tp_tuned"] == r1["tp_tuned"] and list(r0["tp_tuned"]) == ["rows<=8"]
    assert r0["tp_splits"] == r1["tp_splits"]
    # the best 2, sequential and eager (the captured graph as is: the floor, measured in lockstep too)
    assert r0["tp_measured"] == r1["tp_measured"] and len(r0["tp_measured"]) == 4 and "eager()" in r0["tp_measured"]
    # step 0 (buckets differ) tunes nothing; step 1 tunes rows<=8 on both ranks, on each rank's own batch
    assert r0["norm_tuned"] == r1["norm_tuned"] and list(r0["norm_tuned"]) == ["rows<=8"]
    assert r0["norm_tuned_on"] == {"rows<=8": 6} and r1["norm_tuned_on"] == {"rows<=8": 7}
    assert r0["norm_tuned"]["rows<=8"] != "sequential()"  # by prediction a split wins, and later steps run it
    assert r0["norm_last_split"] == r1["norm_last_split"] > 1


def test_ranks_that_differ_equal_eager_or_fail_together():
    """A view of a tensor reduced in place, a reduce_scatter along dim 1, a batch of one or of none on one rank,
    autograd on one rank, a graph one rank alone recaptures, per-rank stage splits and group names: eager's answer on every rank; per-rank
    lanes or a split one rank refuses: an error on every rank, never a hang."""
    _check(run_ranks("edges", 2, CASE_TIMEOUT), 2)
