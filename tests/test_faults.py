"""Faults at pod scale: a preemption notice that reaches one process, a checkpoint damaged on one
process, reads that fail for a while or for good, a config that would change the state, saves by
wall time, and loading a multi-host run on one host.

One two-process run (data across the processes: dcn_data=2) is the fixture of them all: it saves by
wall time only, on process 0's clock, until SIGTERM reaches process 1. Its reruns and the
single-process restores below work on copies of its workdir.
"""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import emulators
import lm
from test_multihost import TWO_PROCESS_MESH, finish, launch
from trees import assert_trees_close

from lm import checkpoint, fs, optim
from lm import tokenizer as tokenizers
from lm.config import ConfigError, default_config
from lm.model import ModelConfig, Transformer
from lm.step import TrainState
from lm.train import _check_resumable, train_and_evaluate

# The learning rate is constant after step 6 (test_multihost.TINY), so how long a run was asked to
# be does not change its steps.
FAULT_FLAGS = [*TWO_PROCESS_MESH, "--config.train.checkpoint_every=100000",
               "--config.train.checkpoint_every_minutes=0.005",
               "--config.train.keep_checkpoints=20", "--config.train.eval_every=100000",
               "--config.train.sample_length=0"]


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def step_losses(entries: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in entries if "loss" in r}


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def copy_of(workdir: Path, parent: Path) -> Path:
    """A copy in a folder of its own (a job's process logs go beside its workdir)."""
    shutil.copytree(workdir, parent / "run")
    return parent / "run"


def two_processes(workdir: Path, steps: int, cache: Path) -> list[subprocess.Popen]:
    # The reruns load the first run's compiled programs from the cache instead of compiling.
    return launch(workdir, [*FAULT_FLAGS, f"--config.train.steps={steps}"],
                  extra=[f"--compilation_cache_dir={cache}"])


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """(a copy of the workdir as the run left it, the processes, their outputs, the cache)."""
    cache = tmp_path_factory.mktemp("xla_cache")
    workdir = tmp_path_factory.mktemp("preempted") / "run"
    procs = two_processes(workdir, 100_000, cache)
    while not (workdir / "checkpoints").exists() or len(saved_steps(workdir)) < 2:
        assert all(p.poll() is None for p in procs), (workdir.parent / "process_0.log").read_text()
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs, workdir)
    return copy_of(workdir, tmp_path_factory.mktemp("as_left")), procs, outputs, cache


def test_sigterm_on_one_process_saves_the_same_step_on_both_and_both_exit_143(preempted):
    workdir, procs, outputs, _ = preempted
    assert [p.returncode for p in procs] == [143, 143], outputs
    saved = saved_steps(workdir)
    assert f"SIGTERM at step {saved[-1]}:" in outputs[0]
    assert max(step_losses(records(workdir))) == saved[-1]
    assert len(saved) >= 2  # by wall time: checkpoint_every is 100000
    for step in saved:  # every save, by time or for SIGTERM, was written by both processes
        data = workdir / "checkpoints" / str(step) / "data"
        assert sorted(p.name for p in data.glob("*.json")) == [
            "process_0-of-2.json", "process_1-of-2.json"]


def test_what_one_process_meets_in_a_restore_every_process_follows_and_resumes_bitwise(
        preempted, tmp_path):
    """Two reruns, side by side. In one, process 1 cannot read its part of the last checkpoint
    for a while (an OSError that proves nothing): both retry, then resume from it. In the other,
    process 1's part is garbled: both pass it over and resume from the checkpoint before, through
    the last. Each resume is checked against steps that the other run, or the preempted one, ran
    without stopping."""
    left, _, _, cache = preempted
    *_, before, last = saved_steps(left)
    resumed, fell_back = copy_of(left, tmp_path / "resumed"), copy_of(left, tmp_path / "fell_back")
    put_back = unreadable_until_put_back(
        resumed / "checkpoints" / str(last) / "data" / "process_1-of-2.json")
    (fell_back / "checkpoints" / str(last) / "data" / "process_1-of-2.json").write_text('{"next')
    jobs = {path: two_processes(path, last + 2, cache) for path in (resumed, fell_back)}
    threading.Thread(target=lambda: (wait_for_line(resumed.parent / "process_0.log", "retrying"),
                                     put_back()), daemon=True).start()
    outputs = {path: finish(procs, path) for path, procs in jobs.items()}
    for path, procs in jobs.items():
        assert [p.returncode for p in procs] == [0, 0], outputs[path]
    assert f"retrying {resumed}/checkpoints/{last} in" in outputs[resumed][0]
    assert "IsADirectoryError" in outputs[resumed][1]
    assert f"resumed from step {last}" in outputs[resumed][0]
    assert f"resumed from step {before}" in outputs[fell_back][0]
    assert "found by process 1" in outputs[fell_back][0]
    assert "JSONDecodeError" in outputs[fell_back][1]
    assert (fell_back / "checkpoints" / f"{last}.unreadable").is_dir()

    copied = len(records(left))
    uninterrupted = step_losses(records(left))
    after_last = step_losses(records(resumed)[copied:])
    after_before = step_losses(records(fell_back)[copied:])
    assert sorted(after_before) == list(range(before + 1, last + 3))
    assert [after_before[s] for s in range(before + 1, last + 1)] == \
        [uninterrupted[s] for s in range(before + 1, last + 1)]
    assert [after_last[s] for s in (last + 1, last + 2)] == \
        [after_before[s] for s in (last + 1, last + 2)]


