"""The vLLM integration's settings: supported versions, the names vLLM addresses dynaflow by, and the options
this process runs with. A leaf module (no vLLM import), read by the package and by its vLLM-importing modules."""

from __future__ import annotations

from typing import Any, Mapping

from dynaflow.integrations._common import active_options, make_strategy

SUPPORTED = ">=0.32,<0.34"
"""vLLM versions whose internals the integration was written and tested against (contract tests pin them)."""
BACKEND_QUALNAME = "dynaflow.integrations.vllm.backend"
COMPILER_QUALNAME = "dynaflow.integrations.vllm.DynaflowCompiler"

_OPTIONS: dict[str, Any] | None = None


def options() -> dict[str, Any]:
    """The active options: those given to ``enable()``, else ``DYNAFLOW_VLLM_OPTIONS``."""
    return active_options(_OPTIONS, "vllm")


def set_options(parsed: Mapping[str, Any]) -> None:
    """Remember options for this process (``enable()``, ``compilation_config()``)."""
    global _OPTIONS
    _OPTIONS = dict(parsed)


def max_nano_batches(opts: Mapping[str, Any]) -> int:
    """The most nano-batches one step may be cut into under ``opts`` (sizes the per-nano-batch metadata
    builders): ``nano_batches``, or a larger per-resource count of ``strategy_options.stage_nano_batches``, or
    ``auto``'s ``strategy_options.max_nano_batches``."""
    most = int(opts.get("nano_batches") or 4)
    options = opts.get("strategy_options") or {}
    stages = options.get("stage_nano_batches") or {}
    tuned = options.get("max_nano_batches") if opts.get("strategy") == "auto" else None
    searched = [tuned] if isinstance(tuned, int) and not isinstance(tuned, bool) else []  # Auto refuses the rest
    return max([most, *searched, *(int(v) for v in stages.values())])


def vllm_strategy(opts: Mapping[str, Any]) -> tuple[Any, Any]:
    """The DynaflowConfig and request-aligned strategy for ``opts``, capped at the metadata builders the engine
    was given (:func:`max_nano_batches`): what every vLLM graph, whole or piecewise, is planned with."""
    return make_strategy(opts, max_nano_batches(opts))
