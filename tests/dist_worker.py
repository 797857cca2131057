"""One rank of a multi-process test (started by ``dist_harness.run_ranks``; not collected by pytest).

``python tests/dist_worker.py CASE`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and
``DIST_OUT`` (a JSON file this rank writes) in the environment. Each case loops over its strategies and nano
counts inside one process and reports failures as a list of strings, so a whole matrix costs one spawn.
Every process group has a short timeout: a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("DIST_PG_TIMEOUT", "60")))
STRATEGIES = ("sequential", "round_robin", "nanoflow", "two_batch_overlap")
NANOS = (1, 2, 3)


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _close(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """None when equal within float tolerance, else the max difference."""
    if a.shape != b.shape:
        return float("inf")
    return None if torch.allclose(a, b, rtol=1e-5, atol=1e-5) else (a - b).abs().max().item()


def _matrix(model: torch.nn.Module, inputs: list[torch.Tensor], label: str, **options: Any) -> list[str]:
    import dynaflow
    from dynaflow import distributed

    fails = []
    with torch.no_grad():
        refs = [model(x) for x in inputs]
        for strategy in STRATEGIES:
            for n in NANOS:
                torch._dynamo.reset()
                fast = dynaflow.compile(model, strategy=strategy, nano_batches=n, **options)
                for x, ref in zip(inputs, refs):
                    out = fast(x)
                    d = _close(out, ref)
                    if d is not None:
                        fails.append(f"{label} {strategy} n={n} batch={x.shape[0]}: max diff {d:.3g}")
                split = fast.program.split
                if split.num != min(n, min(x.shape[0] for x in inputs)):
                    fails.append(f"{label} {strategy} n={n}: planned {split}")
                text = fast.explain()
                if "collectives on process group(s) ['0']; split agreement on" not in text or \
                        (strategy == "round_robin" and split.num > 1 and "lane1: clone of group '0'" not in text):
                    fails.append(f"{label} {strategy} n={n}: explain() lacks the collectives line")
                lanes = {l.lane for s in fast.program.streams for l in s if hasattr(l, "lane") and l.segment.collectives}
                if strategy == "round_robin" and split.num > 1 and len(lanes) > 1 \
                        and not distributed.has_lane_group("0", "lane1"):
                    fails.append(f"{label} round_robin n={n}: lane1 issued collectives without its own communicator")
    return fails


def case_tp() -> dict[str, Any]:
    ex = _example("tensor_parallel_llama")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = ex.build(rank, world)
    fails = _matrix(model, [ex.make_input(6), ex.make_input(5, seed=2)], f"tp/w{world}")
    # in-place torch.distributed.all_reduce reaches the same network segments (Dynamo rewrites it)
    import dynaflow

    inplace = ex.build(rank, world, inplace=True)
    torch._dynamo.reset()
    with torch.no_grad():
        x = ex.make_input(6)
        out = dynaflow.compile(inplace, strategy="nanoflow", nano_batches=2)(x)
        d = _close(out, inplace(x))
    if d is not None:
        fails.append(f"tp/w{world} inplace all_reduce: max diff {d:.3g}")
    if world == 4:  # 2 data-parallel replicas × tensor parallel over 2: subgroups, clones made by members only
        fails.extend(_tp_subgroups(ex, rank))
    return {"fails": fails}


def _tp_subgroups(ex: Any, rank: int) -> list[str]:
    import dynaflow

    groups = [dist.new_group([0, 1], timeout=TIMEOUT), dist.new_group([2, 3], timeout=TIMEOUT)]
    mine = groups[rank // 2]
    model = ex.build(rank % 2, 2, group=mine)
    x = ex.make_input(6 if rank < 2 else 4, seed=3 + rank // 2)  # each replica its own batch
    fails = []
    with torch.no_grad():
        ref = model(x)
        for strategy in ("round_robin", "nanoflow"):
            torch._dynamo.reset()
            out = dynaflow.compile(model, strategy=strategy, nano_batches=2)(x)
            d = _close(out, ref)
            if d is not None:
                fails.append(f"tp subgroups {strategy}: max diff {d:.3g}")
    return fails


def case_moe() -> dict[str, Any]:
    ex = _example("expert_parallel_moe")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = ex.build(rank, world)
    fails = _matrix(model, [ex.make_input(6, rank), ex.make_input(4, rank, seed=5)], f"moe/w{world}")
    return {"fails": fails}


def case_checks() -> dict[str, Any]:
    """Ordering rejection, lane_communicators=False, split agreement."""
    import dynaflow
    from dynaflow import ScheduleError, distributed
    from dynaflow.ir import Lane, Schedule

    ex = _example("tensor_parallel_llama")
    moe = _example("expert_parallel_moe")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = ex.build(rank, world)
    x = ex.make_input(6)
    out: dict[str, Any] = {"fails": []}
    fails = out["fails"]

    class RankSkewed(dynaflow.Strategy):
        """Two lanes, but rank 1 orders them nano-major: a cross-rank collective order mismatch."""

        name = "rank_skewed"
        default_nano_batches = 2

        def plan(self, graph, split):  # type: ignore[no-untyped-def]
            ops = list(graph.ops)  # segment-major on rank 0, nano-major on rank 1: both valid locally
            if dist.get_rank() == 1:
                ops.sort(key=lambda op: (op.nano, graph.index(op.segment)))
            net = [op for op in ops if graph.segment(op).resource.value == "network"]
            rest = [op for op in ops if op not in net]
            return Schedule.from_lanes(self.name, split, {Lane("main"): rest, Lane("net"): net})

    with torch.no_grad():
        torch._dynamo.reset()
        fast = dynaflow.compile(model, strategy=RankSkewed(), nano_batches=2)
        try:
            fast(x)
            fails.append("rank-skewed collective order was not rejected")
        except ScheduleError as exc:
            out["mismatch_message"] = str(exc)
            if fast.graphs and fast.graphs[0].calls:
                fails.append("the mismatched program ran before it was rejected")

        # one communicator for all lanes: round_robin's concurrent collectives are rejected locally
        torch._dynamo.reset()
        fast = dynaflow.compile(model, strategy="round_robin", nano_batches=2,
                                config={"lane_communicators": False})
        try:
            fast(x)
            fails.append("concurrent collectives on one communicator were not rejected")
        except ScheduleError as exc:
            out["shared_message"] = str(exc)
        # ... while nanoflow (one network lane) is fine with one communicator
        torch._dynamo.reset()
        fast = dynaflow.compile(model, strategy="nanoflow", nano_batches=3, config={"lane_communicators": False})
        d = _close(fast(x), model(x))
        if d is not None:
            fails.append(f"nanoflow with shared communicator: max diff {d:.3g}")

        # ranks propose different nano counts: they agree on the smallest
        torch._dynamo.reset()
        fast = dynaflow.compile(model, strategy="nanoflow", nano_batches=2 + rank % 2)
        d = _close(fast(x), model(x))
        out["agreed"] = repr(fast.program.split)
        if fast.program.split.num != 2 or d is not None:
            fails.append(f"proposals {2 + rank % 2} agreed on {fast.program.split} (diff {d})")

        # direct: a rank that cannot split forces 1; equal batches with different sizes take the even split
        from dynaflow.ir import SplitConfig

        got = distributed.agree_split(SplitConfig.even(4, 2) if rank else SplitConfig((1,)))
        if got.num != 1:
            fails.append(f"agree_split with one rank unable to split gave {got}")
        got = distributed.agree_split(SplitConfig((4, 2)) if rank == 0 else SplitConfig((3, 3)))
        if got != SplitConfig((3, 3)):
            fails.append(f"agree_split with equal batches, different sizes gave {got}")

        # data-parallel style proposals: each rank its own batch, the nano count agreed, sizes kept per rank
        got = distributed.agree_split(SplitConfig.even(6, 3) if rank == 0 else SplitConfig.even(4, 2))
        want = SplitConfig.even(6, 2) if rank == 0 else SplitConfig.even(4, 2)
        if got != want:
            fails.append(f"agree_split with different batches gave {got}, want {want}")

        # batch sizes changing per call: agreement every call, plans cached per split, lanes' communicators reused
        em = moe.build(rank, world)
        torch._dynamo.reset()
        fast = dynaflow.compile(em, strategy="round_robin", nano_batches=2 + rank % 2)
        for step, b in enumerate([6, 4, 6, 5]):
            xb = moe.make_input(b, rank, seed=step)
            d = _close(fast(xb), em(xb))
            want_n = min(2, b)
            if d is not None or fast.program.split.num != want_n:
                fails.append(f"moe step {step} batch {b}: {fast.program.split} (want {want_n} nano-batches), diff {d}")
        # all_gather / reduce_scatter along the batch dim move rows between ranks: barriers, still equal to eager
        import torch.distributed._functional_collectives as fc

        w = torch.randn(8, 8, generator=torch.Generator().manual_seed(rank))

        def gather_scatter(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(xb @ w)
            g = fc.all_gather_tensor(h, 0, dist.group.WORLD) * 2
            r = fc.reduce_scatter_tensor(h, "sum", 0, dist.group.WORLD) + 1
            return g, r

        xb = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 + rank))
        want = gather_scatter(xb)
        for strategy in ("nanoflow", "round_robin"):
            torch._dynamo.reset()
            fast = dynaflow.compile(gather_scatter, strategy=strategy, nano_batches=2)
            got = fast(xb)
            kinds = {s.kind.value for g in fast.graphs for s in g.segmented.segments if s.collectives}
            if any(_close(a, b) is not None for a, b in zip(got, want)) or kinds != {"barrier"}:
                fails.append(f"all_gather/reduce_scatter {strategy}: kinds {kinds}, diffs "
                             f"{[_close(a, b) for a, b in zip(got, want)]}")

        # lane communicators inherit the group's timeout (a hung collective fails instead of hanging)
        clone = distributed.resolve_group(distributed.lane_group("0", "lane1"))
        if distributed._timeout_of(clone) != TIMEOUT:
            fails.append(f"lane1's communicator has timeout {distributed._timeout_of(clone)}, want {TIMEOUT}")
    return out


class GlobalNorm(torch.nn.Module):
    """Linear, scale by the RMS over every rank's tokens (an all_reduce of a scalar: ranks may hold different
    batch sizes, as data-parallel replicas do), linear."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as fc

        h = torch.relu(self.a(x))
        total = fc.all_reduce(h.square().sum(), "sum", dist.group.WORLD)
        return self.b(h / total.sqrt())


