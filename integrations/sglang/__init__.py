"""SGLang integration: route SGLang's torch.compile paths through dynaflow, switched on by a flag.

* ``--enable-torch-compile``: SGLang compiles the model inside
  ``sglang.srt.compilation.torch_compile_decoration.patch_model`` with Inductor; the plugin wraps that
  function (SGLang ``HookRegistry`` AROUND hook) so the forward it yields is dynaflow's :func:`compile`.
* the piecewise path: ``sglang.srt.compilation.compile.install_torch_compiled(..., backend_factory=None)``
  gets dynaflow's backend as its ``backend_factory`` when the caller gave none.
* :func:`compile` is also usable directly (offline engine, tests): ``fast = compile(model.forward)``.

Per nano-batch, attention runs with its own ``ForwardBatch`` (the nano-batch's requests) and its own
attention backend copy whose ``init_forward_metadata`` saw that batch, installed as SGLang's forward context
(:mod:`dynaflow.nanocontext`); cuts fall on request boundaries. SGLang models break into several Dynamo
graphs (Llama: 7); each is planned on its own. The ``sglang.srt.plugins`` entry point :func:`register`
does nothing unless ``DYNAFLOW_SGLANG=1``. SGLang is imported only in the private ``_sglang`` module.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from dynaflow import knobs
from dynaflow.integrations._common import IntegrationError, enable_options, host_available
from dynaflow.integrations.sglang import _settings
from dynaflow.integrations.sglang._settings import HOST_OP_PATTERNS, SUPPORTED, options

__all__ = ["is_available", "enable", "register", "compile", "backend", "register_host_op", "SUPPORTED",
           "HOST_OP_PATTERNS"]


def is_available() -> bool:
    """True when SGLang is importable (without importing it)."""
    return host_available("sglang")


def register_host_op(pattern: str) -> None:
    """Declare ops matching ``pattern`` as readers of SGLang's attention backend (see HOST_OP_PATTERNS)."""
    import re

    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise IntegrationError(f"register_host_op({pattern!r}): not a valid regex ({exc}).") from None
    if pattern not in HOST_OP_PATTERNS:
        HOST_OP_PATTERNS.append(pattern)


def enable(options: Mapping[str, Any] | None = None, *, apply_hooks: bool = True) -> None:
    """Turn the integration on in this process: remember ``options`` and register the SGLang hooks
    (``patch_model`` and ``install_torch_compiled``); with ``apply_hooks`` also apply them now (the plugin
    loader applies them itself). Idempotent. Worker processes need ``DYNAFLOW_SGLANG=1`` in the environment."""
    parsed = enable_options(options, "sglang", "SGLang", SUPPORTED, is_available())
    from dynaflow.integrations.sglang import _sglang

    _sglang.check_version()
    _settings.set_options(parsed)
    _sglang.register_hooks(apply=apply_hooks)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: :func:`enable` when ``DYNAFLOW_SGLANG=1``, else nothing."""
    if not knobs.integration_enabled("sglang"):
        return
    enable(apply_hooks=False)  # load_plugins() applies every registered hook after running the plugins


def compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """dynaflow-compile an SGLang forward ``fn(input_ids, positions, forward_batch, ...)``; call it inside
    SGLang's forward context, as the model runner does."""
    from dynaflow.integrations.sglang import _sglang

    return _sglang.SglangStep(fn, options())


def backend(gm: Any, example_inputs: list[Any]) -> Any:
    """A torch.compile backend / SGLang ``backend_factory`` planning one (of possibly several) graphs."""
    from dynaflow.integrations.sglang import _sglang

    return _sglang.backend(gm, example_inputs)
