"""Runs in buckets: the README's pod command against a GCS emulator (killed, resumed, evaluated,
sampled, loaded, exported), the S3 set against moto, and filesystem trouble as one-line errors.

The emulators are real servers on 127.0.0.1 (tests/emulators.py); lm reaches them through the
clients' own environment variables, exactly as it reaches a real bucket.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import jax
import numpy as np
import pytest

from configs import llama_1b
import emulators
from trees import assert_trees_close

import lm
from lm import checkpoint, fs, hf, metrics, orbax_s3, prepare
from lm.config import ConfigError
from lm.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
# The README's pod command, shrunk: a 2-layer LLaMA on 8 CPU devices (fsdp=8), the corpus in the
# bucket too.
SHRINK = {"model.vocab_size": 384, "model.num_layers": 2, "model.num_heads": 4,
          "model.num_kv_heads": 2, "model.d_model": 32, "model.d_ff": 64,
          "model.context_length": 32, "train.batch_size": 8, "train.steps": 24,
          "train.log_every": 1, "train.eval_every": 1000, "train.eval_batches": 2,
          "train.checkpoint_every": 3, "train.sample_length": 0, "optim.warmup_steps": 4,
          "optim.decay_steps": 24}


def corpus_text(seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(1500)) + "\n"


def train_command(workdir, data_path: str, **overrides) -> list[str]:
    overrides = {**SHRINK, "data.path": data_path, **overrides}
    return [sys.executable, "-m", "lm.train", "--config=configs/llama_1b.py",
            f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


@pytest.fixture(scope="module")
def env(gcs_server, s3_server, tmp_path_factory):
    """The environment of the binaries this module starts: both emulators' variables (their
    session fixtures set them), and one compilation cache, so that the train step every run here
    shares compiles once."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run(command: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def trained(command: list[str], env: dict) -> subprocess.CompletedProcess:
    result = run(command, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(workdir) -> dict[int, float]:
    lines = fs.read_text(fs.path(workdir) / "metrics.jsonl").splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def checkpoint_steps(workdir) -> list[int]:
    return [int(p.name) for p in fs.listdir(fs.path(workdir) / "checkpoints") if p.name.isdigit()]


def committed_steps(workdir) -> list[int]:
    """The steps whose save finished: in a bucket, orbax writes commit_success.txt last."""
    return [s for s in checkpoint_steps(workdir)
            if fs.exists(f"{workdir}/checkpoints/{s}/commit_success.txt")]


def params(workdir):
    return jax.device_get(lm.load(workdir).params)


def resumed_from(result: subprocess.CompletedProcess) -> int:
    return int(result.stdout.split("resumed from step ")[1].split()[0])


def killed_after_step_10(command: list[str], workdir: str, env: dict) -> None:
    """Start the run and SIGKILL it once it has printed step 10 (its output, not its metrics.jsonl:
    an object being appended to cannot be read while it changes) and committed a checkpoint."""
    killed = subprocess.Popen(command, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline, step = time.time() + 300, 0
    while not (step >= 10 and committed_steps(workdir)):
        line = killed.stdout.readline()
        assert line or killed.poll() is None, "the run ended before step 10"
        assert time.time() < deadline, "the run did not reach step 10"
        if match := re.match(r"step (\d+)/", line):
            step = int(match.group(1))
    killed.send_signal(signal.SIGKILL)
    killed.wait()


# ---------------------------------------------------------------------------------------------
# gs://: the pod example, end to end.

@pytest.fixture(scope="module")
def pod(gcs_server, env, tmp_path_factory):
    """The README's `--workdir=gs://my-bucket/runs/llama` run, SIGKILLed mid-run and rerun, beside
    the same config trained uninterrupted in a local workdir from the same bucket corpus."""
    fs.write_text("gs://my-bucket/corpus/words.txt", corpus_text())
    data = "gs://my-bucket/corpus/*.txt"
    cache = str(tmp_path_factory.mktemp("shard-cache"))
    local = tmp_path_factory.mktemp("uninterrupted")
    trained(train_command(local, data, **{"data.shard_cache_dir": cache,
                                          "train.checkpoint_every": 1000}), env)

    workdir = "gs://my-bucket/runs/llama"
    command = train_command(workdir, data, **{"data.shard_cache_dir": cache})
    killed_after_step_10(command, workdir, env)
    rerun = run(command, env)
    return {"workdir": workdir, "local": local, "data": data, "rerun": rerun}


def test_the_pod_command_on_gs_resumes_after_sigkill_bitwise(pod):
    rerun = pod["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    start = resumed_from(rerun)
    assert 0 < start < 24
    expected, got = losses(pod["local"]), losses(pod["workdir"])
    assert [got[s] for s in range(start + 1, 25)] == [expected[s] for s in range(start + 1, 25)]
    # Everything process 0 writes is in the bucket, nothing in a local `gs:` folder.
    names = {p.name for p in fs.listdir(pod["workdir"])}
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "checkpoints", "data"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert not (ROOT / "gs:").exists()


def test_tensorboard_events_in_the_bucket_hold_the_logged_losses(pod):
    metrics.import_tensorboardx()
    from tensorboardX.proto import event_pb2

    scalars = {}
    for events in sorted(p for p in fs.listdir(pod["workdir"]) if "tfevents" in p.name):
        data, offset = fs.read_bytes(events), 0
        while offset < len(data):  # TFRecord: length, its crc, the record, its crc
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                if value.tag == "loss":
                    scalars[event.step] = value.simple_value
    logged = losses(pod["workdir"])
    assert scalars and all(abs(scalars[s] - logged[s]) < 1e-6 for s in scalars)
    assert max(scalars) == 24


def test_lm_load_of_the_gs_workdir_is_the_uninterrupted_model(pod):
    assert_trees_close(params(pod["workdir"]), params(pod["local"]))


def test_the_eval_binary_scores_and_samples_a_gs_workdir(pod, env):
    trained([sys.executable, "-m", "lm.evaluate", f"--workdir={pod['workdir']}",
             "--mode=perplexity", "--output_json=gs://my-bucket/eval/perplexity.json"], env)
    result = json.loads(fs.read_text("gs://my-bucket/eval/perplexity.json"))
    assert result["step"] == 24 and result["tokens"] > 1000
    assert 0 < result["cross_entropy"] < np.log(384)
    trained([sys.executable, "-m", "lm.evaluate", f"--workdir={pod['workdir']}", "--mode=sample",
             "--prompt=alpha ", "--max_new_tokens=12", "--temperature=0",
             "--output_json=gs://my-bucket/eval/samples.json"], env)
    [sample] = json.loads(fs.read_text("gs://my-bucket/eval/samples.json"))["samples"]
    local = lm.load(pod["local"]).generate("alpha ", 12, temperature=0)[0]
    assert sample == {"prompt": "alpha ", "text": local}


def test_hf_export_of_a_gs_workdir_into_the_bucket_matches_a_local_export(pod, tmp_path):
    hf.export_checkpoint(pod["workdir"], "gs://my-bucket/hf/llama")
    hf.export_checkpoint(pod["local"], tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert fs.read_bytes(f"gs://my-bucket/hf/llama/{name}") == (tmp_path / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# s3://: a run in the bucket on data prepared there, and tokenizers trained there.

@pytest.fixture(scope="module")
def s3_corpus(s3_server):
    fs.write_text("s3://bucket/corpus/words.txt", corpus_text())
    return "s3://bucket/corpus"


def test_an_s3_run_on_data_prepared_into_s3_killed_and_rerun_continues_bitwise(
        s3_corpus, pod, env, tmp_path):
    prepared, data = "s3://bucket/prepared/words", llama_1b.get_config().data
    data.path = s3_corpus
    prepare.prepare(data, 0, prepared)
    assert prepare.is_prepared(prepared)
    # Without a cache directory every window is a ranged read of the shard objects.
    stream = prepare.load(prepared).train
    assert isinstance(stream.shards[0], fs.RangedArray)
    local = prepare.load(fs.path(pod["local"]) / "data").train  # the same corpus, from gs://
    assert np.array_equal(stream.window(100, 5000)["tokens"], local.window(100, 5000)["tokens"])

    # Checkpoints every 6 steps, the latest 2 kept: steps are saved, committed and deleted in S3.
    workdir = "s3://bucket/runs/llama"
    command = train_command(workdir, prepared, **{"data.shard_cache_dir": "",
                                                  "train.checkpoint_every": 6,
                                                  "train.keep_checkpoints": 2})
    killed_after_step_10(command, workdir, env)
    rerun = trained(command, env)
    assert 0 < resumed_from(rerun) < 24
    start = resumed_from(rerun)
    assert [losses(workdir)[s] for s in range(start + 1, 25)] == [
        losses(pod["local"])[s] for s in range(start + 1, 25)]
    assert sorted(checkpoint_steps(workdir)) == [18, 24]
    assert_trees_close(params(workdir), params(pod["local"]))
    assert not (ROOT / "s3:").exists()

    hf.export_checkpoint(workdir, "s3://bucket/hf/llama")
    hf.export_checkpoint(pod["local"], tmp_path / "hf")
    assert fs.read_bytes("s3://bucket/hf/llama/model.safetensors") == (
        tmp_path / "hf" / "model.safetensors").read_bytes()


def test_an_s3_workdir_is_refused_before_any_work_by_an_orbax_lm_cannot_extend(
        s3_corpus, monkeypatch):
    monkeypatch.setattr(orbax_s3, "_installed", False)  # as when orbax moved the places it patches
    config = llama_1b.get_config()
    config.data.path = s3_corpus
    with pytest.raises(ConfigError, match=r"^s3://bucket/refused: this orbax \(.*\) cannot write "
                                          r"or read checkpoints at s3:// paths; use a gs:// or "
                                          r"local --workdir"):
        train_and_evaluate(config, "s3://bucket/refused")
    assert not fs.exists("s3://bucket/refused")


def test_sentencepiece_trains_on_s3_text_and_writes_its_model_there(s3_corpus, env):
    trained([sys.executable, "-m", "lm.tokenizer", f"--input={s3_corpus}/*.txt",
             "--model_prefix=s3://bucket/spm/words", "--vocab_size=300"], env)
    from lm.tokenizer import SentencePieceTokenizer
    tokenizer = SentencePieceTokenizer.from_file("s3://bucket/spm/words.model")
    assert tokenizer.decode(tokenizer.encode("alpha bravo\n")) == "alpha bravo\n"


# ---------------------------------------------------------------------------------------------
# Filesystem trouble: one line naming the path and the fix, a non-zero exit, nothing lost.

def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_a_bucket_that_does_not_exist_is_one_line_and_a_non_zero_exit(gcs_server, env):
    result = run(train_command("gs://no-such-bucket/runs/x", "gs://bucket/corpus"), env)
    assert result.returncode == 1
    assert last_line(result) == (
        "error: gs://no-such-bucket/runs/x: the bucket gs://no-such-bucket does not exist (or "
        "these credentials cannot see it); create it, or fix the path")
    data = llama_1b.get_config().data
    data.path = "gs://no-such-bucket/corpus/*.txt"
    with pytest.raises(ConfigError, match="the bucket gs://no-such-bucket does not exist"):
        prepare.prepare(data, 0, "unused")


@pytest.mark.parametrize("scheme, package", [("gs", "gcsfs"), ("s3", "s3fs")])
def test_a_bucket_path_without_its_client_installed_says_how_to_install_it(
        monkeypatch, scheme, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import gcsfs` now raises ImportError
    with pytest.raises(ConfigError, match=f"^{scheme}://b/run: {scheme}:// paths need the "
                                          f"`{package}` package: pip install -e \".\\[cloud\\]\"$"):
        fs.makedirs(f"{scheme}://b/run")


@pytest.mark.parametrize("where", ["gs", "local"])
def test_a_workdir_that_is_a_file_is_refused_and_left_alone(gcs_server, tmp_path, where):
    workdir = "gs://bucket/a-file" if where == "gs" else str(tmp_path / "a-file")
    fs.write_text(workdir, "keep me")
    with pytest.raises(ConfigError, match=f"^{workdir} exists and is a file where a directory "
                                          f"is needed"):
        train_and_evaluate(llama_1b.get_config(), workdir)
    assert fs.read_text(workdir) == "keep me"


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_its_checkpoints(pod, env, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(pod["local"], workdir)
    before = checkpoint_steps(workdir)
    (workdir / "metrics.jsonl").rename(tmp_path / "metrics.jsonl")
    (workdir / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    full = run(train_command(workdir, pod["data"], **{"train.steps": 25}), env)
    assert full.returncode == 1
    assert last_line(full) == (f"error: {workdir / 'metrics.jsonl'}: no space left on the "
                               f"device; free space or write elsewhere (what was written before "
                               f"is intact)")
    assert "resumed from step 24" in full.stdout
    assert checkpoint_steps(workdir) == before
    assert_trees_close(params(workdir), params(pod["local"]))


def restricted(command: list[str], setup: str) -> list[str]:
    """`command`, run by a Python process that first runs `setup` on itself (limits, capabilities,
    which survive exec) and then becomes `command`."""
    return [sys.executable, "-c", f"import os, sys; {setup}; os.execv(sys.argv[1], sys.argv[1:])",
            *command]


# CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER let root ignore file permissions. Dropped
# from the bounding set (prctl PR_CAPBSET_DROP), they are gone after exec, so that permissions
# apply to root too; as any other user the call fails and changes nothing.
NO_ROOT_OVERRIDES = "import ctypes; [ctypes.CDLL(None).prctl(24, c, 0, 0, 0) for c in (1, 2, 3)]"
# Files may grow to 32 KiB: the run's logs fit, a checkpoint's array data does not (EFBIG, as past a
# filesystem's largest file; a full disk's ENOSPC takes the same path; Python ignores SIGXFSZ).
SMALL_FILES = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (2**15, 2**15))"
SAVE_FAILS = {
    "no permission": (NO_ROOT_OVERRIDES, r"25\.orbax-checkpoint-tmp: permission denied \(\[Errno "
                      r"13\] Permission denied: '.*'\); fix its permissions or choose another "
                      r"path"),
    "file too large": (SMALL_FILES, r"25\.orbax-checkpoint-tmp/\S+: file too large for the "
                       r"filesystem or for this process's file-size limit \(ulimit -f\); raise the "
                       r"limit or write elsewhere \(what was written before is intact\)"),
    "disk full": ("", r"25\.orbax-checkpoint-tmp\S*: no space left on the device; free space or "
                  r"write elsewhere \(what was written before is intact\)")}


@contextlib.contextmanager
def on_a_nearly_full_disk(content: Path, mountpoint: Path, room: int) -> Iterator[Path]:
    """A copy of `content` on a filesystem of its own (a tmpfs) with `room` bytes left after it,
    unmounted afterwards; skips where this process may not mount (not root)."""
    mountpoint.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mountpoint)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small filesystem here (needs root); 'file too large' takes "
                    "the same path")
    try:
        shutil.copytree(content, mountpoint / "run")
        used = shutil.disk_usage(mountpoint).used
        subprocess.run(["mount", "-o", f"remount,size={used + room}", str(mountpoint)],
                       check=True)
        yield mountpoint / "run"
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


@pytest.mark.parametrize("fault", list(SAVE_FAILS))
def test_a_checkpoint_save_that_storage_refuses_stops_the_run_with_one_line_and_keeps_the_rest(
        pod, env, tmp_path, fault):
    with contextlib.ExitStack() as stack:
        if fault == "disk full":  # a real ENOSPC: a checkpoint is ~0.7 MB, 128 KiB are left
            workdir = stack.enter_context(
                on_a_nearly_full_disk(pod["local"], tmp_path / "disk", room=128 * 1024))
        else:
            workdir = tmp_path / "run"
            shutil.copytree(pod["local"], workdir)
        refused_and_intact(pod, env, workdir, fault)


def refused_and_intact(pod, env, workdir: Path, fault: str) -> None:
    setup, message = SAVE_FAILS[fault]
    before = checkpoint_steps(workdir)
    if fault == "no permission":
        (workdir / "checkpoints").chmod(0o555)
        probe = [sys.executable, "-c", f"open({str(workdir / 'checkpoints' / 'probe')!r}, 'w')"]
        if subprocess.run(restricted(probe, setup), capture_output=True).returncode == 0:
            pytest.skip("file permissions do not apply here (root that cannot drop capabilities)")
    command = train_command(workdir, pod["data"], **{"train.steps": 25})
    failed = run(restricted(command, setup) if setup else command, env)
    (workdir / "checkpoints").chmod(0o755)
    assert failed.returncode == 1, failed.stderr[-3000:]
    # Orbax logs the failed background write before the line, and TensorStore's writes still in
    # flight may print tracebacks ("Event loop is closed") around it, even ahead of its newline.
    lines = re.findall(f"error: {re.escape(str(workdir / 'checkpoints'))}/{message}",
                       failed.stderr)
    assert len(lines) == 1 and failed.stderr.count("error: ") == 1, failed.stderr[-3000:]
    assert "resumed from step 24" in failed.stdout
    assert checkpoint_steps(workdir) == before
    assert_trees_close(params(workdir), params(pod["local"]))


def step_25(result: subprocess.CompletedProcess) -> str:
    return re.search(r"^step 25/25 .*loss (\S+)", result.stdout, re.M)[1]


def upload_tree(local: Path, remote: str) -> None:
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.upload(str(file), f"{remote}/{file.relative_to(local).as_posix()}")


# Where the 403s start: the first request that carries these bytes (the step's object names, as
# each client sends them: gcsfs URL-encodes names in paths and sends them raw in upload queries,
# TensorStore encodes them in both). Orbax first asks whether the step exists (in `save`), then
# writes its metadata through gcsfs and the arrays through TensorStore (in the background).
REFUSED_FROM = {
    "orbax's check of the step": lambda name: quote(name, safe="").encode(),
    "gcsfs's first write": lambda name: f"name={name}/".encode(),
    "TensorStore's first write":
        lambda name: f"uploadType=media&name={quote(name, safe='')}".encode()}
DENIED = "lm-test@example.com does not have storage.objects.create access to the bucket."


@pytest.mark.parametrize("where", list(REFUSED_FROM))
def test_a_checkpoint_save_that_gcs_refuses_stops_the_run_with_one_line_and_keeps_the_rest(
        pod, env, gcs_server, where):
    """The uninterrupted run, copied into the bucket, trains one more step and saves it through a
    proxy that answers 403 from a request of that save on (as when the credentials lose write
    access to the bucket), for longer than the run could wait: one line, exit 1, nothing lost."""
    name = f"runs/refused-{list(REFUSED_FROM).index(where)}"
    workdir = f"gs://my-bucket/{name}"
    upload_tree(Path(pod["local"]), workdir)
    before = checkpoint_steps(workdir)
    assert before == [24]
    outage = emulators.Outage(gcs_server.url, REFUSED_FROM[where](f"{name}/checkpoints/25"),
                              seconds=600, status=403, message=DENIED)
    try:
        failed = run(train_command(workdir, pod["data"], **{"train.steps": 25}),
                     dict(env, STORAGE_EMULATOR_HOST=outage.url,
                          TENSORSTORE_GCS_HTTP_URL=outage.url), timeout=300)
    finally:
        outage.close()
    assert outage.tripped.is_set() and "resumed from step 24" in failed.stdout
    assert failed.returncode == 1, failed.stderr[-3000:]
    # Orbax logs the failed background writes before the line.
    assert last_line(failed) == (
        f"error: {workdir}/checkpoints/25: permission denied (HTTP 403: {DENIED}); grant the "
        f"credentials the storage client uses (docs/scaling.md) write access to the bucket, or "
        f"write elsewhere (what was written before is intact)")
    assert failed.stderr.count("error: ") == 1, failed.stderr[-3000:]
    # Read back without the proxy: the earlier checkpoints are all there and load as before (a
    # step directory the refused save began is no checkpoint), and the run resumes from them.
    assert checkpoint.saved_steps(fs.path(workdir) / "checkpoints") == before
    assert_trees_close(params(workdir), params(pod["local"]))
    if where == "TensorStore's first write":  # the save that got furthest: its metadata written
        rerun = trained(train_command(workdir, pod["data"], **{"train.steps": 25}), env)
        assert resumed_from(rerun) == 24 and step_25(rerun) == step_25(failed)
        assert checkpoint.saved_steps(fs.path(workdir) / "checkpoints") == before + [25]