def case_auto() -> dict[str, Any]:
    """``strategy="auto"`` across ranks: the search runs in lockstep, winners are the same on every rank, and
    ranks in different tuning buckets run that step sequentially instead of tuning alone."""
    import dynaflow
    from dynaflow.cost import TableCost
    from dynaflow.strategies.auto import Auto

    ex = _example("tensor_parallel_llama")
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {"fails": []}
    fails = out["fails"]
    auto = lambda k: Auto(max_nano_batches=3, measure_top_k=k, repeats=1, cache=False)  # noqa: E731
    # costs superlinear in rows: splitting is predicted to pay, so split candidates (with their collectives)
    # are planned, predicted and measured on both ranks together
    config = {"cost": TableCost({}, default=lambda rows: 1e-4 * rows ** 2)}
    with torch.no_grad():
        model = ex.build(rank, world)
        torch._dynamo.reset()
        fast = dynaflow.compile(model, strategy=auto(2), config=config)
        for batch in (6, 5, 8):
            x = ex.make_input(batch, seed=batch)
            d = _close(fast(x), model(x))
            if d is not None:
                fails.append(f"auto tp batch {batch}: max diff {d:.3g}")
        graph = fast.last_graph
        out["tp_tuned"] = {k: repr(r.winner.candidate) for k, r in graph.tuned.items()}
        out["tp_measured"] = sorted(repr(t.candidate) for r in graph.tuned.values() for t in r.trials if t.measured)
        out["tp_splits"] = [repr(p.split) for p in graph.plans.values()]

        torch._dynamo.reset()
        norm = GlobalNorm().eval()
        fast = dynaflow.compile(norm, strategy=auto(0), config=config)  # by prediction: a split wins
        batches = [(6, 3), (6, 7), (7, 6), (5, 8)]  # step 0: buckets rows<=8 vs rows<=4
        for step, per_rank in enumerate(batches):
            x = torch.randn(per_rank[rank], 8, generator=torch.Generator().manual_seed(100 * step + rank))
            d = _close(fast(x), norm(x))
            if d is not None:
                fails.append(f"auto global-norm step {step} batch {x.shape[0]}: max diff {d:.3g}")
            if step == 0 and fast.last_graph.last_plan.split.num != 1:
                fails.append(f"ranks in different buckets must run sequentially, got {fast.last_graph.last_plan.split}")
        out["norm_tuned"] = {k: repr(r.winner.candidate) for k, r in fast.last_graph.tuned.items()}
        out["norm_tuned_on"] = {k: r.tuned_on for k, r in fast.last_graph.tuned.items()}
        out["norm_last_split"] = fast.last_graph.last_plan.split.num
    return out


