"""Data files never run code, and the autotune cache survives corruption and concurrent writers (issue 15,
items 1 and 2)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

import dynaflow
from dynaflow.errors import StrategyError
from dynaflow.profiles import load_profiles
from dynaflow.strategies import Auto, Candidate, load_strategy, registry
from dynaflow.tune import CACHE_SCHEMA, Trial, TuneCache, TuneResult
from models import grad_off, make_mlp, mlp_input

PWN = "PWNED"


def _system_entry(tmp_path) -> dict:
    return {"strategy": "os:system", "options": {"command": f"touch {tmp_path / PWN}"}}


def test_a_yaml_strategy_file_naming_a_function_runs_nothing(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: 'os:system'\ncommand: 'touch {tmp_path / PWN}'\n")
    with pytest.raises(StrategyError) as info:
        load_strategy(path)
    msg = str(info.value)
    assert str(path) in msg and "'os:system'" in msg and "not a Strategy subclass" in msg and "refused" in msg
    assert not (tmp_path / PWN).exists()


def test_a_yaml_auto_candidate_naming_a_function_runs_nothing(tmp_path):
    path = tmp_path / "auto.yaml"
    path.write_text(json.dumps({"name": "auto", "measure_top_k": 0, "cache": False,
                                "candidates": [_system_entry(tmp_path)]}))
    with pytest.raises(StrategyError) as info:
        load_strategy(path)
    assert str(path) in str(info.value) and "os:system" in str(info.value)
    assert not (tmp_path / PWN).exists()


def test_a_string_in_code_naming_a_non_strategy_callable_is_refused_before_the_call(tmp_path):
    with pytest.raises(StrategyError, match="refused without calling it"):
        registry.resolve("os:system", command=f"touch {tmp_path / PWN}")
    assert not (tmp_path / PWN).exists()
    # classes named in code and data still load
    assert type(registry.resolve("dynaflow.strategies:RoundRobin", nano_batches=2)).__name__ == "RoundRobin"
    assert registry.load("round_robin", {"nano_batches": 2}, source="x.yaml").name == "round_robin"


def _seed_cache(tmp_path, monkeypatch, entry) -> tuple[str, str]:
    """Compile once with caching on to learn the key, then overwrite that entry with ``entry``."""
    monkeypatch.setenv("DYNAFLOW_CACHE_DIR", str(tmp_path))
    compiled = dynaflow.compile(make_mlp(), strategy=Auto(measure_top_k=0), executor="serial")
    with grad_off():
        compiled(mlp_input(4))
    path = str(tmp_path / "autotune.json")
    data = json.loads(open(path).read())
    (key,) = data
    data[key] = entry
    with open(path, "w") as f:
        json.dump(data, f)
    torch._dynamo.reset()
    return path, key


def _run_auto():
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy=Auto(measure_top_k=0), executor="serial")
    with grad_off():
        torch.testing.assert_close(compiled(mlp_input(4)), model(mlp_input(4)))
    return compiled


def test_a_cache_entry_naming_os_system_is_refused_and_names_the_file(tmp_path, monkeypatch):
    path, _ = _seed_cache(tmp_path, monkeypatch, {"schema": CACHE_SCHEMA, "candidate": _system_entry(tmp_path)})
    with pytest.raises(StrategyError) as info:
        _run_auto()
    assert path in str(info.value) and "os:system" in str(info.value)
    assert not (tmp_path / PWN).exists()


@pytest.mark.parametrize("entry", [
    {"schema": CACHE_SCHEMA, "candidate": {"strategy": "nanoflow", "options": [1, 2]}},
    {"schema": CACHE_SCHEMA, "candidate": {"strategy": "no_such_strategy", "options": {}}},
    {"schema": CACHE_SCHEMA, "candidate": {"strategy": "nanoflow", "options": {"bogus": 1}}},
    {"schema": CACHE_SCHEMA, "candidate": "nanoflow"},
    {"candidate": {"strategy": "nanoflow", "options": {}}},  # an entry of an older schema
    ["not", "a", "dict"],
    {"schema": CACHE_SCHEMA, "candidate": {"strategy": "nanoflow", "options": {"sm_counts": "ab"}}},
    {"schema": CACHE_SCHEMA, "candidate": {"strategy": "nanoflow", "options": {"nano_batches": 2}, "graphs": True}},
], ids=["options-list", "unknown-strategy", "unknown-option", "candidate-str", "no-schema", "entry-list",
        "option-of-wrong-type", "graphs-on-cpu"])
def test_a_malformed_cache_entry_warns_naming_the_file_and_tunes_again(tmp_path, monkeypatch, caplog, entry):
    path, key = _seed_cache(tmp_path, monkeypatch, entry)
    with caplog.at_level(logging.WARNING):
        compiled = _run_auto()
    assert any(path in r.getMessage() for r in caplog.records)
    (result,) = compiled.last_graph.tuned.values()
    assert not result.from_cache
    assert json.loads(open(path).read())[key]["schema"] == CACHE_SCHEMA  # the entry was rewritten


@pytest.mark.parametrize("content", [b"\x80\x81\xff\xfe binary", b'{"truncated": ', b"[1, 2, 3]",
                                     b"[" * 100_000 + b"]" * 100_000],
                         ids=["binary", "truncated", "list", "nested-too-deep"])
def test_a_corrupt_cache_file_is_moved_aside_and_tuning_runs_again(tmp_path, monkeypatch, caplog, content):
    monkeypatch.setenv("DYNAFLOW_CACHE_DIR", str(tmp_path))
    path = tmp_path / "autotune.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        compiled = _run_auto()
    assert any(str(path) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    aside = [p for p in os.listdir(tmp_path) if p.startswith("autotune.json.corrupt-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == content
    assert not next(iter(compiled.last_graph.tuned.values())).from_cache
    assert len(json.loads(path.read_text())) == 1


def _result(i: int) -> TuneResult:
    trial = Trial(Candidate("nanoflow", (("nano_batches", 1 + i % 4),)), None, None)
    return TuneResult(f"b{i}", (trial,), trial, "test")


def test_concurrent_threads_lose_no_cache_entries(tmp_path):
    cache = TuneCache(str(tmp_path / "autotune.json"))

    def write(t: int) -> None:
        for i in range(200):
            cache.put(f"t{t}-{i}", _result(i))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert len(data) == 800 and all(e["schema"] == CACHE_SCHEMA for e in data.values())
    assert cache.get("t3-199") == (Candidate("nanoflow", (("nano_batches", 4),)), "test")


_WRITER = """
import sys
from dynaflow.strategies import Candidate
from dynaflow.tune import Trial, TuneCache, TuneResult
cache = TuneCache(sys.argv[1])
for i in range(200):
    t = Trial(Candidate("nanoflow", (("nano_batches", 2),)), None, None)
    cache.put(f"p{sys.argv[2]}-{i}", TuneResult("b", (t,), t, "test"))
