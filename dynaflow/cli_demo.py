"""``dynaflow demo``: eager vs dynaflow on a small Llama-style model, checked equal, timed interleaved, traced."""

from __future__ import annotations

import argparse
import sys
import importlib.util
import time
from typing import Any, Callable, Sequence

import torch

from dynaflow.timing import interleave

__all__ = ["add_arguments", "at_least", "demo", "run", "say"]


def say(text: str = "") -> None:
    """The commands' output goes to stdout (logging is for diagnostics)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


HEADS = 8
"""Attention heads of the demo's models: ``--hidden`` must be a multiple of it."""


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int ``>= low`` (argparse prints the message and exits 2 otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: it must be an int >= {low}")
        return value

    parse.__name__ = f"int >= {low}"  # what argparse names in its message
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``dynaflow demo --help`` and ``dynaflow --help``'s command list)."""
    import dynaflow

    p.add_argument("--model", choices=["llama", "builtin"], default="llama")
    p.add_argument("--strategy", default="nanoflow", help=f"one of {dynaflow.strategies.available()}")
    p.add_argument("--nano-batches", type=int, default=2)
    p.add_argument("--executor", default="auto", choices=["auto", "serial", "thread", "sim"],
                   help="sim: outputs computed serially, timeline predicted by the cost model")
    p.add_argument("--cost-device", default=None, help="device the cost model assumes for --executor sim / "
                   "--strategy auto (e.g. h200 for a what-if on CPU)")
    p.add_argument("--batch", type=at_least(1), default=8)
    p.add_argument("--seq", type=at_least(1), default=64)
    p.add_argument("--hidden", type=_hidden, default=256, help=f"a multiple of {HEADS} (the attention heads)")
    p.add_argument("--layers", type=at_least(0), default=4)
    p.add_argument("--repeats", type=at_least(1), default=20, help="interleaved eager/dynaflow pairs timed")
    p.add_argument("--trace", default="dynaflow_trace.json", help="Perfetto / Chrome trace output path")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the last step's timeline as a Gantt chart PNG")
    p.add_argument("--seed", type=int, default=0)


def _hidden(text: str) -> int:
    value = at_least(HEADS)(text)
    if value % HEADS:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of {HEADS} (the demo models' attention heads)")
    return value


def _build(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], Any], str]:
    from dynaflow import models

    ids = torch.randint(0, 1024, (args.batch, args.seq))
    if args.model == "llama" and importlib.util.find_spec("transformers") is None:
        say("transformers is not installed: falling back to dynaflow's built-in transformer")
        args.model = "builtin"
    if args.model == "llama":
        model = models.llama_from_config(hidden=args.hidden, layers=args.layers, heads=HEADS)
        return model, lambda m: m(input_ids=ids, use_cache=False).logits, "transformers LlamaForCausalLM"
    model = models.TinyTransformer(vocab=1024, dim=args.hidden, heads=HEADS, hidden=4 * args.hidden, layers=args.layers).eval()
    return model, lambda m: m(ids), "dynaflow.models.TinyTransformer"


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args``; exit status 0 when dynaflow's outputs equal eager's."""
    import dynaflow
    from dynaflow.timeline import to_perfetto

    torch.manual_seed(args.seed)
    model, call, label = _build(args)
    say(f"model: {label}, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, fp32, CPU")
    nano = None if args.strategy in ("auto", "prefill_decode") else args.nano_batches
    fast = dynaflow.compile(model, strategy=args.strategy, nano_batches=nano, executor=args.executor,
                            config={"cost_device": args.cost_device} if args.cost_device else None)
    with torch.no_grad():
        ref = call(model)
        t0 = time.perf_counter()
        got = call(fast)
        capture_s = time.perf_counter() - t0
        diff = (got - ref).abs().max().item()
        exact = torch.equal(got, ref)
        ok = exact or torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        say(fast.explain())
        timed = interleave(lambda: call(model), lambda: call(fast), args.repeats)
    say()
    say(f"outputs match eager: {'yes (bit-exact)' if exact else ('yes' if ok else 'NO')}  max |diff| = {diff:.3g}")
    say(f"capture + plan (dynaflow's first call, timed alone): {capture_s:.2f} s")
    say(f"{timed.pairs} interleaved calls each, median [25th–75th percentile]:")
    say(f"  eager                                      {timed.a_ms.format(' ms')}")
    say(f"  dynaflow[{args.strategy}, {args.nano_batches} nano]".ljust(45) + timed.b_ms.format(" ms"))
    say(f"  ratio dynaflow / eager (per pair)          {timed.ratio.format()}")
    timeline = fast.last_timeline
    if timeline is not None and args.trace:
        path = to_perfetto(timeline, args.trace)
        say(f"{timeline}\ntrace written to {path} (open in https://ui.perfetto.dev)")
    if timeline is not None and args.plot:
        from dynaflow.timeline import plot

        title = (f"dynaflow demo: {label}, {args.strategy} ({args.nano_batches} nano-batches), executor "
                 f"{timeline.executor}, batch {args.batch}x{args.seq} — makespan {timeline.makespan * 1e3:.2f} ms")
        say(f"timeline plot written to {plot(timeline, args.plot, title)}")
    return 0 if ok else 1


def demo(argv: Sequence[str] | None = None) -> int:
    """``dynaflow demo [options]`` as a function (``argv`` without the command name)."""
    p = argparse.ArgumentParser(prog="dynaflow demo", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
