"""Helpers of the integration tier (kept out of conftest.py so test modules can import them by name)."""

from __future__ import annotations

import importlib
import os

import pytest


def require(name: str):
    """Import ``name`` or skip (fail under DYNAFLOW_REQUIRE_INTEGRATION=1)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a host package that fails while importing
        msg = f"{name} is not importable ({type(exc).__name__}: {exc}); install it as .ci/run does"
        if os.environ.get("DYNAFLOW_REQUIRE_INTEGRATION", "0") not in ("", "0"):
            pytest.fail(msg + " [DYNAFLOW_REQUIRE_INTEGRATION=1]", pytrace=False)
        pytest.skip(msg)