def wait_for_line(log: Path, text: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{log} never said {text!r}"
        time.sleep(0.1)


def test_a_run_trained_across_hosts_loads_on_one(preempted):
    workdir = preempted[0]
    run = lm.load(workdir)
    assert run.step == saved_steps(workdir)[-1] and dict(run.mesh.shape)["data"] == 8
    ids = np.arange(16, dtype=np.int32) % 5
    assert_trees_close(lm.load(workdir, fsdp=2).logits(ids), run.logits(ids), atol=1e-6)


def test_every_optim_field_that_changes_the_optimizer_state_is_refused_on_resume(tmp_path):
    # One other value per field: a field added to config.optim must be added here too.
    others = dict(learning_rate=0.0, min_learning_rate=0.0, warmup_steps=0, schedule="constant",
                  decay_steps=5, b1=0.0, b2=0.0, eps=0.0, weight_decay=0.0, decay_embeddings=True,
                  grad_clip=0.0, grad_accum_steps=4)
    base = default_config()
    assert set(others) == set(base.optim)
    params = {"embed": np.zeros((4, 2)), "dense": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}}

    def structure(config):
        state = jax.eval_shape(optim.make_optimizer(config.optim, 100).init, params)
        return jax.tree.structure(state), [x.shape for x in jax.tree.leaves(state)]

    (tmp_path / "config.json").write_text(base.to_json())
    for field, value in [*others.items(), ("grad_clip", 0.5)]:
        config = base.copy_and_resolve_references()
        config.optim[field] = value
        if structure(config) == structure(base):
            _check_resumable(config, tmp_path)
        else:
            with pytest.raises(ConfigError, match=rf"optim\.{field}=.*changes the optimizer state"):
                _check_resumable(config, tmp_path)


def saved_config(workdir: Path) -> ConfigDict:
    """The run's config, for one process (the run spread data over two: dcn_data=2)."""
    config = ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.mesh.update(dcn_data=1)
    return config


def abstract_state_of(workdir: Path, config: ConfigDict) -> TrainState:
    """The state of `config` as shapes, on one device."""
    vocab = tokenizers.load(workdir / "tokenizer.json").vocab_size
    model = Transformer(ModelConfig.for_run(config, vocab, 1))
    optimizer = optim.make_optimizer(config.optim, config.train.steps)

    def init():
        params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        jax.eval_shape(init))


@pytest.fixture(scope="module")
def abstract_state(preempted) -> TrainState:
    return abstract_state_of(preempted[0], saved_config(preempted[0]))


def restore(workdir: Path, abstract_state: TrainState, **retries) -> TrainState:
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", default_config().train,
                                           **retries)
    try:
        return checkpointer.restore_latest(abstract_state)
    finally:
        checkpointer.close()


def test_toggling_grad_clip_is_refused_before_any_restore_and_every_checkpoint_stays(
        preempted, tmp_path):
    workdir = copy_of(preempted[0], tmp_path)
    saved = saved_steps(workdir)
    config = saved_config(workdir)
    config.optim.grad_clip = 0.0
    with pytest.raises(ConfigError, match=r"optim\.grad_clip=1\.0, not 0\.0 \(clipping on vs off"):
        train_and_evaluate(config, workdir)
    # Whatever the config says (an edited config.json, another optax), the stored tree itself is
    # compared before any array is read.
    with pytest.raises(ConfigError, match=r"the optimizer state does not match this run's"):
        restore(workdir, abstract_state_of(workdir, config))
    assert saved_steps(workdir) == saved
    assert not list((workdir / "checkpoints").glob("*.unreadable*"))


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "array data truncated": lambda step: largest_file(step / "opt_state").write_bytes(b"0" * 10),
    # zstd decodes it without complaint, to wrong numbers: only the fingerprint can tell.
    "a byte of array data flipped": lambda step: flip_a_byte(largest_file(step / "opt_state")),
    "array metadata garbled": lambda step: (step / "params" / "_METADATA").write_text("{garbage"),
    "OCDBT manifest deleted": lambda step: (step / "params" / "manifest.ocdbt").unlink(),
    "parameters missing": lambda step: shutil.rmtree(step / "params"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_restores(
        preempted, abstract_state, tmp_path, capsys, damage):
    workdir = copy_of(preempted[0], tmp_path)
    *_, before, last = saved_steps(workdir)
    DAMAGE[damage](workdir / "checkpoints" / str(last))
    assert int(restore(workdir, abstract_state).step) == before
    if "flipped" in damage:
        # Mostly zstd decodes the chunk to wrong numbers, which only the fingerprint tells; where
        # the step that SIGTERM saved puts a frame's header in the middle, decoding fails instead.
        err = capsys.readouterr().err
        assert "differ from the fingerprint saved with them" in err or "DATA_LOSS" in err, err
    assert saved_steps(workdir)[-1] == before
    assert (workdir / "checkpoints" / f"{last}.unreadable").is_dir()


def test_the_fingerprint_is_numpys_checksum_on_any_mesh_and_sees_one_flipped_bit():
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(16, 24)).astype(np.float32),
            "b": rng.normal(size=5).astype(jnp.bfloat16), "count": np.int32(7)}

    def reference(x):  # in numpy, on the flattened words, in 64 bits
        x = np.asarray(x)
        words = x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize]).reshape(-1)
        weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
        return int((words.astype(np.uint64) * weights).sum() % 2**32)
    expected = [reference(x) for x in jax.tree.leaves(tree)]
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = {**tree, "w": jax.device_put(tree["w"], jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, ("x", "y"))))}  # split along the later dimension
    assert checkpoint.fingerprints({"t": tree}) == checkpoint.fingerprints({"t": sharded}) == {
        "t": expected}
    flipped = tree["w"].copy()
    flipped.view(np.uint32)[7, 3] ^= 1 << 31
    assert checkpoint.fingerprints({"t": {**tree, "w": flipped}})["t"][2] != expected[2]


