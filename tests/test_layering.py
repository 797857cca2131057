"""Import boundaries between dynaflow's layers (see docs/ARCHITECTURE.md, "Layering rules").

Every ``.py`` file under ``dynaflow/``, ``frontend/``, ``strategies/``, ``backend/`` and ``integrations/`` is
parsed with :mod:`ast` (nothing is imported), each file is mapped to its layer, and every import it makes —
absolute (``import dynaflow.x``, ``from dynaflow.x import y``, ``from dynaflow import x``) or relative
(``from . import x``, ``from ..ir import y``) — is resolved to the layer of its target. Imports at any depth
count (inside functions, under ``if TYPE_CHECKING:``): a lazy import is still a dependency.

Layers and what each may import (besides itself):

=============  ========================================================================================
core           ``dynaflow/*.py`` except the facade modules; only stdlib, torch, networkx, sympy, yaml
facade         ``dynaflow/{__init__,api,compiled_graph,planning,tune,tune_cache,tuning_planner,profiling,segment_timing,
               cli,cli_demo,cli_model,__main__,models}.py``; core, frontend, strategies, backend
frontend       core
strategies     core, and the rule types of ``dynaflow.frontend.rules``; never backend
backend        core; never strategies or frontend
integrations   everything
=============  ========================================================================================

Nothing but integrations imports ``dynaflow.integrations``; no layer imports the facade except the facade.
And no module imports itself back through others: the import graph (lazy imports included) has no cycle;
a cycle fails with its path (``a.py -> b.py -> a.py``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> (package it installs as, layer)
FOLDERS = {
    "dynaflow": ("dynaflow", "core"),
    "frontend": ("dynaflow.frontend", "frontend"),
    "strategies": ("dynaflow.strategies", "strategies"),
    "backend": ("dynaflow.backend", "backend"),
    "integrations": ("dynaflow.integrations", "integrations"),
}
FACADE = {"__init__", "api", "cli", "cli_demo", "cli_model", "__main__", "models", "tune", "tune_cache", "profiling",
          "planning", "compiled_graph", "tuning_planner", "segment_timing"}
"""Modules of ``dynaflow/`` that wire the layers together (the public API); everything else there is core."""

SUBPACKAGE_LAYER = {
    "dynaflow.frontend": "frontend",
    "dynaflow.strategies": "strategies",
    "dynaflow.backend": "backend",
    "dynaflow.integrations": "integrations",
}

ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "facade": {"core", "facade", "frontend", "strategies", "backend"},
    "frontend": {"core", "frontend"},
    "strategies": {"core", "strategies"},
    "backend": {"core", "backend"},
    "integrations": {"core", "facade", "frontend", "strategies", "backend", "integrations"},
}
STRATEGIES_MAY_IMPORT = {"dynaflow.frontend.rules"}
"""The one frontend module strategies may use: the rule types a strategy returns from ``rules()``."""

CORE_THIRD_PARTY = {"torch", "networkx", "sympy", "yaml"}
OPTIONAL_HEAVY = ("transformers", "vllm", "sglang", "triton", "cuda", "matplotlib")


@dataclass(frozen=True)
class Import:
    file: str
    line: int
    source: str
    """The import as written (for messages)."""
    target: str
    """The absolute module the import resolves to (a ``dynaflow.*`` module or a top-level package)."""


def module_of(path: Path, root: Path = ROOT) -> str:
    """The installed module name of a source file, e.g. ``frontend/rules.py`` -> ``dynaflow.frontend.rules``."""
    rel = path.relative_to(root)
    package = FOLDERS[rel.parts[0]][0]
    parts = list(rel.with_suffix("").parts[1:])
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def layer_of_module(name: str) -> str | None:
    """The layer of a ``dynaflow`` module name; ``None`` for anything outside the package."""
    if name != "dynaflow" and not name.startswith("dynaflow."):
        return None
    for prefix, layer in SUBPACKAGE_LAYER.items():
        if name == prefix or name.startswith(prefix + "."):
            return layer
    if name == "dynaflow":
        return "facade"  # the package itself is dynaflow/__init__.py
    first = name.split(".")[1]
    return "facade" if first in FACADE else "core"


def layer_of_file(path: Path, root: Path = ROOT) -> str:
    return layer_of_module(module_of(path, root))  # type: ignore[return-value]


def source_files(root: Path = ROOT) -> list[Path]:
    files: list[Path] = []
    for folder in FOLDERS:
        base = root / folder
        if base.is_dir():
            files.extend(p for p in sorted(base.rglob("*.py")) if "__pycache__" not in p.parts)
    return files


def _known_modules(root: Path) -> set[str]:
    known = {module_of(p, root) for p in source_files(root)}
    known.update(SUBPACKAGE_LAYER)  # installed packages even when a folder is missing in a checkout
    return known


def imports_of(path: Path, root: Path = ROOT, known: set[str] | None = None) -> list[Import]:
    """Every import in ``path``, resolved to absolute module names."""
    known = known if known is not None else _known_modules(root)
    module = module_of(path, root)
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = str(path.relative_to(root))
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(rel, node.lineno, f"import {alias.name}", alias.name))
        elif isinstance(node, ast.ImportFrom):
            written = "." * node.level + (node.module or "")
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 > len(base_parts) - 1:
                    raise AssertionError(f"{rel}:{node.lineno}: relative import {written!r} leaves the package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            for alias in node.names:
                # ``from pkg import name``: a submodule when pkg.name is one, else an attribute of pkg
                candidate = f"{base}.{alias.name}"
                target = candidate if candidate in known else base
                out.append(Import(rel, node.lineno, f"from {written} import {alias.name}", target))
    return out


def violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks a layering rule, as ``file:line: import -> why``."""
    known = _known_modules(root)
    stdlib = set(sys.stdlib_module_names)
    problems: list[str] = []
    for path in source_files(root):
        layer = layer_of_file(path, root)
        for imp in imports_of(path, root, known):
            where = f"{imp.file}:{imp.line}: {imp.source!r}"
            target_layer = layer_of_module(imp.target)
            if target_layer is None:
                top = imp.target.split(".")[0]
                if layer == "core" and top not in stdlib and top not in CORE_THIRD_PARTY:
                    problems.append(f"{where} -> core may import only the stdlib and "
                                    f"{sorted(CORE_THIRD_PARTY)}, not {top!r}")
                continue
            if target_layer == layer:
                continue
            if layer == "strategies" and imp.target in STRATEGIES_MAY_IMPORT:
                continue
            if target_layer not in ALLOWED[layer]:
                problems.append(f"{where} -> {layer} must not import {target_layer} ({imp.target})")
    return problems


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Every cycle of the module import graph (lazy imports included), each as the list of modules on it,
    first module repeated at the end. An import of a package's attribute counts as an import of the package
    (its ``__init__``); the implicit import of a parent package by its submodules does not."""
    known = _known_modules(root)
    graph: dict[str, set[str]] = {}
    for path in source_files(root):
        mod = module_of(path, root)
        graph.setdefault(mod, set()).update(i.target for i in imports_of(path, root, known)
                                            if i.target in known and i.target != mod)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for nxt in sorted(graph.get(mod, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    return cycles


# --------------------------------------------------------------------------------------------------------
# the package itself
# --------------------------------------------------------------------------------------------------------
def test_every_layer_has_files():
    layers = {layer_of_file(p) for p in source_files()}
    assert {"core", "facade", "frontend", "strategies", "backend"} <= layers, layers


def test_layering_rules_hold():
    problems = violations()
    assert not problems, "layering violations (see docs/ARCHITECTURE.md):\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles (break them; see docs/ARCHITECTURE.md):\n  " + "\n  ".join(
        " -> ".join(c) for c in cycles)


@pytest.mark.slow  # a fresh interpreter; the no-optional-dependency import below covers it in the default tier
def test_import_dynaflow_without_transformers():
    code = "import sys; sys.modules['transformers'] = None; import dynaflow; print(len(dynaflow.__all__))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_import_dynaflow_without_any_optional_dependency():
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in OPTIONAL_HEAVY)
    code = (f"import sys; {blocked}; import dynaflow, dynaflow.frontend, dynaflow.strategies, dynaflow.backend, "
            "dynaflow.integrations; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_every_package_folder_is_installed():
    """A folder with an ``__init__.py`` that ``pyproject.toml`` does not list works in an editable install but is
    missing from a wheel (``pip install .``): every one of them is listed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_of(p) for p in source_files() if p.name == "__init__.py"}
    assert packages - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


