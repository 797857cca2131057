"""Host time of one call of a tiny model through each path dynaflow offers, next to eager and Dynamo alone.

The model is small enough (a 3-layer MLP on a batch of 4) that a call measures the front end, not the math:
what a launch-bound step pays on every call. Paths, timed interleaved in one process (median of ``--repeats``
rounds of ``--calls`` calls each):

* ``eager`` — the module called directly;
* ``torch.compile eager`` — Dynamo's guards and frame around the same ops (``backend="eager"``);
* ``dynaflow eager`` — ``strategy="eager"``: after its first call the model runs itself, skipping Dynamo;
* ``dynaflow auto`` — ``auto`` on the serial executor; on a model this small its floor (the captured graph as
  is) wins, so it takes the same path;
* ``dynaflow sequential`` — a planned program on the serial executor (Dynamo, planning lookup, step loop).

Further tables: Inductor-compiled decode steps without graphs (``torch.compile`` against dynaflow's
``inductor=True``, its runs fused and segment by segment), and a graphed step's host path. The decode table
times greedy decoding of a tiny transformers Llama (4 layers, hidden 64, batch 4, static cache)
per generated token: eager ``generate`` against the same ``generate`` through the transformers hook. Each
step writes its inputs (the KV cache) in place, so it also pays the per-call check that no written input
overlaps another one.

    python benchmarks/call_overhead.py          # writes benchmarks/results/call_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _results import provenance, run_main  # noqa: E402


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()


def runners(m: torch.nn.Module) -> dict[str, Callable[..., Any]]:
    import dynaflow
    from dynaflow.strategies.auto import Auto

    return {
        "eager": m,
        "torch.compile eager": torch.compile(m, backend="eager"),
        "dynaflow eager": dynaflow.compile(m, strategy="eager", executor="serial"),
        "dynaflow auto": dynaflow.compile(m, strategy=Auto(cache=False, repeats=3), executor="serial"),
        "dynaflow sequential": dynaflow.compile(m, strategy="sequential", executor="serial"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    m = model()
    x = torch.randn(4, 64)
    paths = runners(m)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        ref = m(x)
        for name, fn in paths.items():
            for _ in range(20):  # compile, tune, warm
                out = fn(x)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        for _ in range(args.repeats):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn(x)
                samples[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    rows = [{"path": name, "median_us": statistics.median(v), "min_us": min(v)} for name, v in samples.items()]
    eager = rows[0]["median_us"]
    for r in rows:
        r["over_eager_us"] = r["median_us"] - eager
    direct = {name: getattr(fn, "direct_calls", None) for name, fn in paths.items()}
    report = {**provenance("call_overhead", dry_run=bool(args.dry_run)), "model": "Linear(64,64)-GELU-Linear(64,64), "
              "batch 4, fp32, no_grad", "calls": args.calls, "repeats": args.repeats, "rows": rows,
              "direct_calls": direct}
    if importlib.util.find_spec("transformers") is not None:
        report["decode"] = {"model": "LlamaForCausalLM 4 layers, hidden 64, batch 4, prompt 8, static cache, greedy",
                            "tokens": args.tokens, "repeats": args.decode_repeats, "rows": decode_rows(args)}
        report["graphed_step"] = {"model": "workload (c) at tiny size: LlamaForCausalLM 2 (and 32) layers, "
                                  "hidden 64, StaticCache, one decode step", "calls": args.calls, "repeats": args.repeats,
                                  "rows": graphed_rows(args)}
        report["inductor_step"] = {"model": "workload (c) at tiny size: LlamaForCausalLM 2 layers, hidden 64, "
                                   "StaticCache, one decode step at batch 1, serial executor (no graphs)",
                                   "calls": args.calls // 5, "repeats": args.repeats, "rows": inductor_rows(args)}
    width = max(len(r["path"]) for r in rows)
    print("\n".join([f"{'path':<{width}}  {'µs/call':>8}  {'over eager':>10}"] +  # noqa: T201 - the table
                    [f"{r['path']:<{width}}  {r['median_us']:8.1f}  {r['over_eager_us']:10.1f}" for r in rows]))
    return report


def decode_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-token time of greedy ``generate`` on a tiny Llama, eager and through the transformers hook."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dynaflow.integrations import transformers as df_hf

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    lm = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(2, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    new = args.tokens

    def generate() -> torch.Tensor:
        return lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, cache_implementation="static", pad_token_id=0)

    paths = {"eager generate": {}, "dynaflow sequential, 1 nano-batch": dict(strategy="sequential", nano_batches=1),
             "dynaflow nanoflow, 2 nano-batches": dict(strategy="nanoflow", nano_batches=2)}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    hooks: dict[str, Any] = {}
    with torch.no_grad():
        ref = generate()
        for name, options in paths.items():  # capture and warm every path once, checking the tokens
            if options:
                hooks[name] = df_hf.enable(lm, executor="serial", **options)
            try:
                assert torch.equal(generate(), ref), name
            finally:
                df_hf.disable(lm)
        for _ in range(args.decode_repeats):
            for name in paths:
                hook = hooks.get(name)
                if hook is not None:
                    hook.install()  # the same hook each time: its graphs are captured once
                try:
                    t0 = time.perf_counter()
                    generate()
                    samples[name].append((time.perf_counter() - t0) / new * 1e6)
                finally:
                    if hook is not None:
                        hook.remove()
    rows = [{"path": name, "median_us_per_token": statistics.median(v), "min_us_per_token": min(v)}
            for name, v in samples.items()]
    for r in rows:
        r["over_eager_us"] = r["median_us_per_token"] - rows[0]["median_us_per_token"]
    width = max(len(r["path"]) for r in rows)
    print("\n".join([f"{'decode path':<{width}}  {'µs/token':>8}  {'over eager':>10}"] +  # noqa: T201 - the table
                    [f"{r['path']:<{width}}  {r['median_us_per_token']:8.1f}  {r['over_eager_us']:10.1f}"
                     for r in rows]))
    return rows


def graphed_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Host time of one CUDA-graphed decode step (the GPU-floor benchmark's workload (c) path: the transformers
    hook, ``executor="cuda"``, ``cuda_graphs=True``) with torch.cuda faked on CPU and the replay itself a
    no-op: what dynaflow's front end and step cost the host before and after the replay, which on a GPU is time
    a launch-bound step waits. Next to it, Dynamo alone on the same model (a backend that replays a memo): the
    guards and frame every torch.compile path pays, ``reduce-overhead`` included."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import fake_cuda
    import workloads
    from dynaflow.integrations import transformers as df_hf

    rows = []
    for batch, layers in ((1, 2), (4, 2), (1, 32)):  # 32 layers: Llama-8B's count of weight tensors and caches
        w = workloads.hf_decode(batch, tiny=True, device="cpu", dtype=torch.float32, layers=layers)

        stamps: list[float] = []  # when each call reached its replay (the memo, for Dynamo alone)

        def memo_backend(gm: torch.fx.GraphModule, _: Any) -> Callable[..., Any]:
            memo: list[Any] = []
            return lambda *a: stamps.append(time.perf_counter()) or (
                memo[0] if memo else memo.append(gm(*a)) or memo[0])

        compiled = torch.compile(w.model, backend=memo_backend, dynamic=None)
        floor = lambda *a, **k: compiled(*a, **k)  # noqa: E731 - Workload.step tests its fn for truth
        paths: dict[str, Any] = {"Dynamo alone (memo backend)": None, "dynaflow sequential +graphs": "sequential",
                                 "dynaflow nanoflow +graphs": "nanoflow"}
        hooks: dict[str, Any] = {}
        with torch.no_grad(), fake_cuda.faked_cuda():
            ref = w.step()
            for name, strategy in paths.items():  # capture (fake replay re-runs the launches) and check once
                if strategy is not None:
                    hooks[name] = df_hf.enable(w.model, strategy=strategy, nano_batches=NANO[strategy, batch],
                                               executor="cuda", config={"cuda_graphs": True})
                try:
                    for _ in range(4):
                        out = w.step() if strategy is not None else w.step(floor)
                    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
                finally:
                    df_hf.disable(w.model)
            replay = fake_cuda.FakeGraph.replay
            fake_cuda.FakeGraph.replay = lambda self: stamps.append(time.perf_counter())  # only the host path is timed
            try:
                samples = _interleaved(w, paths, hooks, floor, args)
                before = _before_replay(w, paths, hooks, floor, args, stamps)
            finally:
                fake_cuda.FakeGraph.replay = replay
        base = statistics.median(samples["Dynamo alone (memo backend)"])
        base_before = statistics.median(before["Dynamo alone (memo backend)"])
        for name, v in samples.items():
            rows.append({"batch": batch, "layers": layers, "path": name, "nano_batches": NANO.get((paths[name], batch)),
                         "median_us": statistics.median(v), "min_us": min(v), "over_dynamo_us": statistics.median(v) - base,
                         "before_replay_us": statistics.median(before[name]),
                         "before_replay_over_dynamo_us": statistics.median(before[name]) - base_before})
    width = max(len(r["path"]) for r in rows)
    print("\n".join([f"{'graphed step (host)':<{width}}  batch  layers  {'µs/step':>8}  {'over Dynamo':>11}  "  # noqa: T201
                     f"{'before replay':>13}  {'over Dynamo':>11}"] +
                    [f"{r['path']:<{width}}  {r['batch']:5d}  {r['layers']:6d}  {r['median_us']:8.1f}  "
                     f"{r['over_dynamo_us']:11.1f}  {r['before_replay_us']:13.1f}  {r['before_replay_over_dynamo_us']:11.1f}"
                     for r in rows]))
    return rows


def inductor_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time per step of Inductor-compiled paths on a CPU, without graphs: where each compiled launch's Dynamo
    entry (its guards) is host time a step pays. ``torch.compile`` of the whole model against dynaflow
    ``sequential`` with ``inductor=True``, its runs of launches fused (one compile for the step, the default) and
    segment by segment (``DYNAFLOW_INDUCTOR_FUSE=0``)."""
    import dynaflow
    import workloads
    from dynaflow import knobs

    w = workloads.hf_decode(1, tiny=True, device="cpu", dtype=torch.float32, layers=2)
    options = dict(strategy="sequential", nano_batches=1, executor="serial", config={"inductor": True})
    whole = torch.compile(w.model)
    paths: dict[str, Any] = {"eager": w.model, "torch.compile (inductor)": lambda *a, **k: whole(*a, **k),
                             "dynaflow sequential +inductor, runs fused": dynaflow.compile(w.model, **options),
                             "dynaflow sequential +inductor, per segment": dynaflow.compile(w.model, **options)}
    calls = max(args.calls // 5, 1)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        ref = w.step()
        for name, fn in paths.items():  # compile and warm, each checked against eager
            with knobs.scope(DYNAFLOW_INDUCTOR_FUSE=int("per segment" not in name)):
                for _ in range(3):
                    out = w.step(fn)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for _ in range(args.repeats):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    w.step(fn)
                samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    launches = {name: fn.last_graph._inductor.num_compiled for name, fn in paths.items() if hasattr(fn, "last_graph")}
    rows = [{"path": name, "median_us": statistics.median(v), "min_us": min(v), "compiles": launches.get(name)}
            for name, v in samples.items()]
    width = max(len(r["path"]) for r in rows)
    print("\n".join([f"{'inductor step (CPU)':<{width}}  {'µs/step':>8}  compiles"] +  # noqa: T201 - the table
                    [f"{r['path']:<{width}}  {r['median_us']:8.1f}  {r['compiles'] if r['compiles'] is not None else '-'}"
                     for r in rows]))
    return rows


NANO = {("sequential", 1): 1, ("sequential", 4): 1, ("nanoflow", 1): 1, ("nanoflow", 4): 2}
"""Nano-batches per (strategy, batch) of the graphed-step table: a batch of one runs whole."""


def _rounds(w: Any, paths: dict[str, Any], hooks: dict[str, Any], floor: Any, args: argparse.Namespace,
            time_round: Callable[[Callable[..., Any]], list[float]]) -> dict[str, list[float]]:
    """``args.repeats`` rounds over the paths in turn, each path's hook installed for its round only;
    ``time_round(model)`` times one round of calls of ``model`` (the hooked model, or Dynamo alone's ``floor``)
    on the workload's inputs and returns its samples."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name in paths:
            hook = hooks.get(name)
            if hook is not None:
                hook.install()
            try:
                samples[name] += time_round(w.model if hook is not None else floor)
            finally:
                if hook is not None:
                    hook.remove()
    return samples


def _interleaved(w: Any, paths: dict[str, Any], hooks: dict[str, Any], floor: Any,
                 args: argparse.Namespace) -> dict[str, list[float]]:
    """Per path, µs per step over rounds of ``args.calls`` whole steps (``reset`` included)."""
    def time_round(model: Callable[..., Any]) -> list[float]:
        t0 = time.perf_counter()
        for _ in range(args.calls):
            w.step(model)
        return [(time.perf_counter() - t0) / args.calls * 1e6]

    return _rounds(w, paths, hooks, floor, args, time_round)


def _before_replay(w: Any, paths: dict[str, Any], hooks: dict[str, Any], floor: Any, args: argparse.Namespace,
                   stamps: list[float]) -> dict[str, list[float]]:
    """Per path, µs from each call's start to its replay (``stamps``, appended by the replay or the memo):
    on a GPU the part of the host path a step waits for, since the work after the replay overlaps it."""
    def time_round(model: Callable[..., Any]) -> list[float]:
        out = []
        for _ in range(max(args.calls // 10, 1)):
            if w.reset is not None:
                w.reset()
            stamps.clear()
            t0 = time.perf_counter()
            model(*w.inputs, **w.kwargs)
            out.append((stamps[0] - t0) * 1e6)
        return out

    return _rounds(w, paths, hooks, floor, args, time_round)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=500, help="calls per timed round")
    ap.add_argument("--repeats", type=int, default=21, help="timed rounds per path (interleaved)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/call_overhead_cpu.json)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per timed decode run")
    ap.add_argument("--decode-repeats", type=int, default=7, help="timed decode runs per path (interleaved)")
    ap.add_argument("--dry-run", action="store_true", help="a few calls only; checks the plumbing")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.calls, args.repeats, args.tokens, args.decode_repeats = 5, 3, 3, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_main("call_overhead_cpu", parse, run, argv)


if __name__ == "__main__":
    main()
