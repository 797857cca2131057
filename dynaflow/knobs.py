"""Every ``DYNAFLOW_*`` environment variable, typed, read in one place.

Nothing else in the package reads ``os.environ``. Tests scope a knob with :func:`scope`.

===========================  ======================================================  =========
variable                     meaning                                                 default
===========================  ======================================================  =========
``DYNAFLOW_DEBUG``           on stderr: 0 quiet; 1 split per batch size and tuning    0
                             tables; 2 segments + tags, plan-stage timings;
                             3 schedule tables + program listings; 4 every launch
``DYNAFLOW_VERIFY``          verify graphs and schedules on every plan               0
``DYNAFLOW_VERIFY_SPLITS``   run split segments whole and on halves on the first     DYNAFLOW_VERIFY
                             call (the batch analysis's differential check)
``DYNAFLOW_WAIT_TIMEOUT``    seconds a lane waits on an event before failing         60
``DYNAFLOW_EXECUTOR``        force an executor ("serial", "thread", ...)             unset
``DYNAFLOW_TIMELINE``        record a Timeline on every call                         1
``DYNAFLOW_CACHE_DIR``       where autotune winners and profiles are kept             ~/.cache/dynaflow
``DYNAFLOW_PROGRESS``        autotune progress bar: 1 on, 0 off, unset = on a tty     unset
``DYNAFLOW_SM_CARVEOUT``     launches on an SM-partitioned lane size their grids for  1
                             its SMs (torch's SM carveout); 0 turns it off
``DYNAFLOW_INDUCTOR_FUSE``   ``inductor=True`` compiles each run of launches on a     1
                             lane as one unit; 0 compiles segment by segment
``DYNAFLOW_VLLM``            the vLLM plugin turns dynaflow on (compile backend)     0
``DYNAFLOW_VLLM_OPTIONS``    JSON dynaflow options for the vLLM integration          unset
``DYNAFLOW_SGLANG``          the SGLang plugin routes torch.compile via dynaflow     0
``DYNAFLOW_SGLANG_OPTIONS``  JSON dynaflow options for the SGLang integration        unset
===========================  ======================================================  =========
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

__all__ = [
    "debug_level", "verify", "verify_splits", "wait_timeout", "forced_executor", "record_timeline", "cache_dir", "progress",
    "sm_carveout", "inductor_fuse",
    "integration_enabled", "integration_options", "scope",
]

_overrides: dict[str, str] = {}


_KEYS: dict[str, object] = {}
"""``os.environ``'s own key for each knob name. Some knobs are read on every call, and ``os.environ.get`` of an
unset name raises and catches a KeyError inside (about a microsecond of host time a GPU step may wait on);
the mapping ``os.environ`` keeps (and updates on every set and delete) answers the same in a dict lookup."""


def _get(name: str, default: str) -> str:
    if name in _overrides:
        return _overrides[name]
    env = os.environ
    data = getattr(env, "_data", None)
    if type(data) is not dict or type(env) is not os._Environ:  # not CPython's os.environ: the public path
        return env.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = env.encodekey(name)
    raw = data.get(key)
    return default if raw is None else env.decodevalue(raw)


def debug_level() -> int:
    """``DYNAFLOW_DEBUG`` as an int (0 when unset or malformed). Above 0 the ``dynaflow`` logger gets one
    stderr handler at INFO, so the levels print without any logging setup."""
    try:
        level = int(_get("DYNAFLOW_DEBUG", "0"))
    except ValueError:
        return 0
    if level > 0 and _STDERR[0] is None:
        _attach_stderr()
    return level


_STDERR: list[logging.Handler | None] = [None]


def _attach_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("dynaflow")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    _STDERR[0] = handler


def verify() -> bool:
    """``DYNAFLOW_VERIFY``: verify every graph and schedule at plan time."""
    return _get("DYNAFLOW_VERIFY", "0") not in ("", "0", "false", "False")


def verify_splits() -> bool:
    """``DYNAFLOW_VERIFY_SPLITS``: the differential split-vs-whole check (defaults to ``DYNAFLOW_VERIFY``)."""
    return _get("DYNAFLOW_VERIFY_SPLITS", "1" if verify() else "0") not in ("", "0", "false", "False")


def wait_timeout() -> float:
    """``DYNAFLOW_WAIT_TIMEOUT`` in seconds: how long a lane waits on an event."""
    raw = _get("DYNAFLOW_WAIT_TIMEOUT", "60")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:  # also NaN
        from dynaflow.errors import ConfigError

        raise ConfigError(f"DYNAFLOW_WAIT_TIMEOUT={raw!r} is not a number of seconds > 0; set it to e.g. 60 "
                          "(or unset it for the default of 60 s).")
    return value


def forced_executor() -> str | None:
    """``DYNAFLOW_EXECUTOR``: an executor name that overrides ``executor="auto"``."""
    return _get("DYNAFLOW_EXECUTOR", "") or None


def record_timeline() -> bool:
    """``DYNAFLOW_TIMELINE``: record a Timeline on every call (on by default; cheap on CPU)."""
    return _get("DYNAFLOW_TIMELINE", "1") not in ("", "0", "false", "False")


def cache_dir() -> str:
    """``DYNAFLOW_CACHE_DIR``: the folder of the autotune cache and saved profiles."""
    return _get("DYNAFLOW_CACHE_DIR", "") or os.path.join(os.path.expanduser("~"), ".cache", "dynaflow")


def progress() -> bool | None:
    """``DYNAFLOW_PROGRESS``: show the autotune progress bar (``None``: only when stderr is a terminal)."""
    value = _get("DYNAFLOW_PROGRESS", "")
    if value == "":
        return None
    return value not in ("0", "false", "False")


def sm_carveout() -> bool:
    """``DYNAFLOW_SM_CARVEOUT``: launches on a lane with an SM partition run under torch's SM carveout for the
    SMs the lane lacks (on by default; off measures what it adds)."""
    return _get("DYNAFLOW_SM_CARVEOUT", "1") not in ("", "0", "false", "False")


def inductor_fuse() -> bool:
    """``DYNAFLOW_INDUCTOR_FUSE``: under ``inductor=True`` each run of launches on a lane compiles as one unit (on by
    default; 0 compiles segment by segment: what fusion adds, or a way around a failure of a fused compile)."""
    return _get("DYNAFLOW_INDUCTOR_FUSE", "1") not in ("", "0", "false", "False")


def integration_enabled(host: str) -> bool:
    """``DYNAFLOW_VLLM`` / ``DYNAFLOW_SGLANG``: the host's plugin entry point turns dynaflow on (off by default,
    so installing dynaflow never changes an engine's behaviour by itself)."""
    return _get(f"DYNAFLOW_{host.upper()}", "0") not in ("", "0", "false", "False")


def integration_options(host: str) -> str:
    """``DYNAFLOW_VLLM_OPTIONS`` / ``DYNAFLOW_SGLANG_OPTIONS``: a JSON object of dynaflow options (the keys of
    ``DynaflowConfig`` plus ``min_rows``); env vars reach the engines' worker processes, Python objects do not."""
    return _get(f"DYNAFLOW_{host.upper()}_OPTIONS", "")


@contextlib.contextmanager
def scope(**values: object) -> Iterator[None]:
    """Temporarily set knobs, e.g. ``with knobs.scope(DYNAFLOW_WAIT_TIMEOUT=0.5): ...``."""
    saved = dict(_overrides)
    _overrides.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
