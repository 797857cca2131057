"""The integration tier: tests against the real vLLM / SGLang packages (``pytest -m integration``).

* Items marked ``integration`` are *deselected* (not skipped) unless the ``-m`` expression names the
  marker, so the core run (``pytest -q``) neither runs them nor counts them.
* ``integ_util.require(name)`` imports a host package; when it is missing the test is skipped with a reason, except
  under ``DYNAFLOW_REQUIRE_INTEGRATION=1`` (set by ``.ci/run``), where it fails: a skipped integration
  test must never pass CI silently.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # the harness modules

# vLLM resolves its platform once, on first import, which SGLang's modules may trigger too: set the CPU
# platform before any test module runs (the PyPI wheel cannot infer a device without a GPU).
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # dynaflow's step callable is not serializable


def pytest_collection_modifyitems(config, items):
    if "integration" in (config.option.markexpr or ""):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("integration") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
