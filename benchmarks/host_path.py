"""Where a dynaflow step's host time goes, next to eager and Dynamo alone (issue 13's floor diagnosis).

The GPU-floor benchmark times each call with CUDA events and a sync after it, as a decode loop that reads its
tokens does: host time spent before the first kernel (or the graph replay) reaches the GPU is time the step
waits. This script measures, on workload (a) (dense decode), per configuration:

* ``gpu_ms``: the floor benchmark's timing (``floor_measure.median_ms``: events around one call, sync after);
* ``host_us``: host time to issue one call on an idle GPU (``perf_counter`` around the call, no sync inside);
* ``pre_replay_us``: for a graphed call, host time from its start to its first graph replay: what the GPU waits
  for (the rest of the call overlaps the replayed work);
* the CUDA runtime calls one steady call makes (``torch.profiler``: graph launches, kernel launches, memcpys,
  event records, syncs), the caching allocator's counters per call (``torch.cuda.memory_stats``: a
  ``cudaMalloc`` per step shows as ``num_device_alloc``) and the top host functions of 200 calls (``cProfile``).

    python benchmarks/host_path.py --out host_path.json          # on a GPU (≈ 1 minute)
    python benchmarks/host_path.py --dry-run --out /tmp/hp.json  # tiny sizes on CPU: the plumbing
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import statistics
import sys
import time
import traceback
from collections import Counter
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import workloads  # noqa: E402
from _results import provenance, write  # noqa: E402
from floor_measure import median_ms  # noqa: E402

log = logging.getLogger("host_path")


def _host_us(fn: Callable[[], Any], cuda: bool, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(times)


def _pre_replay_us(fn: Callable[[], Any], cuda: bool, graph_cls: Any = None, repeats: int = 30) -> float | None:
    """Host time from the call's start to its first CUDA-graph replay (``graph_cls.replay``, patched to stamp
    the time), median over ``repeats`` calls on an idle GPU: the part of a graphed step's host path the GPU
    waits for. The rest of the call overlaps the replayed work. ``None`` for a call that replays no graph."""
    cls = graph_cls if graph_cls is not None else (torch.cuda.CUDAGraph if cuda else None)
    if cls is None:
        return None
    stamps: list[float] = []
    real = cls.replay

    def replay(self: Any, *a: Any, **k: Any) -> Any:
        stamps.append(time.perf_counter())
        return real(self, *a, **k)

    cls.replay = replay
    times = []
    try:
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            stamps.clear()
            t = time.perf_counter()
            fn()
            if stamps:
                times.append((stamps[0] - t) * 1e6)
    finally:
        cls.replay = real
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(times) if times else None


def _runtime_calls(fn: Callable[[], Any], cuda: bool, calls: int = 3) -> dict[str, float]:
    """CUDA runtime / driver calls per step, by name (``cuda*`` / ``cu*`` host events of the profiler)."""
    if not cuda:
        return {}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    count: Counter[str] = Counter()
    for e in prof.events():
        if e.name.startswith(("cuda", "cu")) or "Memcpy" in e.name or "memcpy" in e.name:
            count[e.name] += 1
    return {k: v / calls for k, v in count.most_common(20)}


_ALLOCATOR_STATS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "allocation.all.allocated",
                    "segment.all.allocated")


def _allocator_calls(fn: Callable[[], Any], cuda: bool, calls: int = 20) -> dict[str, float]:
    """The caching allocator's counters per steady step (``torch.cuda.memory_stats``): a step that reaches
    ``cudaMalloc`` (``num_device_alloc``) instead of the allocator's cache shows here without the profiler."""
    if not cuda:
        return {}
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    return {k: (after.get(k, 0) - before.get(k, 0)) / calls for k in _ALLOCATOR_STATS}


def _top_functions(fn: Callable[[], Any], calls: int = 200, top: int = 30) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()[-6000:]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "host_path.json"))
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    import dynaflow

    w = workloads.dense_decode(args.layers, tiny=not cuda, device=device, dtype=dtype)
    executor = "cuda" if cuda else "serial"

    def memo_backend(gm: torch.fx.GraphModule, _: Any) -> Callable[..., Any]:
        return gm.forward

    configs: dict[str, Callable[[], Callable[[], Any]]] = {
        "eager": lambda: (lambda: w.model(*w.inputs)),
        "Dynamo alone (graph as is)": lambda: (lambda c=torch.compile(w.model, backend=memo_backend): c(*w.inputs)),
        "dynaflow eager strategy": lambda: (lambda c=dynaflow.compile(w.model, strategy="eager", executor=executor):
                                            c(*w.inputs)),
        "dynaflow sequential": lambda: (lambda c=dynaflow.compile(w.model, strategy="sequential", nano_batches=1,
                                                                  executor=executor): c(*w.inputs)),
    }
    if cuda:
        def graphed() -> Callable[[], Any]:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    w.model(*w.inputs)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                w.model(*w.inputs)
            return g.replay

        configs["eager graph"] = graphed
        for copy in (True, False):
            configs[f"dynaflow sequential +graphs copy_outputs={copy}"] = (
                lambda copy=copy: (lambda c=dynaflow.compile(w.model, strategy="sequential", nano_batches=1,
                                                              executor="cuda", config={"cuda_graphs": True,
                                                                                       "copy_outputs": copy}):
                                   c(*w.inputs)))
    rows = []
    with torch.no_grad():
        for name, make in configs.items():
            rec: dict[str, Any] = {"config": name}
            try:
                torch._dynamo.reset()
                fn = make()
                for _ in range(5):
                    fn()
                rec["gpu_ms"] = median_ms(fn, repeats=30, warmup=0, cuda=cuda)  # the floor benchmark's timing
                rec["host_us"] = _host_us(fn, cuda)
                rec["pre_replay_us"] = _pre_replay_us(fn, cuda)
                rec["runtime_calls_per_step"] = _runtime_calls(fn, cuda)
                rec["allocator_per_step"] = _allocator_calls(fn, cuda)
                rec["top_functions"] = _top_functions(fn, 100 if cuda else 20)
            except Exception as exc:  # noqa: BLE001 - one failing config is recorded, the others still run
                rec["error"] = f"{type(exc).__name__}: {exc}"
                rec["traceback"] = traceback.format_exc()[-3000:]
            rows.append(rec)
            pre = rec.get("pre_replay_us")
            log.info("%-48s gpu %8s ms  host %8s us  before the replay %8s us  %s", name,
                     f"{rec.get('gpu_ms', float('nan')):.3f}", f"{rec.get('host_us', float('nan')):.1f}",
                     "-" if pre is None else f"{pre:.1f}", rec.get("error", ""))
            if rec.get("runtime_calls_per_step"):
                log.info("    runtime calls/step: %s", rec["runtime_calls_per_step"])
                log.info("    allocator/step: %s", rec["allocator_per_step"])
    report = provenance("host_path", dry_run=args.dry_run, workload=w.description, rows=rows)
    write(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