PUBLIC_API = [
    "ALL", "BackendError", "BatchCouplingError", "CaptureError", "Compiled", "ConfigError", "DynaflowConfig",
    "DynaflowError", "InputInfo", "Lane", "Mod", "NanoGraph", "NanoOp", "Op", "PartitionError", "RequestLayout",
    "Resource", "Schedule", "ScheduleError", "Segment", "SegmentKind", "Seq", "SplitConfig", "Strategy",
    "StrategyError", "Timeline", "TimelineEvent", "Where", "compile", "default_rules", "load_strategy", "mark", "parallelize",
    "profile", "register_strategy", "requests", "strategies", "timeline",
]


def test_public_api_snapshot():
    """``dynaflow.__all__`` is public API (DESIGN.md): change this snapshot only on purpose."""
    import dynaflow

    assert sorted(dynaflow.__all__) == PUBLIC_API
    missing = [name for name in dynaflow.__all__ if not hasattr(dynaflow, name)]
    assert not missing, f"names in dynaflow.__all__ that the package does not define: {missing}"


# --------------------------------------------------------------------------------------------------------
# the checker itself, on a small fake tree
# --------------------------------------------------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for folder in FOLDERS:
        (tmp_path / folder).mkdir(exist_ok=True)
        init = tmp_path / folder / "__init__.py"
        if not init.exists():
            init.write_text("")
    return tmp_path


