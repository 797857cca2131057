"""The ``dynaflow`` command: help lists every command, ``--version``, bare ``dynaflow``, model files, the demo's
interleaved timing output, and :mod:`dynaflow.timing`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dynaflow
from dynaflow.cli import COMMANDS, main
from dynaflow.timing import interleave, spread

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "examples" / "04_model_file.py"


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynaflow", *argv], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_with_a_line_and_bare_dynaflow_prints_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    helped = capsys.readouterr().out
    assert exit_.value.code == 0
    for name in ("demo", "explain", "bench"):
        assert name in COMMANDS
        line = next(x for x in helped.splitlines() if x.strip().startswith(name + " "))
        assert len(line.split()) > 3, line  # the command and its one-line summary
    bare = _cli()  # the real entry point: python -m dynaflow
    assert bare.returncode == 0 and bare.stdout == helped


def test_version_names_dynaflow_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"dynaflow {dynaflow.__version__} (torch ")


def test_unknown_command_exits_2_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "demo" in err and "explain" in err


def test_explain_and_bench_run_a_model_file(capsys):
    assert main(["explain", str(MODEL_FILE), "--strategy", "round_robin", "--executor", "serial"]) == 0
    out = capsys.readouterr().out
    assert "Schedule('round_robin'" in out and "outputs match eager: yes" in out
    assert main(["bench", str(MODEL_FILE), "--strategy", "sequential", "--nano-batches", "1", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 interleaved calls each" in out and "ratio" in out


def test_explain_compares_nan_outputs_as_equal(tmp_path, capsys):
    """A model whose output holds NaN where eager's does: the outputs match (NaN is not a mismatch)."""
    path = tmp_path / "nan_model.py"
    path.write_text("import torch\ndef example():\n    torch.manual_seed(0)\n    x = torch.randn(8, 16)\n"
                    "    x[0, 0] = float('nan')\n    return torch.nn.Linear(16, 16).eval(), (x,)\n")
    assert main(["explain", str(path), "--executor", "serial"]) == 0
    assert "outputs match eager: yes" in capsys.readouterr().out


def test_a_model_file_without_example_names_the_contract(tmp_path, capsys):
    bad = tmp_path / "m.py"
    bad.write_text("x = 1\n")
    assert main(["explain", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "defines no function example()" in err and "Traceback" not in err


@pytest.mark.parametrize("content, expected", [
    ("import torch\ndef example():\n    return torch.nn.Linear(4, 4), torch.randn(3, 4)\n", "args must be a tuple"),
    (None, "not a Python file"),
    ("import torch\ndef example():\n    return torch.nn.Linear(4, 4), (torch.randn(3, 5),)\n",
     "m.py:example()'s model raised when run eagerly, before dynaflow: RuntimeError: mat1 and mat2 shapes"),
])
def test_odd_model_files_get_a_message_not_a_traceback(tmp_path, capsys, content, expected):
    path = tmp_path / ("m.py" if content is not None else "strategy.yaml")
    path.write_text(content if content is not None else "name: nanoflow\n")
    assert main(["explain", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_demo_prints_interleaved_medians_with_spread_and_capture_alone(capsys, tmp_path):
    rc = main(["demo", "--model", "builtin", "--layers", "1", "--hidden", "32", "--batch", "4", "--seq", "8",
               "--strategy", "sequential", "--nano-batches", "1", "--repeats", "4", "--trace", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "capture + plan (dynaflow's first call, timed alone)" in out
    assert "4 interleaved calls each, median [25th–75th percentile]" in out
    assert "ratio dynaflow / eager (per pair)" in out and "–" in out.split("ratio dynaflow / eager")[1]


def test_spread_and_interleave():
    s = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s.median, s.low, s.high) == (3.0, 2.0, 4.0) and s.format(" ms", 1) == "3.0 ms [2.0–4.0]"
    assert s.overlaps(spread([3.0, 4.0, 5.0])) and not s.overlaps(spread([5.0, 6.0, 7.0]))
    order: list[str] = []
    result = interleave(lambda: order.append("a"), lambda: order.append("b"), pairs=3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"] and result.pairs == 3


@pytest.mark.parametrize("argv, expected", [
    (["demo", "--batch", "0"], "argument --batch: 0 is too small: it must be an int >= 1"),
    (["demo", "--seq", "x"], "argument --seq: 'x' is not an int"),
    (["demo", "--hidden", "12"], "argument --hidden: 12 is not a multiple of 8"),
    (["demo", "--repeats", "0"], "argument --repeats: 0 is too small"),
    (["demo", "--layers", "-1"], "argument --layers: -1 is too small: it must be an int >= 0"),
    (["bench", "--repeats", "0", "model.py"], "argument --repeats: 0 is too small"),
])
def test_out_of_range_sizes_are_refused_before_a_model_is_built(capsys, argv, expected):
    """A batch, sequence or width the demo models cannot take is an argparse error naming the option, not a
    traceback from transformers; a zero repeat count is refused instead of timing one pair anyway."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_model_that_writes_its_input_is_compared_on_a_copy(tmp_path, capsys):
    """Eager's reference call runs on a copy of the inputs: a model that writes an input in place does not hand
    dynaflow's call an input eager already changed (which would print a false NO)."""
    path = tmp_path / "m.py"
    path.write_text("import torch\ndef f(x):\n    x.add_(1)\n    return x * 2\n"
                    "def example():\n    return f, (torch.ones(4, 3),)\n")
    assert main(["explain", str(path)]) == 0
    assert "outputs match eager: yes" in capsys.readouterr().out
