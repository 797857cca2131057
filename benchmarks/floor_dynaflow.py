"""The dynaflow rows of the GPU-floor benchmark: ``auto`` and every registered strategy × {eager streams,
``cuda_graphs=True``} × {plain, disjoint SM partitions where the strategy takes them}, and ``sequential`` with
Inductor-compiled segments in CUDA graphs (the row beside ``reduce-overhead``).

:func:`matrix` lists the configurations; :func:`build` compiles one for a workload and returns a
:class:`~baselines.Runner`, so dynaflow rows are timed and checked exactly like the hand-written ones.
Models of our own go through ``dynaflow.compile``; the transformers model (workload (c)) through
``dynaflow.integrations.transformers.enable``, which prepares its static cache for splitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from baselines import Env, Runner, Skip
from workloads import Workload

__all__ = ["DynaflowRow", "matrix", "build", "SM_OPTIONS"]

SM_OPTIONS = {
    "nanoflow": lambda c, m: {"sm_counts": {"compute": c, "memory": m}},
    "prefill_decode": lambda c, m: {"prefill_sms": c, "decode_sms": m},
}
"""Strategies that take SM partitions, and their options for (compute-heavy SMs, memory-heavy SMs)."""

NANO = {"sequential": 1, "auto": None, "prefill_decode": None}
"""Nano-batch counts where the default of 2 does not apply (``None``: the strategy decides)."""


@dataclass(frozen=True)
class DynaflowRow:
    strategy: str
    nano: int | None
    graphs: bool
    sm: tuple[int, int] | None = None
    inductor: bool = False
    """Segments compiled by TorchInductor (``inductor=True``): the row to set beside ``reduce-overhead``."""

    @property
    def name(self) -> str:
        nano = "" if self.nano is None else f" nano={self.nano}"
        sm = f" SM {self.sm[0]}+{self.sm[1]}" if self.sm else ""
        return (f"dynaflow {self.strategy}{nano}{sm}" + (" +inductor" if self.inductor else "")
                + (" +graphs" if self.graphs else ""))

    def options(self) -> dict[str, Any]:
        return SM_OPTIONS[self.strategy](*self.sm) if self.sm else {}

    def config(self, timeline: bool = False) -> dict[str, Any]:
        return {"cuda_graphs": self.graphs, "gpu_timeline": timeline, "strategy_options": self.options(),
                "inductor": self.inductor}


def registered() -> list[str]:
    """``auto`` first, then every registered strategy in registration order."""
    from dynaflow.strategies import available

    names = list(available())
    return ["auto"] + [n for n in names if n != "auto"]


def matrix(strategies: list[str] | None, env: Env) -> list[DynaflowRow]:
    """The configurations to run; without CUDA only eager streams and no partitions (the dry run)."""
    rows = []
    for name in strategies or registered():
        for sm in [None] + ([env.sm_split] if env.cuda and env.sm_split and name in SM_OPTIONS else []):
            for graphs in (False, True) if env.cuda else (False,):
                rows.append(DynaflowRow(name, NANO.get(name, 2), graphs, sm))
        if name == "sequential" and env.cuda:  # Inductor's kernels in one CUDA graph: reduce-overhead's mechanism
            rows.append(DynaflowRow(name, 1, True, None, inductor=True))
    return rows


def build(w: Workload, row: DynaflowRow, executor: str, timeline: bool = False) -> Runner:
    """Compile ``row`` for ``w``; the runner's ``info`` says what dynaflow ran (lanes, what auto picked)."""
    import dynaflow

    nano = row.nano
    torch._dynamo.reset()
    if w.family == "hf_decode":
        from dynaflow.integrations import transformers as df_hf

        hook = df_hf.enable(w.model, strategy=row.strategy, nano_batches=nano, executor=executor,
                            config=row.config(timeline))
        compiled = hook.compiled
        runner = Runner(lambda: w.output(w.model(*w.inputs, **w.kwargs)), close=lambda: df_hf.disable(w.model))
    else:
        compiled = dynaflow.compile(w.model, strategy=row.strategy, nano_batches=nano, executor=executor,
                                    config=row.config(timeline))
        runner = Runner(lambda: w.output(compiled(*w.inputs, **w.kwargs)))
    runner.keep.append(compiled)
    runner.info["nano_batches"] = nano
    return runner


def settle(runner: Runner, reset: Any = None, limit: int = 64) -> int:
    """Call the row until ``auto``'s floor check (:mod:`dynaflow.floor_check`) has decided every kind of call it
    probes, so the timed calls run the path it kept; returns the calls made."""
    checks = [k.floor_check for k in runner.keep if hasattr(k, "floor_check")]
    n = 0
    while n < limit and any(c.active for c in checks):
        if reset is not None:
            reset()
        runner.call()
        n += 1
    return n


def describe(runner: Runner) -> dict[str, Any]:
    """After the first call: the lanes the cuda executor made (with granted SMs) and, for ``auto``, the head
    of ``explain()`` (what it measured and picked)."""
    compiled = runner.keep[-1]
    info: dict[str, Any] = {}
    try:
        ex = compiled.graphs[0]._executors.get("cuda") if compiled.graphs else None
        if ex is not None and compiled.program is not None:
            info["lanes"] = [repr(ls) for ls in ex.lane_streams(compiled.program)]
    except Exception as exc:  # informational only
        info["lanes_error"] = f"{type(exc).__name__}: {exc}"
    if compiled.strategy.name == "auto":
        info["floor_check"] = [repr(v) for v in compiled.floor_check.verdicts]
        try:
            info["explain"] = compiled.explain()[:3000]
        except Exception as exc:
            info["explain_error"] = f"{type(exc).__name__}: {exc}"
    return info


def unhook(w: Workload) -> None:
    """Give the transformers model its own forward back (a no-op when no dynaflow hook is installed)."""
    if w.family == "hf_decode":
        from dynaflow.integrations import transformers as df_hf

        df_hf.disable(w.model)
