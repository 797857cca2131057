"""transformers integration: run ``model.generate(...)`` with every forward step going through dynaflow.

The switch::

    from dynaflow.integrations import transformers as df_hf

    df_hf.enable(model, strategy="nanoflow", nano_batches=2)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         cache_implementation="static")
    df_hf.disable(model)

``enable`` installs a forward on the model *instance* (the class is untouched): each call with a static KV
cache is captured by ``dynaflow.compile`` (prefill and decode become separate graphs), split into
nano-batches whose cache writes land in place in their own rows of the batch-major cache, and run by the
chosen executor. See ``docs/integrations/transformers.md``.

transformers is imported only by the private module :mod:`._hooks`, when ``enable`` is called; importing
this package needs nothing but dynaflow.
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["is_available", "enable", "disable", "is_enabled", "hook_of", "row_wise_experts"]

MIN_VERSION = (5, 0)
"""The cache API used here (``StaticCache(config=..., max_cache_len=...)``, the ``cache=`` forward argument (``past_key_values=`` before 5.2x),
``StaticLayer.cumulative_length``) is the one of transformers 5."""


def is_available() -> bool:
    """Whether a supported transformers (>= 5.0) is installed; does not import it."""
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        from importlib.metadata import version

        major, minor = (int(p) for p in version("transformers").split(".")[:2])
    except Exception:  # pragma: no cover - unusual metadata
        return False
    return (major, minor) >= MIN_VERSION


def enable(model: Any, *, strategy: Any = "nanoflow", nano_batches: int | None = 2, executor: str = "auto",
           rules: Any = None, verify: bool = False, config: Any = None, row_wise_experts: bool = True) -> Any:
    """Route every forward of the transformers ``model`` through dynaflow; returns the installed hook.

    The options are those of :func:`dynaflow.compile`. ``model.generate(...)`` must then use a static cache
    (``cache_implementation="static"`` or a ``StaticCache`` passed as ``cache=``). Enabling again replaces the
    previous hook. ``row_wise_experts`` runs each MoE experts module as one row-wise op, so MoE layers split
    without a barrier (see :mod:`._experts`); False leaves them to the batch analysis. Raises :class:`dynaflow.ConfigError` when transformers is missing or the model is not a
    decoder-only transformers model.
    """
    from dynaflow.errors import ConfigError

    if not is_available():
        raise ConfigError(
            "dynaflow.integrations.transformers.enable(...) needs transformers >= 5.0, which is not installed "
            "(or too old). Install it with `pip install 'transformers>=5'`."
        )
    from dynaflow.integrations.transformers import _hooks

    return _hooks.enable(model, strategy=strategy, nano_batches=nano_batches, executor=executor, rules=rules,
                         verify=verify, config=config, row_wise_experts=row_wise_experts)


def disable(model: Any) -> bool:
    """Restore the model's own forward (and its generation config); returns whether a hook was installed."""
    hook = hook_of(model)
    if hook is None:
        return False
    hook.remove()
    return True


def hook_of(model: Any) -> Any:
    """The dynaflow hook installed on ``model`` by :func:`enable`, or None."""
    fwd = getattr(model, "__dict__", {}).get("forward")
    return fwd if getattr(fwd, "_dynaflow_hook", False) else None


def is_enabled(model: Any) -> bool:
    """Whether :func:`enable` routed this model's forward through dynaflow."""
    return hook_of(model) is not None


def row_wise_experts(model: Any, on: bool = True) -> int:
    """Run each MoE experts module of ``model`` as one row-wise op (``on=True``), as :func:`enable` does, or
    restore the modules' own forwards (``on=False``); returns how many modules were switched on. For
    ``dynaflow.compile(model)`` on a transformers MoE model without the generate hook: MoE layers then split
    instead of joining at the experts' sort by expert (see ``docs/integrations/transformers.md``)."""
    from dynaflow.errors import ConfigError

    if not is_available():
        raise ConfigError("dynaflow.integrations.transformers.row_wise_experts needs transformers >= 5.0; install "
                          "it with `pip install 'transformers>=5'`.")
    from dynaflow.integrations.transformers import _experts

    if on:
        return _experts.wrap(model)
    _experts.unwrap(model)
    return 0