def _edge(label: str, fails: list[str], model: Any, xs: list[torch.Tensor], expect: str | None = None,
          grad_steps: tuple[int, ...] = (), **options: Any) -> None:
    """Run ``model`` through dynaflow on this rank's inputs ``xs`` (one call each) against eager; ``expect``: the
    DynaflowError class name every call must raise instead (never a hang, never a raw error); ``grad_steps``: the
    calls this rank makes with autograd on (the others under ``no_grad``)."""
    import dynaflow

    torch._dynamo.reset()
    fast = dynaflow.compile(model, **options)
    for step, x in enumerate(xs):
        with torch.set_grad_enabled(step in grad_steps):
            want = model(x)
            try:
                got = fast(x)
            except dynaflow.DynaflowError as exc:
                if expect is None or type(exc).__name__ != expect:
                    fails.append(f"{label} step {step}: {type(exc).__name__}: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - a raw error is the failure this reports
                fails.append(f"{label} step {step}: raw {type(exc).__name__}: {exc}")
                return
            if expect is not None:
                fails.append(f"{label} step {step}: ran, where {expect} was expected")
                return
            d = _close(got, want)
            if d is not None:
                fails.append(f"{label} step {step}: max diff {d:.3g}")
            if got.requires_grad != want.requires_grad:
                fails.append(f"{label} step {step}: requires_grad {got.requires_grad}, eager's {want.requires_grad}")


def case_edges() -> dict[str, Any]:
    """What ranks may differ in and eager takes: a view of a tensor reduced in place, a reduce_scatter along
    dim 1 (torch names a node ``self``), one rank holding a batch of one or of none, one rank recording autograd
    or in another grad mode (a graph it alone captures), a graph one rank alone recaptures, rank-specific groups,
    and the per-rank mistakes that must fail on every rank rather than hang."""
    import torch.distributed._functional_collectives as fc
    from dynaflow.strategies.nanoflow import NanoFlow

    rank, world = dist.get_rank(), dist.get_world_size()
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(rank)) * 0.3
    world_group = dist.group.WORLD
    fails: list[str] = []

    def view_of_reduced(x):
        h = torch.relu(x @ w)
        v = h.view(-1, 2, 4)  # taken before the in-place all_reduce: it sees the sum
        dist.all_reduce(h)
        return v + 0

    def scatter_dim1(x):
        return fc.reduce_scatter_tensor(torch.relu(x @ w), "sum", 1, world_group) + 1

    def two_reduces(x):
        h = fc.all_reduce(torch.relu(x @ w), "sum", world_group)
        return fc.all_reduce(torch.tanh(h @ w), "sum", world_group) + h

    def global_norm(x):
        h = torch.relu(x @ w)
        return h / fc.all_reduce(h.square().sum(), "sum", world_group).sqrt()

    own = [dist.new_group([r], timeout=TIMEOUT) for r in range(world)][rank]  # a group name of its own per rank

    def own_then_world(x):
        h = fc.all_reduce(torch.relu(x @ w), "sum", own)
        return fc.all_reduce(torch.tanh(h @ w), "sum", world_group) + h

    x6 = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    for strategy in ("sequential", "nanoflow"):
        _edge(f"view of reduced {strategy}", fails, view_of_reduced, [x6], strategy=strategy, nano_batches=2)
        _edge(f"reduce_scatter dim 1 {strategy}", fails, scatter_dim1, [x6[:4]], strategy=strategy, nano_batches=2)
        _edge(f"rank-specific groups {strategy}", fails, own_then_world, [x6], strategy=strategy, nano_batches=2)
    _edge("batch 1 on one rank", fails, global_norm, [torch.randn([6, 1][rank], 8)], strategy="nanoflow")
    lin = torch.nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(w)

    def param_norm(x):  # weights that require grad: a call with autograd on records, and runs unsplit
        h = torch.relu(lin(x))
        return h / fc.all_reduce(h.square().sum(), "sum", world_group).sqrt()

    for strategy, nano in (("nanoflow", 2), ("round_robin", 3), ("auto", None)):
        _edge(f"batch 0 on one rank {strategy}", fails, global_norm, [x6, x6[:0] if rank else x6, x6, x6[:0]],
              strategy=strategy, nano_batches=nano)
        _edge(f"autograd on one rank {strategy}", fails, param_norm, [x6, x6, x6], grad_steps=(1,) if rank else (),
              strategy=strategy, nano_batches=nano)
        _edge(f"grad mode on one rank {strategy}", fails, global_norm, [x6, x6, x6], grad_steps=(1,) if rank else (),
              strategy=strategy, nano_batches=nano)
    column_major = x6[:4].t().contiguous().t()  # same values; rank 1 alone captures a graph for its strides
    _edge("a graph one rank recaptures", fails, two_reduces, [x6[:4], column_major if rank else x6[:4]],
          strategy="nanoflow", nano_batches=2)
    _edge("per-rank stage splits", fails, two_reduces, [x6[:2], x6],
          strategy=NanoFlow(nano_batches=2, stage_nano_batches={"network": 2 + rank}))
    _edge("per-rank lanes", fails, two_reduces, [x6], strategy=["nanoflow", "round_robin"][rank % 2], nano_batches=2,
          expect="ScheduleError")
    _edge("one rank's split refused", fails, global_norm, [x6 if rank == 0 else x6[:1]], nano_batches=2,
          strategy="nanoflow", expect="ScheduleError" if rank == 0 else "ConfigError")
    return {"fails": fails}


CASES: dict[str, Callable[[], dict[str, Any]]] = {"tp": case_tp, "moe": case_moe, "checks": case_checks,
                                                  "auto": case_auto, "edges": case_edges}


def main() -> None:
    case = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    t0 = time.perf_counter()
    try:
        result = CASES[case]()
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        result = {"fails": [f"rank {dist.get_rank()} raised:\n{traceback.format_exc()}"]}
    result["rank"] = dist.get_rank()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    Path(os.environ["DIST_OUT"]).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
