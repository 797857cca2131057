"""``dynaflow explain FILE`` and ``dynaflow bench FILE``: a user's model, from a Python file, through dynaflow.

The file defines ``example()`` (or the function named by ``--entry``) returning ``(model, args)`` or
``(model, args, kwargs)``: the model and one batch of its inputs, e.g.::

    def example():
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).eval()
        return model, (torch.randn(8, 64),)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from dynaflow.cli_demo import at_least, say
from dynaflow.errors import ConfigError
from dynaflow.timing import interleave

__all__ = ["add_arguments", "load_example", "explain", "bench"]

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser, *, timed: bool) -> None:
    """Options shared by ``explain`` and ``bench`` (``timed``: also the number of interleaved pairs)."""
    p.add_argument("file", help="a Python file whose example() returns (model, args) or (model, args, kwargs)")
    p.add_argument("--entry", default="example", help="the function in FILE to call (default: example)")
    p.add_argument("--strategy", default="nanoflow")
    p.add_argument("--nano-batches", type=int, default=2)
    p.add_argument("--executor", default="auto", choices=["auto", "serial", "thread", "sim"])
    if timed:
        p.add_argument("--repeats", type=at_least(1), default=20, help="interleaved eager/dynaflow pairs timed")


def load_example(file: str, entry: str = "example") -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Import ``file`` and call its ``entry()``: ``(model, args, kwargs)``."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{file}: {'a directory, not a model file' if path.is_dir() else 'no such file'}.")
    spec = importlib.util.spec_from_file_location(path.stem, path) if path.suffix == ".py" else None
    if spec is None or spec.loader is None:
        raise ConfigError(f"{file}: not a Python file (.py) defining {entry}(); a strategy YAML file goes to "
                          "dynaflow.load_strategy, not to this command.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, entry, None)
    if not callable(fn):
        raise ConfigError(f"{file} defines no function {entry}(); it must return (model, args) or (model, args, kwargs).")
    got = fn()
    if not isinstance(got, tuple) or len(got) not in (2, 3):
        raise ConfigError(f"{file}:{entry}() returned {type(got).__name__}; it must return (model, args) or "
                          "(model, args, kwargs).")
    model, args, kwargs = got if len(got) == 3 else (*got, {})
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise ConfigError(f"{file}:{entry}() returned args of type {type(args).__name__} and kwargs of type "
                          f"{type(kwargs).__name__}; args must be a tuple (one input: (x,)) and kwargs a dict.")
    return model, tuple(args), dict(kwargs)


def _compiled(ns: argparse.Namespace) -> tuple[Any, Any, Any, bool]:
    """Load the example, compile it, run both once: ``(eager call, dynaflow call, compiled, outputs equal)``."""
    import dynaflow

    model, args, kwargs = load_example(ns.file, ns.entry)
    fast = dynaflow.compile(model, strategy=ns.strategy, nano_batches=ns.nano_batches, executor=ns.executor)
    with torch.no_grad():
        ref = _eager_reference(model, args, kwargs, f"{ns.file}:{ns.entry}()")
        got = fast(*args, **kwargs)
    got_leaves, ref_leaves = pytree.tree_leaves(got), pytree.tree_leaves(ref)
    same = len(got_leaves) == len(ref_leaves) and all(map(_same_leaf, got_leaves, ref_leaves))
    return (lambda: model(*args, **kwargs)), (lambda: fast(*args, **kwargs)), fast, same


def _eager_reference(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], who: str) -> Any:
    """The model's eager output on a copy of the inputs (a model that writes an input in place would otherwise
    hand dynaflow's call inputs eager already changed). A model that fails eagerly is the example's error."""
    try:
        args, kwargs = copy.deepcopy((args, kwargs))
    except Exception:  # inputs that cannot be copied (an open handle, a lock): eager sees them as they are
        log.debug("%s: inputs not copyable, the eager reference runs on them as they are", who, exc_info=True)
    try:
        return model(*args, **kwargs)
    except Exception as exc:
        raise ConfigError(f"{who}'s model raised when run eagerly, before dynaflow: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Fix the example so that "
                          "model(*args, **kwargs) runs in plain PyTorch.") from exc


def _same_leaf(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=1e-5, equal_nan=True)
    return not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and bool(x == y)


def explain(ns: argparse.Namespace) -> int:
    """Print the segments, split and schedule dynaflow builds for the file's model; 0 when outputs match."""
    _, _, fast, same = _compiled(ns)
    say(fast.explain())
    say(f"\noutputs match eager: {'yes' if same else 'NO'}")
    return 0 if same else 1


def bench(ns: argparse.Namespace) -> int:
    """Time the file's model eager vs dynaflow, interleaved; 0 when outputs match."""
    t0 = time.perf_counter()
    eager, fast_call, _, same = _compiled(ns)
    setup_s = time.perf_counter() - t0
    with torch.no_grad():
        timed = interleave(eager, fast_call, ns.repeats)
    say(f"outputs match eager: {'yes' if same else 'NO'}; load + capture + plan + first calls {setup_s:.2f} s")
    say(f"{timed.pairs} interleaved calls each, median [25th–75th percentile]: eager {timed.a_ms.format(' ms')}, "
        f"dynaflow[{ns.strategy}, {ns.nano_batches} nano] {timed.b_ms.format(' ms')}, ratio {timed.ratio.format()}")
    return 0 if same else 1
