"""The ``dynaflow`` command: ``demo``, ``explain FILE``, ``bench FILE``; ``--help`` lists them, ``--version``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from dynaflow import cli_demo, cli_model
from dynaflow.errors import DynaflowError

__all__ = ["main", "demo", "parser"]

demo = cli_demo.demo

COMMANDS = {
    "demo": ("eager vs dynaflow on a small random Llama: outputs checked equal, explain table, interleaved "
             "timings, Perfetto trace", cli_demo.run),
    "explain": ("segments, split and schedule that dynaflow builds for a model file's example() "
                "(returns (model, args[, kwargs]))", cli_model.explain),
    "bench": ("eager vs dynaflow on a model file's example(), timed interleaved (medians with spread)",
              cli_model.bench),
}


def _version() -> str:
    import torch

    from dynaflow import __version__

    return f"dynaflow {__version__} (torch {torch.__version__})"


def parser() -> argparse.ArgumentParser:
    """The top-level parser: one sub-command per entry of ``COMMANDS``."""
    p = argparse.ArgumentParser(prog="dynaflow", description="Intra-device parallelism for PyTorch models as a "
                                "compiler pass. `dynaflow COMMAND --help` for a command's options.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, (summary, _) in COMMANDS.items():
        cmd = sub.add_parser(name, help=summary, description=summary)
        if name == "demo":
            cli_demo.add_arguments(cmd)
        else:
            cli_model.add_arguments(cmd, timed=name == "bench")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynaflow`` script; bare ``dynaflow`` prints the help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = parser()
    if not argv:
        p.print_help()
        return 0
    args = p.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except DynaflowError as exc:  # a message that names the fix: no traceback
        print(f"dynaflow {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
