"""The integration tier: tests against the real vLLM / SGLang packages (``pytest -m integration``).

* Items marked ``integration`` are *deselected* (not skipped) unless the ``-m`` expression names the
  marker (``OPT_IN_TIERS`` in tests/conftest.py), so ``pytest -q`` neither runs them nor counts them.
* ``integ_util.require(name)`` imports a host package; when it is missing the test is skipped with a reason, except
  under ``DYNAFLOW_REQUIRE_INTEGRATION=1`` (set by ``.ci/run``), where it fails: a skipped integration
  test must never pass CI silently.
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(__file__))  # the harness modules

# vLLM resolves its platform once, on first import, which SGLang's modules may trigger too: set the CPU
# platform before any test module runs (the PyPI wheel cannot infer a device without a GPU).
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # dynaflow's step callable is not serializable
