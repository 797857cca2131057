"""The guard for optional heavy dependencies: core code asks for them here, by name, only when a feature
that needs one is used, so ``import dynaflow`` works on a bare CPU machine."""

from __future__ import annotations

import importlib
from types import ModuleType

from dynaflow.errors import ConfigError

__all__ = ["require", "available"]

EXTRAS = {"matplotlib": "plot", "triton": "cuda", "cuda": "cuda", "transformers": "test"}


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it twice on success)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise a ConfigError that names the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'dynaflow[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise ConfigError(f"{feature} needs {module.split('.')[0]} ({exc}); {hint}.") from None
