"""``dynaflow demo``: eager vs dynaflow on a small Llama-style model, checked equal, timed, traced."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

__all__ = ["main", "demo"]

log = logging.getLogger("dynaflow.cli")


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _build(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], Any], str]:
    from dynaflow import models

    ids = torch.randint(0, 1024, (args.batch, args.seq))
    if args.model == "llama" and importlib.util.find_spec("transformers") is None:
        _say("transformers is not installed: falling back to dynaflow's built-in transformer")
        args.model = "builtin"
    if args.model == "llama":
        model = models.llama_from_config(hidden=args.hidden, layers=args.layers)
        return model, lambda m: m(input_ids=ids, use_cache=False).logits, "transformers LlamaForCausalLM"
    model = models.TinyTransformer(vocab=1024, dim=args.hidden, heads=8, hidden=4 * args.hidden, layers=args.layers).eval()
    return model, lambda m: m(ids), "dynaflow.models.TinyTransformer"


def demo(argv: Sequence[str] | None = None) -> int:
    import dynaflow
    from dynaflow.timeline import to_perfetto

    p = argparse.ArgumentParser(prog="dynaflow demo", description=__doc__)
    p.add_argument("--model", choices=["llama", "builtin"], default="llama")
    p.add_argument("--strategy", default="nanoflow", help=f"one of {dynaflow.strategies.available()}")
    p.add_argument("--nano-batches", type=int, default=2)
    p.add_argument("--executor", default="auto", choices=["auto", "serial", "thread", "sim"],
                   help="sim: outputs computed serially, timeline predicted by the cost model")
    p.add_argument("--cost-device", default=None, help="device the cost model assumes for --executor sim / "
                   "--strategy auto (e.g. h200 for a what-if on CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--trace", default="dynaflow_trace.json", help="Perfetto / Chrome trace output path")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the last step's timeline as a Gantt chart PNG")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model, run, label = _build(args)
    _say(f"model: {label}, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, fp32, CPU")
    nano = None if args.strategy in ("auto", "prefill_decode") else args.nano_batches
    fast = dynaflow.compile(model, strategy=args.strategy, nano_batches=nano, executor=args.executor,
                            config={"cost_device": args.cost_device} if args.cost_device else None)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = run(model)
        got = run(fast)
        compile_s = time.perf_counter() - t0
        diff = (got - ref).abs().max().item()
        exact = torch.equal(got, ref)
        ok = exact or torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        _say(fast.explain())
        eager_ms = _median_ms(lambda: run(model), args.repeats)
        fast_ms = _median_ms(lambda: run(fast), args.repeats)
    _say()
    _say(f"outputs match eager: {'yes (bit-exact)' if exact else ('yes' if ok else 'NO')}  max |diff| = {diff:.3g}")
    _say(f"first call (capture + plan): {compile_s:.2f} s")
    _say(f"median of {args.repeats}: eager {eager_ms:.2f} ms, dynaflow[{args.strategy}, {args.nano_batches} nano] "
         f"{fast_ms:.2f} ms (ratio {fast_ms / eager_ms:.2f})")
    timeline = fast.last_timeline
    if timeline is not None and args.trace:
        path = to_perfetto(timeline, args.trace)
        _say(f"{timeline}\ntrace written to {path} (open in https://ui.perfetto.dev)")
    if timeline is not None and args.plot:
        from dynaflow.timeline import plot

        title = (f"dynaflow demo: {label}, {args.strategy} ({args.nano_batches} nano-batches), executor "
                 f"{timeline.executor}, batch {args.batch}x{args.seq} — makespan {timeline.makespan * 1e3:.2f} ms")
        _say(f"timeline plot written to {plot(timeline, args.plot, title)}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        _say("usage: dynaflow demo [options]   (dynaflow demo --help for the options)")
        return 0 if argv else 2
    if argv[0] == "demo":
        return demo(argv[1:])
    _say(f"unknown command {argv[0]!r}; available: demo")
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
