"""Host-framework integrations, one subpackage per host: ``vllm``, ``sglang``.

Each subpackage exposes ``is_available()`` and ``enable(...)`` in its ``__init__`` and imports its host only
in a private module (``_vllm.py``, ``_sglang.py``); host-independent pieces live in ``_common.py``. Nothing
in dynaflow's core imports this package. See docs/integrations/.
"""
