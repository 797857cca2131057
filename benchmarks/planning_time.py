"""dynaflow's planning time against Dynamo's capture time, on a deep Llama-shaped transformers model.

Planning is everything dynaflow does between the graph Dynamo hands over and the lowered program (batch
analysis, partition, strategy plan, lowering; no Inductor). Capture is Dynamo tracing the same model with a
backend that returns the graph unchanged. Both are wall-clock medians of ``--repeats`` fresh compiles.
``python benchmarks/planning_time.py --layers 32 --out benchmarks/results/planning_time.json``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import torch

import dynaflow
from dynaflow.api import CompiledGraph
from _results import provenance, write

log = logging.getLogger("bench")


def make_model(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=128, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def capture_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Dynamo's first call with a pass-through backend, minus one eager call."""
    torch._dynamo.reset()
    x = ids.clone()
    torch._dynamo.mark_dynamic(x, 0)
    fn = torch.compile(model, backend=lambda gm, _: gm.forward, dynamic=None)
    t0 = time.perf_counter()
    fn(input_ids=x, use_cache=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return first - (time.perf_counter() - t0)


def planning_seconds(model: torch.nn.Module, ids: torch.Tensor, strategy: str) -> dict[str, float]:
    """Time spent in ``CompiledGraph.prepare`` (analysis + partition) and ``plan_for`` (plan + lower)."""
    torch._dynamo.reset()
    spent = {"prepare": 0.0, "plan": 0.0}
    prepare, plan_for = CompiledGraph.prepare, CompiledGraph.plan_for

    def timed(key: str, fn: Any) -> Any:
        def wrapper(self: Any, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper

    CompiledGraph.prepare, CompiledGraph.plan_for = timed("prepare", prepare), timed("plan", plan_for)
    try:
        dynaflow.compile(model, strategy=strategy, nano_batches=2, executor="serial")(input_ids=ids, use_cache=False)
    finally:
        CompiledGraph.prepare, CompiledGraph.plan_for = prepare, plan_for
    return spent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategy", default="round_robin")
    parser.add_argument("--label", default="", help="free text stored with the result (e.g. before/after)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = make_model(args.layers)
    ids = torch.randint(0, 256, (4, 16))
    with torch.no_grad():
        caps = [capture_seconds(model, ids) for _ in range(args.repeats)]
        plans = [planning_seconds(model, ids, args.strategy) for _ in range(args.repeats)]
    cap = statistics.median(caps)
    plan = statistics.median(p["prepare"] + p["plan"] for p in plans)
    result = provenance("planning_time", label=args.label, layers=args.layers, strategy=args.strategy,
                        capture_s=caps, planning_s=plans, capture_median_s=cap, planning_median_s=plan,
                        ratio=plan / cap)
    log.info("%d layers: Dynamo capture %.2f s, dynaflow planning %.2f s (prepare %.2f + plan %.2f): %.0f%%",
             args.layers, cap, plan, statistics.median(p["prepare"] for p in plans),
             statistics.median(p["plan"] for p in plans), 100 * plan / cap)
    write(result, args.out)


if __name__ == "__main__":
    main()
