"""scripts/benchmark.py end to end on its smallest rows: the JSON, the derived ratios, the table."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# As a user runs it: one CPU device, not the suite's eight virtual ones.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/benchmark.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_train_row_reports_throughput_mfu_and_its_pytorch_ratio(tmp_path):
    out = tmp_path / "bench.json"
    done = benchmark("--rows=matmul_f32,train_shakespeare_char", "--repeats=1",
                     f"--output_json={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert not [name for name, r in results.items() if "error" in r], results

    train, peak = results["train_shakespeare_char"], results["matmul_f32"]["gflops"] * 1e9
    assert train["batch"] == "12x64"
    assert train["tokens_per_sec"] == pytest.approx(12 * 64 / (train["step_ms"] / 1e3))
    # The PaLM formula, 6N + 12LTd per token, for nanoGPT's baby model: N counts the products'
    # weights, 12d^2 a layer and the 65 x 128 output head.
    layers, d, length = 4, 128, 64
    params = 12 * layers * d * d + 65 * d
    assert train["params_m"] == pytest.approx(params / 1e6)
    per_token = 6 * params + 12 * layers * length * d
    assert train["model_tflops_per_sec"] == pytest.approx(
        per_token * train["tokens_per_sec"] / 1e12)
    assert train["mfu_measured"] == pytest.approx(train["model_tflops_per_sec"] * 1e12 / peak)
    assert 0 < train["mfu_measured"] < 1.5 and train["compile_seconds"] > 0

    line = next(l for l in done.stdout.splitlines() if l.startswith("train_shakespeare_char "))
    assert "ms/step" in line and "mfu_measured" in line
    if HAS_TORCH:
        pair = results["train_shakespeare_char_torch"]
        assert train["vs_torch"] == pytest.approx(train["tokens_per_sec"] / pair["tokens_per_sec"])
        assert f"{train['vs_torch']:.2f}x PyTorch" in line
    else:
        assert "Skipping the PyTorch rows" in done.stdout


def test_unknown_row_is_a_one_line_error():
    done = benchmark("--rows=train_nope")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: unknown rows ['train_nope']")
    assert "Traceback" not in done.stderr


def test_timing_runs_the_given_warm_up_first_and_times_only_the_repeats(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts/benchmark.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look themselves up there
    spec.loader.exec_module(script)
    calls = []
    times = script._times(lambda: calls.append("run"), 3, warm_up=lambda: calls.append("warm-up"))
    assert calls == ["warm-up", "run", "run", "run"] and len(times) == 3
    calls.clear()
    script._times(lambda: calls.append("run"), 2)  # without one, a first run is the warm-up
    assert calls == ["run", "run", "run"]
