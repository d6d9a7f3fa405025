"""Two real processes on JAX's distributed runtime (CPU collectives over gloo, 4 devices each)
against one process with 8 devices; a dead process stops the job; the launchers' dry runs."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm import fs
from lm.distributed import detected_cluster

ROOT = Path(__file__).resolve().parents[1]
# The schedule ends at step 6 whatever train.steps is, so a run of 4 steps resumed to 6 is the same
# run as one of 6.
TINY = ["--config=configs/tiny.py", "--config.train.log_every=1", "--config.train.eval_every=4",
        "--config.train.checkpoint_every=2", "--config.optim.warmup_steps=2",
        "--config.optim.decay_steps=6"]
SINGLE_MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]
# fsdp inside each process, data across the two: the hybrid (in-host x across-host) layout.
TWO_PROCESS_MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.dcn_data=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def launch(workdir, flags: list[str], processes: int = 2, extra=(), logs: Path | None = None
           ) -> list[subprocess.Popen]:
    """The processes of one job; each one's output goes to <logs>/process_<i>.log, by default
    beside a local workdir (a pipe that nobody drains could block one process while the other
    waits for it in a collective)."""
    port, logs = free_port(), logs or Path(workdir).parent
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(
        [sys.executable, "-m", "lm.train", *TINY, *flags, f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
         f"--process_id={i}", *extra], cwd=ROOT, env=env(8 // processes),
        stdout=open(logs / f"process_{i}.log", "w"), stderr=subprocess.STDOUT)
        for i in range(processes)]


def finish(procs: list[subprocess.Popen], workdir, logs: Path | None = None) -> list[str]:
    logs = logs or Path(workdir).parent
    for p in procs:
        p.wait(timeout=600)
    return [(logs / f"process_{i}.log").read_text() for i in range(len(procs))]


def losses(workdir) -> list[float]:
    records = [json.loads(line) for line in fs.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def train_single(workdir: Path, steps: int) -> str:
    result = subprocess.run([sys.executable, "-m", "lm.train", *TINY, *SINGLE_MESH,
                             f"--config.train.steps={steps}", f"--workdir={workdir}"], cwd=ROOT,
                            env=env(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def train_two_processes(workdir, steps: int, logs: Path | None = None) -> list[str]:
    procs = launch(workdir, [*TWO_PROCESS_MESH, f"--config.train.steps={steps}"], logs=logs)
    outputs = finish(procs, workdir, logs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs


def test_two_processes_train_and_resume_exactly_like_one_process(tmp_path, s3_server):
    # The two processes' workdir is in a bucket (S3: orbax's checkpoints there are lm's own
    # extension, lm/orbax_s3.py), as a pod's is: each writes its shards of every checkpoint there.
    single, multi, logs = tmp_path / "single", "s3://bucket/multihost/run", tmp_path / "logs"
    train_single(single, 4)
    outputs = train_two_processes(multi, 4, logs)
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
    assert len(losses(multi)) == 4  # one metrics writer, not two
    assert len([p for p in fs.listdir(multi) if p.name.startswith("events.out.tfevents")]) == 1
    assert "step 4/4" in outputs[0] and "step 4/4" not in outputs[1]  # process 0 alone logs
    assert sorted(p.name for p in fs.listdir(f"{multi}/checkpoints")) == ["2", "4"]
    assert {p.name for p in fs.listdir(f"{multi}/checkpoints/4/params")} >= {
        "ocdbt.process_0", "ocdbt.process_1", "commit_success.txt"}

    # Each layout resumes the other's checkpoint, data position included.
    outputs = train_two_processes(single, 6)
    assert "written by 1 processes" in outputs[0]
    assert "written by 2 processes" in train_single(multi, 6)
    assert len(losses(single)) == len(losses(multi)) == 6
    assert losses(single)[4:] == pytest.approx(losses(multi)[4:], rel=1e-5)


def test_a_dead_process_stops_the_other_in_bounded_time_and_a_rerun_resumes(tmp_path):
    workdir = tmp_path / "run"
    procs = launch(workdir, ["--config.train.steps=100000"],
                   extra=["--heartbeat_timeout_seconds=5"])
    while not (workdir / "checkpoints" / "2" / "commit_success.txt").exists():
        assert procs[0].poll() is None, (tmp_path / "process_0.log").read_text()
        time.sleep(0.5)
    procs[1].kill()
    start = time.monotonic()
    procs[0].wait(timeout=120)
    assert procs[0].returncode != 0
    assert time.monotonic() - start < 60
    rerun = launch(workdir, ["--config.train.steps=12"])
    outputs = finish(rerun, workdir)
    assert [p.returncode for p in rerun] == [0, 0], outputs
    assert "resumed from step" in outputs[0] and "step 12/12" in outputs[0], outputs


def test_explicit_coordinator_flags_must_come_together(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lm.train", *TINY, f"--workdir={tmp_path}",
                             "--config.train.steps=4", "--num_processes=2"], cwd=ROOT, env=env(8), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --coordinator_address, --num_processes and --process_id go together")


def test_cluster_launchers_are_detected_from_their_environment():
    assert detected_cluster({"SLURM_NTASKS": "4"}) == "SLURM"
    assert detected_cluster({"SLURM_NTASKS": "1"}) is None
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "multi-host TPU"
    assert detected_cluster({}) is None


def test_tpu_launcher_dry_run_prints_the_commands_for_every_worker():
    result = subprocess.run(
        ["bash", "scripts/launch_tpu.sh", "--name=pod", "--zone=us-east5-a",
         "--accelerator=v5p-64", "--create", "--dry_run", "--", "python", "-m", "lm.train",
         "--config=configs/llama_1b.py", "--workdir=gs://b/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("+ gcloud compute tpus tpu-vm create pod --zone=us-east5-a "
                        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5")
    assert lines[1].startswith("+ git archive --format=tar.gz")
    assert "scp" in lines[2] and "--worker=all" in lines[2]
    assert "pip\\ install" in lines[3] and "--worker=all" in lines[3]
    assert "--worker=all" in lines[4] and "--workdir=gs://b/run" in lines[4]
    assert lines[5].endswith("--worker=0 --command=tail\\ -F\\ lm/run.log")


def test_slurm_script_dry_run_prints_one_srun_for_all_nodes():
    result = subprocess.run(["bash", "scripts/slurm_gpu.sbatch", "--config=configs/llama_1b.py",
                             "--workdir=/shared/run"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("srun --kill-on-bad-exit=1 python -m lm.train "
                                     "--config=configs/llama_1b.py --workdir=/shared/run")