"""


def test_concurrent_processes_lose_no_cache_entries(tmp_path):
    path = str(tmp_path / "autotune.json")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, str(p)]) for p in range(4)]
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    data = json.loads(open(path).read())
    assert len(data) == 800
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def _module_that_touches(tmp_path, monkeypatch, name: str) -> None:
    """A module on sys.path whose import creates the PWN file and which defines a Strategy subclass."""
    (tmp_path / f"{name}.py").write_text(
        f"open({str(tmp_path / PWN)!r}, 'w').close()\n"
        "from dynaflow.strategies import RoundRobin\n"
        "class Mine(RoundRobin):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_data_file_never_imports_a_module(tmp_path, monkeypatch):
    """Importing runs a module's top-level code, so a YAML strategy file (or an autotune candidate) may name a
    'module:Class' only from a module the program imported itself; once imported, the same file loads."""
    _module_that_touches(tmp_path, monkeypatch, "df_side_effect_mod")
    path = tmp_path / "mine.yaml"
    path.write_text("name: 'df_side_effect_mod:Mine'\nnano_batches: 2\n")
    with pytest.raises(StrategyError) as info:
        load_strategy(path)
    msg = str(info.value)
    assert str(path) in msg and "is not imported" in msg and "import df_side_effect_mod" in msg
    with pytest.raises(StrategyError, match="is not imported"):
        registry.load_class("df_side_effect_mod:Mine", source="a cache")
    assert not (tmp_path / PWN).exists() and "df_side_effect_mod" not in sys.modules
    import df_side_effect_mod  # noqa: F401 - the program's own import: its side effect is the program's

    assert type(load_strategy(path)).__name__ == "Mine"


def test_a_strategy_named_in_a_config_dict_or_integration_options_imports_nothing(tmp_path, monkeypatch):
    """A dict of options may be a YAML or JSON file's (``DynaflowConfig.from_dict``, ``DYNAFLOW_VLLM_OPTIONS``):
    its ``"module:Class"`` strategy is data, so its module is not imported; a keyword argument is code, and is."""
    from dynaflow.integrations._common import IntegrationError, parse_options

    _module_that_touches(tmp_path, monkeypatch, "df_side_effect_cfg_mod")
    with pytest.raises(StrategyError, match="is not imported"):
        dynaflow.compile(make_mlp(), config={"strategy": "df_side_effect_cfg_mod:Mine", "nano_batches": 2})
    with pytest.raises(IntegrationError, match="DYNAFLOW_VLLM_OPTIONS: strategy .* is not imported"):
        parse_options('{"strategy": "df_side_effect_cfg_mod:Mine"}', "DYNAFLOW_VLLM_OPTIONS")
    assert not (tmp_path / PWN).exists() and "df_side_effect_cfg_mod" not in sys.modules
    compiled = dynaflow.compile(make_mlp(), strategy="df_side_effect_cfg_mod:Mine", config={"nano_batches": 2})
    assert type(compiled.strategy).__name__ == "Mine" and (tmp_path / PWN).exists()


def test_a_cache_entry_naming_an_unimported_module_imports_nothing(tmp_path, monkeypatch):
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    _module_that_touches(mod_dir, monkeypatch, "df_side_effect_cache_mod")
    entry = {"schema": CACHE_SCHEMA, "candidate": {"strategy": "df_side_effect_cache_mod:Mine", "options": {}}}
    path, _ = _seed_cache(tmp_path, monkeypatch, entry)
    with pytest.raises(StrategyError) as info:
        _run_auto()
    assert path in str(info.value) and "is not imported" in str(info.value)
    assert not (mod_dir / PWN).exists() and "df_side_effect_cache_mod" not in sys.modules


def test_a_data_file_naming_a_lazy_module_attribute_runs_no_module_code(tmp_path, monkeypatch):
    """A ``"module:attr"`` from a data file is looked up in the module's namespace: a module ``__getattr__`` (PEP 562,
    transformers' lazy modules import a submodule there) does not run, nor does the named object's ``__repr__``."""
    import types

    ran: list[str] = []
    mod = types.ModuleType("dynaflow_probe_lazy")

    def lazy(name: str) -> object:
        ran.append(f"__getattr__({name})")
        raise AttributeError(name)

    class Loud:
        def __repr__(self) -> str:
            ran.append("__repr__")
            return "<loud>"

    mod.__getattr__, mod.loud = lazy, Loud()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dynaflow_probe_lazy", mod)
    for attr, says in (("Missing", "has no attribute 'Missing'"), ("loud", "names a Loud, which is not a Strategy")):
        path = tmp_path / f"{attr}.yaml"
        path.write_text(f"name: 'dynaflow_probe_lazy:{attr}'\n")
        with pytest.raises(StrategyError, match=says):
            load_strategy(path)
    path = tmp_path / "env.yaml"
    path.write_text("name: 'os:environ'\n")
    with pytest.raises(StrategyError) as info:
        load_strategy(path)
    assert ran == [] and "PATH" not in str(info.value) and len(str(info.value)) < 1000


def test_a_yaml_alias_bomb_gets_a_short_error(tmp_path):
    """Nine nested YAML aliases make a 300-byte file a list of 10**8 items; the error names its type and a cut
    repr (it formatted all of it: ~200 MB of message, 800 MB of memory)."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i, (prev, name) in enumerate(zip("abcdefgh", "bcdefghi")):
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, "
                     f"*{prev}, *{prev}]")
    lines.append("name: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StrategyError, match="must be named by a string") as info:
        load_strategy(path)
    assert len(str(info.value)) < 2000


@pytest.mark.parametrize("text, says", [
    ("name: nanoflow\nsm_counts: ab\n", "sm_counts=.ab. must map lanes to SM counts"),
    ("name: nanoflow\nstage_nano_batches: [memory]\n", "rejected its options"),
    ("name: auto\nmeasure_top_k: 1.5\n", "measure_top_k=1.5 must be an int"),
    ("name: auto\nrepeats: 2.5\n", "repeats=2.5 must be an int"),
], ids=["sm-counts-str", "stages-list", "top-k-float", "repeats-float"])
def test_a_strategy_file_option_of_the_wrong_type_is_a_strategy_error(tmp_path, text, says):
    """They were a raw ValueError from inside the strategy, or accepted and a raw TypeError at the first call."""
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(StrategyError, match=says) as info:
        load_strategy(path)
    assert str(path) in str(info.value)


def test_a_resource_named_alone_in_a_strategy_file_is_one_resource(tmp_path):
    path = tmp_path / "tbo.yaml"
    path.write_text("name: two_batch_overlap\noverlap: memory\n")
    assert load_strategy(path).overlap == ("memory",)  # it was split into characters


def test_a_profile_file_nested_too_deep_is_a_config_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(dynaflow.ConfigError, match="Cannot read profile file"):
        load_profiles(path)