def test_module_and_layer_mapping(tmp_path):
    root = _tree(tmp_path, {"frontend/sub/deep.py": "", "dynaflow/ir.py": "", "dynaflow/api.py": ""})
    assert module_of(root / "frontend/sub/deep.py", root) == "dynaflow.frontend.sub.deep"
    assert module_of(root / "backend/__init__.py", root) == "dynaflow.backend"
    assert layer_of_file(root / "dynaflow/ir.py", root) == "core"
    assert layer_of_file(root / "dynaflow/api.py", root) == "facade"
    assert layer_of_file(root / "dynaflow/__init__.py", root) == "facade"
    assert layer_of_module("dynaflow.strategies.base") == "strategies"
    assert layer_of_module("torch.fx") is None


def test_relative_and_from_package_imports_resolve(tmp_path):
    root = _tree(tmp_path, {
        "dynaflow/ir.py": "",
        "dynaflow/knobs.py": "",
        "strategies/base.py": "from ..ir import X\nfrom . import nanoflow\nfrom .. import knobs\n",
        "strategies/nanoflow.py": "",
    })
    targets = [i.target for i in imports_of(root / "strategies/base.py", root)]
    assert targets == ["dynaflow.ir", "dynaflow.strategies.nanoflow", "dynaflow.knobs"]


@pytest.mark.parametrize("rel, text, expected", [
    ("backend/program.py", "from dynaflow.strategies import get\n", "backend must not import strategies"),
    ("backend/program.py", "from ..frontend.rules import Op\n", "backend must not import frontend"),
    ("strategies/base.py", "import dynaflow.backend.executors\n", "strategies must not import backend"),
    ("strategies/base.py", "from dynaflow.frontend.partition import partition\n", "strategies must not import frontend"),
    ("frontend/rules.py", "def f():\n    from dynaflow import strategies\n", "frontend must not import strategies"),
    ("dynaflow/ir.py", "from dynaflow.frontend import rules\n", "core must not import frontend"),
    ("dynaflow/ir.py", "import dynaflow\n", "core must not import facade"),
    ("dynaflow/ir.py", "from dynaflow import DynaflowError\n", "core must not import facade"),
    ("dynaflow/ir.py", "import transformers\n", "core may import only"),
    ("dynaflow/api.py", "from dynaflow.integrations import vllm\n", "facade must not import integrations"),
])
def test_checker_catches_violations(tmp_path, rel, text, expected):
    files = {"integrations/vllm.py": "", "strategies/base.py": "", "frontend/rules.py": "", "frontend/partition.py": ""}
    files[rel] = text
    root = _tree(tmp_path, files)
    found = violations(root)
    assert any(expected in v for v in found), found


def test_checker_finds_a_cycle_with_its_path(tmp_path):
    root = _tree(tmp_path, {
        "dynaflow/ir.py": "def f():\n    from dynaflow.verify import verify\n",
        "dynaflow/verify.py": "from dynaflow.ir import NanoGraph\n",
        "backend/arena.py": "from dynaflow.backend.program import Program\n",
        "backend/program.py": "",
    })
    assert import_cycles(root) == [["dynaflow.ir", "dynaflow.verify", "dynaflow.ir"]]


def test_checker_allows_the_rules(tmp_path):
    root = _tree(tmp_path, {
        "dynaflow/ir.py": "import networkx\nimport sympy\nimport yaml\nimport torch.fx\nfrom typing import Any\n",
        "dynaflow/verify.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dynaflow.ir import X\n",
        "dynaflow/api.py": "from dynaflow.backend import lower\nfrom dynaflow.strategies import get\n",
        "strategies/base.py": "from dynaflow.frontend.rules import Op\nfrom dynaflow.ir import Lane\n",
        "frontend/rules.py": "from dynaflow.ir import HINTS\nfrom . import batching\nimport sympy\n",
        "frontend/batching.py": "from dynaflow.frontend.rules import op_name\n",
        "backend/program.py": "from dynaflow import knobs\nfrom dynaflow.segmented import Value\n",
        "integrations/vllm.py": "import dynaflow\nfrom dynaflow.backend import lower\nimport vllm\n",
        "dynaflow/knobs.py": "", "dynaflow/segmented.py": "",
    })
    assert violations(root) == []
