"""Barrier count per reference model: how many segments the batch analysis runs on the whole batch.

A sound analysis may cost speed (more barriers), never correctness; this table shows what it costs on the
models of the tests and examples. Run it before and after a change to the analysis and compare.
``python benchmarks/barriers.py --out benchmarks/results/barriers_after.json``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import dynaflow  # noqa: E402
from _results import provenance, write  # noqa: E402

log = logging.getLogger("bench")


def _models() -> dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], dict[str, Any]]]]:
    import models as m
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2() -> torch.nn.Module:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()

    ids = lambda: dict(input_ids=m.hf_input(4), use_cache=False)  # noqa: E731
    return {
        "mlp": (m.make_mlp, lambda: dict(x=m.mlp_input(6))),
        "transformer": (m.make_transformer, lambda: dict(x=m.transformer_input(6))),
        "coupled": (m.make_coupled, lambda: dict(x=m.mlp_input(6))),
        "llama": (m.make_llama, ids),
        "mixtral": (m.make_mixtral, ids),
        "gpt2": (gpt2, ids),
    }


def count(factory: Callable[[], torch.nn.Module], inputs: dict[str, Any]) -> dict[str, Any]:
    """Segments, barriers and each barrier's reason for one model under round_robin with 2 nano-batches."""
    model = factory()
    compiled = dynaflow.compile(model, strategy="round_robin", nano_batches=2)
    with torch.no_grad():
        compiled(**inputs)
    rows = []
    for graph in compiled.graphs:
        for seg in graph.segmented.segments:
            rows.append({"segment": seg.name, "kind": seg.kind.value, "reason": seg.reason})
    barriers = [r for r in rows if r["kind"] == "barrier"]
    torch._dynamo.reset()
    return {"segments": len(rows), "barriers": len(barriers), "barrier_segments": barriers}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON result path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = provenance("barriers", models={})
    for name, (factory, inputs) in _models().items():
        result["models"][name] = row = count(factory, inputs())
        log.info("%-12s %3d segments, %2d barriers", name, row["segments"], row["barriers"])
        for b in row["barrier_segments"]:
            log.info("    %-24s %s", b["segment"], b["reason"][:110])
    write(result, args.out)


if __name__ == "__main__":
    main()
