"""Getting a vLLM engine ready for dynaflow, and refusing by name the settings it cannot honour: the version
range, the per-nano-batch metadata builders, AOT compile, piecewise mode on a platform that rewrites it away,
and full CUDA graphs around the step."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import vllm
import vllm.envs as vllm_envs

from dynaflow import knobs
from dynaflow.integrations._common import IntegrationError
from dynaflow.integrations.vllm import _metadata, _piecewise
from dynaflow.integrations.vllm._settings import BACKEND_QUALNAME, SUPPORTED, max_nano_batches, options

log = logging.getLogger("dynaflow.integrations.vllm")


def check_version() -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if Version(vllm.__version__) not in SpecifierSet(SUPPORTED):
        raise IntegrationError(
            f"dynaflow's vLLM integration supports vllm{SUPPORTED}; found vllm {vllm.__version__}. Install a "
            "supported version, or run the integration contract tests (pytest -m integration) against this one "
            "and widen SUPPORTED if they pass."
        )


def setup_engine(opts: Mapping[str, Any]) -> None:
    """What must be in place before vLLM builds its engine in this process: per-nano-batch metadata builders,
    AOT compile off unless the user turned it on (then the backend refuses by name), the piecewise route only
    where the platform honours it."""
    _metadata.install(max_nano_batches(opts))
    if "VLLM_USE_AOT_COMPILE" not in os.environ:
        os.environ["VLLM_USE_AOT_COMPILE"] = "0"
        log.info("VLLM_USE_AOT_COMPILE=0: dynaflow's step holds a live plan and cannot be serialised")
    if opts.get("piecewise"):
        _piecewise.install_piecewise_compiler()
        refuse_platform_rewrite()


def refuse_platform_rewrite() -> None:
    """With ``piecewise`` on, fail engine start when the platform rewrites mode 3 away (vLLM's CPU platform
    turns it into whole-graph mode with Inductor), instead of silently never running dynaflow. Wraps the
    platform's ``check_and_update_config`` (idempotent)."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    cls = type(current_platform)
    original = cls.check_and_update_config
    if getattr(original, "_dynaflow", False):
        return

    def check_and_update_config(platform: type, vllm_config: Any) -> None:
        before = vllm_config.compilation_config.mode
        original.__func__(platform, vllm_config)
        after = vllm_config.compilation_config.mode
        if before == CompilationMode.VLLM_COMPILE and after != before and options().get("piecewise"):
            raise IntegrationError(
                f"dynaflow option piecewise=true: vLLM's {platform.__name__} rewrote piecewise compilation (mode 3) "
                f"to {CompilationMode(after).name} with backend {vllm_config.compilation_config.backend!r}, so "
                "dynaflow would never run. Use whole-graph mode instead: "
                f"compilation_config={{'mode': 2, 'backend': '{BACKEND_QUALNAME}'}} without piecewise.")

    check_and_update_config._dynaflow = True  # type: ignore[attr-defined]
    cls.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign]


def cpu_executor(executor: str, c_kernels: bool) -> str:
    """The executor a step may use on vLLM's CPU platform: ``serial``. vLLM's CPU kernels are not safe to call
    from two threads at once (a stress run of ``_C.onednn_mm`` on three threads gave wrong products with
    different handlers and aborted with heap corruption on one shared handler), and the thread executor runs
    different segments on different threads. ``auto`` (which picks ``thread`` for multi-lane programs) becomes
    ``serial``; an explicit ``thread`` is refused by name. ``c_kernels``: the graph calls vLLM's ``_C`` ops."""
    from vllm.platforms import current_platform

    if not (c_kernels and current_platform.is_cpu()):
        return executor
    for name, value in (("dynaflow option executor", executor), ("DYNAFLOW_EXECUTOR", knobs.forced_executor())):
        if value == "thread":  # the knob overrides the option wherever an executor is made: refused as well
            raise IntegrationError(
                f"{name}='thread' on vLLM's CPU platform: vLLM's CPU kernels (_C.onednn_mm and friends) are not "
                "thread-safe, so running segments on several threads gives wrong answers or heap corruption. Use "
                "'serial' (or 'auto', which is serial here), and leave DYNAFLOW_EXECUTOR unset or 'serial'.")
    return "serial" if executor == "auto" else executor


def check_aot_compile() -> None:
    """vLLM's ahead-of-time compile serialises what the backend returns; dynaflow's step holds a live plan
    and cannot be serialised, so that mode is refused by name."""
    if vllm_envs.VLLM_USE_AOT_COMPILE:
        raise IntegrationError(
            "vLLM's ahead-of-time compile is on (VLLM_USE_AOT_COMPILE=1) and would serialise dynaflow's step, which "
            "holds a live plan. Set VLLM_USE_AOT_COMPILE=0 (enable() does so when the variable is unset).")


def check_cuda_graphs(vllm_config: Any = None) -> None:
    """dynaflow's step does not run inside vLLM's full CUDA-graph capture: the thread executor starts threads
    and nano-batch metadata is built per step on the host, neither of which a captured graph replays. On a
    CUDA platform with full CUDA graphs on, the backend refuses by name (piecewise graphs never wrap it)."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return
    mode = (vllm_config or get_current_vllm_config()).compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise IntegrationError(
            f"vLLM compilation_config.cudagraph_mode={mode.name} would capture dynaflow's step in a full CUDA graph, "
            "which does not replay its per-step nano-batch metadata or executor threads. Add \"cudagraph_mode\": "
            f"\"NONE\" to compilation_config (with mode 2 and backend {BACKEND_QUALNAME!r}), or use nano_batches=1.")
