"""Checkpoints: a resumed run is the same run, whatever stopped it; restores reshard; fine-tuning."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import tiny
from trees import assert_trees_close

from lm import checkpoint, optim, sharding, step
from lm.config import ConfigError
from lm.model import ModelConfig, Transformer
from lm.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(" ".join(np.random.default_rng(0).choice(words, 20_000)) + "\n")
    return path


def make_config(corpus, steps, **train):
    config = tiny.get_config()
    config.data.path = str(corpus)
    config.optim.decay_steps = 40  # the schedule must not depend on where a run is stopped
    config.train.update(dict(dict(steps=steps, log_every=1, eval_every=1000, checkpoint_every=10),
                             **train))
    return config


def losses(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def params_of(workdir, config):
    """The latest checkpoint's parameters, restored onto one device."""
    abstract = jax.eval_shape(lambda: Transformer(ModelConfig.from_config(config.model, 128)).init(
        jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract))
    return jax.device_get(checkpoint.restore_params(workdir, abstract))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_and_evaluate(make_config(corpus, 40), workdir)
    return workdir


def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_run(corpus, uninterrupted, tmp_path):
    train_and_evaluate(make_config(corpus, 20), tmp_path)
    train_and_evaluate(make_config(corpus, 40), tmp_path)
    expected, resumed = losses(uninterrupted), losses(tmp_path)
    assert [resumed[s] for s in range(21, 41)] == [expected[s] for s in range(21, 41)]
    assert_trees_close(params_of(tmp_path, make_config(corpus, 40)),
                       params_of(uninterrupted, make_config(corpus, 40)))


def run_train(workdir, corpus, steps, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "lm.train", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.path={corpus}", "--config.optim.decay_steps=40",
         f"--config.train.steps={steps}", "--config.train.log_every=1",
         "--config.train.eval_every=1000", *extra],
        cwd=ROOT, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, process, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_mid_run_then_rerun_finishes_with_the_uninterrupted_loss(
        corpus, uninterrupted, tmp_path):
    # Checkpoints every 3 steps keep saves in flight when the kill lands.
    workdir = tmp_path / "killed"
    process = run_train(workdir, corpus, 40, "--config.train.checkpoint_every=3")
    metrics, checkpoints = workdir / "metrics.jsonl", workdir / "checkpoints"
    wait_for(lambda: metrics.exists() and max(losses(workdir), default=0) >= 17
             and any(p.name.isdigit() for p in checkpoints.iterdir()), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    unfinished = sorted(int(p.name.split(".")[0]) for p in checkpoints.iterdir()
                        if ".orbax-checkpoint-tmp" in p.name)
    rerun = run_train(workdir, corpus, 40, "--config.train.checkpoint_every=3")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert "resumed from step" in out
    # A save the kill cut short is named as passed over, not silently ignored.
    assert ("a save that never finished" in out) == bool(unfinished), (unfinished, out[:2000])
    assert losses(workdir)[40] == losses(uninterrupted)[40]


def test_sigterm_saves_the_current_step_and_exits(corpus, tmp_path):
    process = run_train(tmp_path, corpus, 100_000, "--config.train.checkpoint_every=100000")
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(losses(tmp_path)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    assert f"SIGTERM at step {saved[0]}" in out


def test_corrupted_latest_checkpoint_is_set_aside_and_the_previous_one_resumes(
        corpus, uninterrupted, tmp_path):
    train_and_evaluate(make_config(corpus, 20), tmp_path)
    for file in (tmp_path / "checkpoints" / "20" / "params").rglob("*"):
        if file.is_file() and file.stat().st_size > 100:
            file.write_bytes(file.read_bytes()[:10])
    train_and_evaluate(make_config(corpus, 40), tmp_path)
    assert (tmp_path / "checkpoints" / "20.unreadable").is_dir()
    assert losses(tmp_path)[40] == losses(uninterrupted)[40]


@pytest.fixture(scope="module")
def fsdp8_run(corpus, tmp_path_factory):
    config = make_config(corpus, 10)
    config.mesh.update(data=1, fsdp=8, tensor=1)
    workdir = tmp_path_factory.mktemp("fsdp8")
    train_and_evaluate(config, workdir)
    return workdir, config


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 1, 1)], ids=["2x2x2", "1-device"])
def test_checkpoint_from_fsdp8_restores_onto_other_meshes(fsdp8_run, mesh):
    workdir, config = fsdp8_run
    saved = params_of(workdir, config)
    config = config.copy_and_resolve_references()
    config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
    devices = jax.devices()[:int(np.prod(mesh))]
    target_mesh = sharding.make_mesh(config, devices)
    model = Transformer(ModelConfig.from_config(config.model, 128))
    compiled = step.compile_steps(model, optim.make_optimizer(config.optim, 10),
                                  optim.learning_rate_schedule(config.optim, 10), target_mesh,
                                  seed=0, batch_size=8)
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", config.train)
    state = checkpointer.restore_latest(compiled.abstract_state)
    checkpointer.close()
    assert int(state.step) == 10
    assert_trees_close(jax.device_get(state.params), saved)
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(compiled.state_sharding)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_init_from_loads_parameters_and_a_mismatched_model_is_refused(corpus, uninterrupted,
                                                                      tmp_path):
    config = make_config(corpus, 1, init_from=str(uninterrupted))
    config.optim.update(learning_rate=0.0, min_learning_rate=0.0)  # the step leaves params alone
    train_and_evaluate(config, tmp_path / "finetune")
    assert losses(tmp_path / "finetune")[1] != losses(uninterrupted)[1]
    assert_trees_close(params_of(tmp_path / "finetune", config), params_of(uninterrupted, config))

    config.model.num_layers = 3
    with pytest.raises(ConfigError, match=r"parameters do not match.*layers"):
        train_and_evaluate(config, tmp_path / "mismatch")


def test_resuming_with_a_different_model_is_refused(corpus, tmp_path):
    train_and_evaluate(make_config(corpus, 10), tmp_path)
    config = make_config(corpus, 20)
    config.model.d_model = 64
    with pytest.raises(ConfigError, match="model.d_model=32"):
        train_and_evaluate(config, tmp_path)


def test_nonfinite_loss_stops_the_run_and_is_never_checkpointed(corpus, tmp_path):
    config = make_config(corpus, 10, checkpoint_every=1)
    config.optim.update(learning_rate=1e30, min_learning_rate=0.0, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step (\d+)") as error:
        train_and_evaluate(config, tmp_path / "stop")
    bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    saved = [int(p.name) for p in (tmp_path / "stop" / "checkpoints").iterdir()]
    assert saved and max(saved) < bad_step

    config.train.skip_nonfinite = True
    train_and_evaluate(config, tmp_path / "skip")
    params = params_of(tmp_path / "skip", config)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
