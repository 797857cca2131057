"""The SGLang integration's settings: the supported version range, the host-op patterns and the active
options. A leaf module (no SGLang, no other module of the integration), so the package face and the private
host module both read it without importing each other."""

from __future__ import annotations

from typing import Any

from dynaflow.integrations._common import active_options

__all__ = ["SUPPORTED", "HOST_OP_PATTERNS", "options", "set_options"]

SUPPORTED = ">=0.5.20,<0.5.24"
"""SGLang versions whose internals the integration was written and tested against."""

HOST_OP_PATTERNS: list[str] = [r"^sglang\.(unified_|.*attention)"]
"""Regexes (``re.search`` on dynaflow's op name) of opaque ops that read SGLang's global attention backend;
they run per nano-batch under that nano-batch's forward context. Extend with ``register_host_op``."""

_OPTIONS: dict[str, Any] | None = None
"""The options given to ``enable()``; ``None`` until then (the environment variable applies)."""


def options() -> dict[str, Any]:
    """The active options: those given to ``enable()``, else ``DYNAFLOW_SGLANG_OPTIONS``."""
    return active_options(_OPTIONS, "sglang")


def set_options(parsed: dict[str, Any]) -> None:
    """Remember the options ``enable()`` parsed, for every later compile in this process."""
    global _OPTIONS
    _OPTIONS = parsed
