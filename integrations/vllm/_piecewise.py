"""vLLM piecewise mode (``CompilationMode.VLLM_COMPILE``): vLLM splits the graph at attention and dynaflow
compiles each dense piece, through :class:`DynaflowCompiler` (a vLLM ``CompilerInterface``)."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx
from vllm.compilation.compiler_interface import CompilerInterface

from dynaflow.api import CompiledGraph
from dynaflow.integrations.vllm._settings import options, vllm_strategy

log = logging.getLogger("dynaflow.integrations.vllm")


def install_piecewise_compiler() -> None:
    """vLLM piecewise mode (``CompilationMode.VLLM_COMPILE``): vLLM keeps splitting the graph at attention and
    its piecewise machinery, and each dense piece is compiled by :class:`DynaflowCompiler` instead of Inductor.

    vLLM 0.32 accepts only ``eager`` / ``inductor`` as a mode-3 backend and resolves the compiler with the
    module function ``vllm.compilation.backends.make_compiler``; that function is wrapped (idempotently).
    The platform's ``simple_compile_backend`` is deliberately left alone: in whole-graph mode vLLM uses it
    as the torch.compile backend for ``"inductor"``."""
    import vllm.compilation.backends as backends

    if getattr(backends.make_compiler, "_dynaflow", False):
        return
    original = backends.make_compiler

    def make_compiler(compilation_config: Any, *args: Any, **kwargs: Any) -> CompilerInterface:
        return DynaflowCompiler()

    make_compiler._dynaflow = True  # type: ignore[attr-defined]
    make_compiler.__wrapped__ = original  # type: ignore[attr-defined]
    backends.make_compiler = make_compiler
    log.info("vLLM piecewise mode: dense pieces compile with dynaflow (make_compiler wrapped)")


class DynaflowCompiler(CompilerInterface):
    """vLLM piecewise mode: compile each dense piece (between vLLM's attention splits) with dynaflow.

    Pieces hold no forward-context op, so they are split into nano-batches anywhere along the token dim."""

    name = "dynaflow"

    def compute_hash(self, vllm_config: Any) -> str:
        return f"dynaflow-{sorted(options().items())!r}"

    def compile(self, graph: torch.fx.GraphModule, example_inputs: list[Any], compiler_config: dict[str, Any],
                compile_range: Any, key: str | None = None) -> tuple[Callable[..., Any] | None, Any | None]:
        cfg, strategy = vllm_strategy(options())
        compiled = CompiledGraph(graph, cfg, strategy, label=f"vllm-piece-{key or 'x'}")
        traced = any("val" in n.meta or "example_value" in n.meta for n in graph.graph.nodes if n.op == "placeholder")
        # vLLM's pieces keep Dynamo's fake values (token dim symbolic): partition them as they are; a plain
        # GraphModule (tests, other callers) gets a symbolic batch from its example inputs first
        compiled.prepare(example_inputs, from_fx=not traced)
        PIECES.append(compiled)
        return compiled, None


PIECES: list[CompiledGraph] = []
"""Every piece DynaflowCompiler compiled in this process (for explain() and tests)."""