def unreadable_until_put_back(path: Path) -> Callable[[], None]:
    """Reading `path` fails with a real OSError that proves nothing about the checkpoint (a
    directory stands where the file was: EISDIR, as a failing disk gives EIO or a busy store a 503)
    until the returned function puts the file back, atomically."""
    real = path.with_name(path.name + ".real")
    path.rename(real)
    (path.parent / "a_directory").mkdir()
    path.symlink_to("a_directory")

    def put_back():
        link = path.with_name(path.name + ".link")
        link.symlink_to(real.name)
        os.replace(link, path)
    return put_back


def test_a_read_that_keeps_failing_is_retried_then_fails_the_run_and_renames_nothing(
        preempted, abstract_state, tmp_path, capsys):
    workdir = copy_of(preempted[0], tmp_path)
    saved = saved_steps(workdir)
    unreadable_until_put_back(workdir / "checkpoints" / str(saved[-1]) / "params" / "_METADATA")
    with pytest.raises(checkpoint.RestoreFailed,
                       match=r"after 3 attempts \(IsADirectoryError: \[Errno 21\]"):
        restore(workdir, abstract_state, attempts=3, backoff_seconds=0.01)
    assert capsys.readouterr().out.count(f"checkpoints/{saved[-1]} in ") == 2  # "retrying <it> in"
    assert saved_steps(workdir) == saved
    assert not list((workdir / "checkpoints").glob("*.unreadable*"))


def test_a_read_that_fails_for_a_while_is_retried_and_restores_the_latest(
        preempted, abstract_state, tmp_path):
    workdir = copy_of(preempted[0], tmp_path)
    expected = restore(workdir, abstract_state)
    put_back = unreadable_until_put_back(
        workdir / "checkpoints" / str(saved_steps(workdir)[-1]) / "opt_state" / "_METADATA")
    threading.Timer(0.5, put_back).start()
    state = restore(workdir, abstract_state, attempts=8, backoff_seconds=0.05)
    assert int(state.step) == saved_steps(workdir)[-1]
    assert_trees_close(jax.device_get(state), jax.device_get(expected))


def test_a_bucket_that_stops_answering_during_the_restore_is_retried_and_restores_the_latest(
        preempted, abstract_state, gcs_server, monkeypatch, capsys):
    """The checkpoints in a GCS emulator, reached through a proxy that answers 403 for 2 s once
    the restore asks for the newest checkpoint's metadata (as while permissions propagate; gcsfs
    retries dropped connections and 5xx itself, for half a minute, but not this): an error that
    proves nothing about the checkpoint is retried with backoff, and the newest one restores."""
    left = preempted[0]
    workdir = "gs://bucket/faults/run"
    for file in (left / "checkpoints").rglob("*"):
        if file.is_file():
            fs.upload(str(file), f"{workdir}/{file.relative_to(left)}")
    last = saved_steps(left)[-1]
    outage = emulators.Outage(gcs_server.url, f"checkpoints%2F{last}%2Fparams%2F_METADATA".encode(),
                              seconds=2, status=403)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", outage.url)  # read by gcsfs at each request
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", outage.url)
    try:
        state = restore(fs.path(workdir), abstract_state, attempts=6, backoff_seconds=0.25)
    finally:
        outage.close()
    assert outage.tripped.is_set()
    assert f"retrying {workdir}/checkpoints" in capsys.readouterr().out
    assert int(state.step) == last
    assert_trees_close(jax.device_get(state), jax.device_get(restore(left, abstract_state)))
    assert not [p for p in fs.listdir(f"{workdir}/checkpoints") if "unreadable" in p.name]
