"""vLLM integration: dynaflow as vLLM's torch.compile backend, switched on by a flag.

Two ways in (docs/integrations/vllm.md has the details and a copy-paste example):

* **whole-graph mode** (``CompilationMode.DYNAMO_TRACE_ONCE``): ``compilation_config=
  dynaflow.integrations.vllm.compilation_config(nano_batches=2)`` hands dynaflow the model's whole Dynamo
  graph; attention arrives as vLLM's opaque ``unified_attention_with_output`` op and runs per nano-batch
  with that nano-batch's forward context (sliced attention metadata and slot mapping), cuts on request
  boundaries.
* **piecewise mode** (``CompilationMode.VLLM_COMPILE``): vLLM splits the graph at attention itself and
  hands dynaflow each dense piece through :class:`DynaflowCompiler` (a vLLM ``CompilerInterface``), when the
  option ``"piecewise": true`` is set (vLLM 0.32 accepts no custom mode-3 backend name, so the plugin wraps
  ``vllm.compilation.backends.make_compiler``).

The ``vllm.general_plugins`` entry point :func:`register` does nothing unless ``DYNAFLOW_VLLM=1``.
vLLM is imported only in the private underscore modules, on first use: ``_setup`` (engine preparation and
refusals), ``_vllm`` (the step), ``_metadata`` (per-nano-batch attention metadata), ``_piecewise`` (mode 3);
``_layout`` and ``_settings`` import no vLLM.
"""

from __future__ import annotations

from typing import Any, Mapping

from dynaflow import knobs
from dynaflow.integrations._common import enable_options, host_available, parse_options
from dynaflow.integrations.vllm._settings import BACKEND_QUALNAME, COMPILER_QUALNAME, SUPPORTED, options, set_options

__all__ = ["is_available", "enable", "register", "compilation_config", "backend", "DynaflowCompiler",
           "register_metadata_slicer", "step_stats", "options", "BACKEND_QUALNAME", "COMPILER_QUALNAME", "SUPPORTED"]


def is_available() -> bool:
    """True when vLLM is importable (without importing it)."""
    return host_available("vllm")


def enable(options: Mapping[str, Any] | None = None) -> None:
    """Turn the integration on in this process: remember ``options`` (dynaflow options such as
    ``nano_batches``, ``strategy``, ``executor`` plus ``min_rows``, the fewest tokens per nano-batch, and
    ``piecewise``: make vLLM's mode 3 compile its dense pieces with :class:`DynaflowCompiler`), and prepare the
    engine: one attention-metadata builder per nano-batch, ``VLLM_USE_AOT_COMPILE=0`` unless set.
    Call it before the engine starts. Idempotent. Worker processes do not inherit Python state: set
    ``DYNAFLOW_VLLM=1`` (and ``DYNAFLOW_VLLM_OPTIONS``) in the environment so the plugin calls this in every
    process."""
    parsed = enable_options(options, "vllm", "vLLM", SUPPORTED, is_available())
    from dynaflow.integrations.vllm import _setup

    _setup.check_version()
    set_options(parsed)
    _setup.setup_engine(parsed)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: calls :func:`enable` when ``DYNAFLOW_VLLM=1``, else nothing.
    vLLM loads plugins in every process, possibly several times; this is safe to call repeatedly."""
    if not knobs.integration_enabled("vllm"):
        return
    enable()


def compilation_config(**dynaflow_options: Any) -> dict[str, Any]:
    """A vLLM ``compilation_config`` dict for whole-graph mode with dynaflow as the backend.

    ``LLM(model, compilation_config=compilation_config(nano_batches=2))``. Options given here are stored for
    this process (as :func:`enable` does); use ``DYNAFLOW_VLLM_OPTIONS`` for multi-process engines.
    """
    if dynaflow_options:
        set_options(parse_options(dynaflow_options, "dynaflow.integrations.vllm.compilation_config(...)"))
    return {"mode": 2, "backend": BACKEND_QUALNAME}


def backend(gm: Any, example_inputs: list[Any]) -> Any:
    """The torch.compile backend vLLM calls in whole-graph mode (addressed by :data:`BACKEND_QUALNAME`)."""
    from dynaflow.integrations.vllm import _vllm

    return _vllm.make_step(gm, example_inputs, options())


def register_metadata_slicer(cls: type, fn: Any) -> None:
    """Teach the integration to cut attention metadata of type ``cls``:
    ``fn(metadata, request_slice, token_slice) -> metadata`` for the requests/tokens of one nano-batch."""
    from dynaflow.integrations.vllm import _metadata

    _metadata.SLICERS[cls] = fn


def step_stats(*_: Any) -> dict[int, int]:
    """Steps this process ran, by the number of nano-batches their attention ran in (``{1: 40, 2: 12}``).
    Pass it to ``LLM.collective_rpc`` to ask the engine's workers."""
    from dynaflow.integrations.vllm import _vllm

    return _vllm.step_stats()


def __getattr__(name: str) -> Any:
    if name == "DynaflowCompiler":  # a vLLM CompilerInterface subclass: defined where vLLM is imported
        from dynaflow.integrations.vllm import _piecewise

        return _piecewise.DynaflowCompiler
    raise AttributeError(f"module 'dynaflow.integrations.vllm' has no attribute {name!r}")
