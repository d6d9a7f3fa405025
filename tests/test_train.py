"""The train binary end to end, as a user runs it, and its answers to bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_train(workdir, *overrides, config="configs/tiny.py", env=None):
    env = dict(env or os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run(
        [sys.executable, "-m", "lm.train", f"--config={config}", f"--workdir={workdir}",
         *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_train_binary_writes_config_metrics_events_and_tokenizer(tmp_path):
    result = run_train(tmp_path, "--config.train.steps=10", "--config.mesh.data=2",
                       "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                       "--config.train.eval_every=5", "--config.train.final_eval_batches=4")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 10
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "char"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    for record in train:
        assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"} <= set(record)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    # tiny.py's eval_batches=2 batches of 8 windows of 32 tokens; the last evaluation scores 4
    assert [r["val_tokens"] for r in evals] == [2 * 8 * 32, 4 * 8 * 32]
    assert "val_loss" in result.stdout and f"over {4 * 8 * 32:,} tokens" in result.stdout
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert "sample (" in result.stdout


@pytest.mark.parametrize("override, names", [
    ("--config.model.num_heads=5", "config.model.num_heads=5"),
    ("--config.mesh.data=3", "mesh data=3"),
    ("--config.train.batch_size=12", "config.train.batch_size=12"),
    ("--config.optim.learning_rate=-0.1", "config.optim.learning_rate=-0.1"),
    ("--config.train.sample_length=-1", "config.train.sample_length=-1"),
    ("--config.train.final_eval_batches=-1", "config.train.final_eval_batches=-1"),
    ("--config.data.read_threads=-1", "config.data.read_threads=-1"),
    ("--config.data.path=/no/such/corpus.txt", "config.data.path='/no/such/corpus.txt'"),
    ("--config.model.no_such_field=1", "--config.model.no_such_field"),
    ("--config.model.norm=batchnorm", "config.model.norm='batchnorm'"),
    ("--config.train.steps=abc", "--config.train.steps=abc"),
    ("--config.data.tokenizer=wordpiece", "config.data.tokenizer='wordpiece'"),
    ("--config.data.tokenizer=/no/such/spm.model", "/no/such/spm.model does not exist"),
    ("--config.data.format=xml", "config.data.format='xml'"),
    # The built-in corpus's character count depends on the Python version's stdlib docstrings.
    ("--config.model.vocab_size=100", "config.model.vocab_size=100 is smaller than the "
                                      "tokenizer's 1"),
    ("--config=configs/no_such_config.py", "--config=configs/no_such_config.py"),
])
def test_bad_input_is_a_one_line_error_naming_the_field(tmp_path, override, names):
    result = run_train(tmp_path / "run", override)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last, result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_workdir_flag_is_an_error(tmp_path):
    result = run_train("")
    assert result.returncode != 0 and "--workdir is required" in result.stderr


def test_a_rerun_loads_its_compiled_step_from_the_cache_and_trains_the_same(tmp_path):
    def losses(workdir):
        return [json.loads(line).get("loss") for line in (workdir / "metrics.jsonl").open()]

    # Every compile logged, and stored however fast it was (a fast machine compiles in < 1 s).
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "home_cache"), JAX_LOG_COMPILES="1",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    hit = "Persistent compilation cache hit for 'jit_train_step'"
    first = run_train(tmp_path / "first", "--config.train.steps=5", env=env)
    assert first.returncode == 0, first.stderr
    assert hit not in first.stderr
    cache = tmp_path / "home_cache" / "lm" / "xla"  # the default place
    assert list(cache.glob("jit_train_step-*"))

    # $JAX_COMPILATION_CACHE_DIR is used instead of the default.
    elsewhere = dict(env, XDG_CACHE_HOME=str(tmp_path / "elsewhere"))
    second = run_train(tmp_path / "second", "--config.train.steps=5",
                       env=dict(elsewhere, JAX_COMPILATION_CACHE_DIR=str(cache)))
    assert second.returncode == 0, second.stderr
    assert hit in second.stderr
    assert losses(tmp_path / "second") == losses(tmp_path / "first")

    off = run_train(tmp_path / "off", "--config.train.steps=5", "--compilation_cache_dir=",
                    env=dict(env, JAX_COMPILATION_CACHE_DIR=str(cache)))
    assert off.returncode == 0, off.stderr
    assert "compilation cache" not in off.stderr.lower()


def test_an_unwritable_cache_directory_is_one_warning_and_no_cache(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = ("import sys; from absl import flags; from lm import compilation_cache; "
            "flags.FLAGS(sys.argv); print(compilation_cache.enable())")
    result = subprocess.run([sys.executable, "-c", code, f"--compilation_cache_dir={blocker}/xla"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None"]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"warning: cannot write the compilation cache {blocker}/xla")


def test_training_beats_the_unigram_baseline(tmp_path):
    """Words drawn at random from a small lexicon: after a word's first letters the rest is
    predictable, so a model that learns anything beats the character unigram baseline by far."""
    import numpy as np
    from configs import tiny
    from lm.train import train_and_evaluate

    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    rng = np.random.default_rng(0)
    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(rng.choice(words, 30_000)) + "\n")
    config = tiny.get_config()
    config.data.path = str(corpus)
    config.optim.update(learning_rate=1e-2, min_learning_rate=1e-3)
    config.train.update(steps=200, eval_every=200, log_every=50, sample_length=0)  # no sample
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["val_loss"] < summary["unigram_baseline"] - 1.0


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch installed")
def test_metrics_writer_leaves_pytorch_unimported_yet_importable(tmp_path):
    # tensorboardX imports torch wherever it is installed: seconds of every run's start-up.
    code = ("import sys; from lm.metrics import MetricsWriter; w = MetricsWriter(sys.argv[1]); "
            "w.write(1, {'loss': 2.5}); w.close(); print('torch' in sys.modules); "
            "import torch; print(torch.ones(2).sum().item())")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "2.0"]
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_resuming_with_more_steps_refuses_to_stretch_a_decay_that_follows_the_steps(tmp_path):
    from configs import tiny
    from lm.config import ConfigError
    from lm.train import _check_resumable, train_and_evaluate

    config = tiny.get_config()  # optim.decay_steps=0: the decay ends at train.steps
    (tmp_path / "config.json").write_text(config.to_json())
    config.train.steps = 40
    with pytest.raises(ConfigError, match=r"from step 20 to 40 mid-run.*"
                       r"--config.optim.decay_steps=20 to keep this run's schedule, or =40"):
        train_and_evaluate(config, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    for decay_steps in (20, 40):  # the user says which schedule: either is accepted
        config.optim.decay_steps = decay_steps
        _check_resumable(config, tmp_path)
    config.optim.update(decay_steps=0, schedule="constant")  # no decay to stretch
    _check_resumable(config, tmp_path)
