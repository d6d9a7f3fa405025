"""Kill points: stop a training run at many points of its steps, saves and restores, rerun it to the
end, and check that it ends bitwise where a run that was never stopped ends.

    python scripts/fault_sweep.py                        # every fault, ~15 minutes on 2 CPU cores
    python scripts/fault_sweep.py --cases=6              # 33 cases: docs/training.md's table
    python scripts/fault_sweep.py --faults=sigkill_mid_save --cases=3 --output_json=sweep.json

Faults (each case a fresh workdir, the binary `python -m lm.train` in subprocesses):
  sigkill_mid_save      SIGKILL while the k-th asynchronous save is being written (its orbax
                        temporary directory exists), k = 1, 2, ...
  sigkill_any_time      SIGKILL after steps 1, ..., steps - 2 (evenly spread over the cases), a
                        random part of a step's time after the step was logged
  sigkill_mid_restore   SIGKILL 0, 40, 80, ... ms after a rerun first has a file of the checkpoint
                        open (its restore has begun; the case names that file)
  sigterm               SIGTERM at the same points: exit 143 with the current step saved
  damaged_latest        a file of the newest checkpoint truncated, or one byte of it flipped: in
                        turn a chunk of parameters or of optimizer state, an item's metadata, the
                        data-iterator state, the fingerprint (the file and byte at random): the
                        rerun passes the checkpoint over, or reads it intact
  sigterm_one_of_two    two processes (data across them), SIGTERM to one of them (alternately) at
                        the same points: both exit 143 having saved the same step

Every case is then rerun to the end and must have, bitwise, the uninterrupted run's loss at every
step and its final parameters. The table counts the cases and
what survived; the JSON has each case.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAULTS = ("sigkill_mid_save", "sigkill_any_time", "sigkill_mid_restore", "sigterm",
          "damaged_latest", "sigterm_one_of_two")
_FAULTS = flags.DEFINE_list("faults", list(FAULTS), f"Which faults to try: {', '.join(FAULTS)}.")
_CASES = flags.DEFINE_integer("cases", 8, "Cases (kill points) per fault; half that for the "
                              "two-process fault, whose jobs cost twice as much.")
_STEPS = flags.DEFINE_integer("steps", 24, "Steps of every run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random choices (damaged files, bytes).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the runs go (default: a temporary folder, "
                               "removed at the end).")
_OUTPUT = flags.DEFINE_string("output_json", "", "Also write every case here.")

# The tiny model on a mesh that shards it (fsdp=2), saving every 2 steps so that saves are often in
# flight. The learning rate schedule is fixed by decay_steps, whatever a rerun asks for.
DEVICES = 2


def train_flags(steps: int) -> list[str]:
    return ["--config=configs/tiny.py", f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=2", "--config.train.log_every=1",
            "--config.train.eval_every=100000", "--config.train.sample_length=0",
            "--config.optim.warmup_steps=2", f"--config.optim.decay_steps={_STEPS.value}",
            "--config.mesh.data=1", "--config.mesh.fsdp=-1"]


@dataclasses.dataclass
class Job:
    """One run of the training binary, in one process or several."""
    processes: list[subprocess.Popen]
    logs: list[Path]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def wait(self, timeout: float = 900) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.processes]

    def output(self, index: int = 0) -> str:
        return self.logs[index].read_text(errors="replace")


def start(workdir: Path, steps: int, cache: Path, processes: int = 1) -> Job:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    extra = [[]]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        extra = [[f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                  f"--process_id={i}", "--config.mesh.dcn_data=2"] for i in range(processes)]
    logs = [workdir.parent / f"{workdir.name}.{len(list(workdir.parent.glob(workdir.name + '.*')))}"
            f".process_{i}.log" for i in range(processes)]
    return Job([subprocess.Popen(
        [sys.executable, "-m", "lm.train", *train_flags(steps), f"--workdir={workdir}",
         f"--compilation_cache_dir={cache}", *extra[i]], cwd=ROOT, env=env,
        stdout=open(logs[i], "w"), stderr=subprocess.STDOUT) for i in range(processes)], logs)


def wait_until(job: Job, ready: Callable[[], bool], poll: float = 0.002) -> bool:
    """True once `ready()`; False if the job ended first."""
    while job.alive():
        if ready():
            return True
        time.sleep(poll)
    return False


def kill_when(job: Job, ready: Callable[[], bool], sig: int = signal.SIGKILL, process: int = 0,
              poll: float = 0.002) -> bool:
    """Send `sig` to one process of the job once `ready()`; False if the job ended first."""
    if not wait_until(job, ready, poll):
        return False
    job.processes[process].send_signal(sig)
    return True


def losses(workdir: Path) -> dict[int, float]:
    """Each step's loss as last logged: a rerun's value replaces a killed run's."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def logged_steps(workdir: Path) -> int:
    try:
        return max(losses(workdir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line being written
        return 0


def checkpoints(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
        if folder.is_dir() else []


def saving(workdir: Path) -> list[str]:
    folder = workdir / "checkpoints"
    return [p.name for p in folder.iterdir() if "tmp" in p.name] if folder.is_dir() else []


def final_params(workdir: Path):
    import jax
    import lm
    return jax.device_get(lm.load(workdir).params)


def same_params(a, b) -> bool:
    import jax
    import numpy as np
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@dataclasses.dataclass
class Sweep:
    root: Path
    cache: Path
    references: dict[int, tuple[dict[int, float], object]]  # by process count: losses, params
    rng: random.Random
    run_seconds: float  # an uninterrupted run's, from its first logged step to its end
    cases: list[dict] = dataclasses.field(default_factory=list)

    @property
    def step_seconds(self) -> float:
        return self.run_seconds / _STEPS.value

    def finish(self, fault: str, workdir: Path, point: str, processes: int = 1,
               reruns: int = 1) -> None:
        """Rerun `workdir` to the end and record whether it matches the reference bitwise."""
        codes, resumed = [], []
        for _ in range(reruns):
            job = start(workdir, _STEPS.value, self.cache, processes)
            codes.append(job.wait())
            resumed += [line.split("resumed from step ")[1].split()[0]
                        for line in job.output().splitlines() if "resumed from step" in line]
        reference, reference_params = self.references[processes]
        got = losses(workdir)
        same = got == reference and same_params(final_params(workdir), reference_params)
        case = {"fault": fault, "point": point, "rerun_exit_codes": codes,
                "resumed_from": resumed, "set_aside": sorted(
                    p.name for p in (workdir / "checkpoints").glob("*.unreadable*")),
                "bitwise": bool(same)}
        if not same:
            case["differing_steps"] = sorted(s for s in reference if got.get(s) != reference[s])
        self.cases.append(case)
        print(json.dumps(case), flush=True)

    def workdir(self, fault: str, index: int) -> Path:
        return self.root / fault / f"case_{index}" / "run"


def sigkill_mid_save(sweep: Sweep, index: int) -> None:
    workdir = sweep.workdir("sigkill_mid_save", index)
    job = start(workdir, _STEPS.value, sweep.cache)
    seen: set[str] = set()

    def in_save() -> bool:
        seen.update(saving(workdir))
        return len(seen) > index
    killed = kill_when(job, in_save, poll=0.0005)
    job.wait()
    left = saving(workdir)
    point = f"while writing save #{index + 1}" + (
        f" ({', '.join(left)} left behind)" if left else " (it completed first)")
    sweep.finish("sigkill_mid_save", workdir, point if killed else "(the run ended first)")


def target_step(index: int, cases: int) -> int:
    """Step 1, ..., steps - 2, evenly spread over the cases."""
    return 1 + round(index * (_STEPS.value - 3) / max(cases - 1, 1))


def signal_during_step(sweep: Sweep, job: Job, workdir: Path, index: int, cases: int, sig: int,
                       process: int = 0) -> str:
    """Send `sig` once step k is logged, after a random part of a step's time; says where."""
    step = target_step(index, cases)
    delay = sweep.rng.uniform(0, sweep.step_seconds)
    if not wait_until(job, lambda: logged_steps(workdir) >= step):
        return "(the run ended first)"
    time.sleep(delay)
    if not job.alive():
        return "(the run ended first)"
    job.processes[process].send_signal(sig)
    return f"{delay * 1e3:.0f} ms after step {step} was logged"


def sigkill_any_time(sweep: Sweep, index: int, sig: int = signal.SIGKILL,
                     fault: str = "sigkill_any_time") -> None:
    workdir = sweep.workdir(fault, index)
    job = start(workdir, _STEPS.value, sweep.cache)
    point = signal_during_step(sweep, job, workdir, index, _CASES.value, sig)
    codes = job.wait()
    if sig == signal.SIGTERM and "ended first" not in point:
        point += f", exit {codes[0]}" + (", saved step " + str(checkpoints(workdir)[-1]))
    sweep.finish(fault, workdir, point)


def sigterm(sweep: Sweep, index: int) -> None:
    sigkill_any_time(sweep, index, sig=signal.SIGTERM, fault="sigterm")


def _partial_run(sweep: Sweep, fault: str, index: int) -> Path:
    """A workdir trained and saved through half the steps, as any stopped run leaves it."""
    workdir = sweep.workdir(fault, index)
    start(workdir, _STEPS.value // 2, sweep.cache).wait()
    return workdir


def open_file_under(pid: int, folder: str) -> str:
    """A file under `folder` that process `pid` has open ("" if none, or if it is gone)."""
    try:
        return next((t for fd in Path(f"/proc/{pid}/fd").iterdir()
                     if (t := os.readlink(fd)).startswith(folder)), "")
    except OSError:  # a descriptor closed while listed, or the process ended
        return ""


def sigkill_mid_restore(sweep: Sweep, index: int) -> None:
    """SIGKILL 0, 40, 80, ... ms after the rerun first has a file of the checkpoint open."""
    workdir = _partial_run(sweep, "sigkill_mid_restore", index)
    job = start(workdir, _STEPS.value, sweep.cache)
    checkpoints_dir = (workdir / "checkpoints").resolve()
    folder, opened, polls = f"{checkpoints_dir}/", [""], [0]

    def restoring_or_restored() -> bool:
        opened[0] = open_file_under(job.processes[0].pid, folder)
        polls[0] += 1  # the log is read less often: an open file missed shows up there
        return bool(opened[0]) or (polls[0] % 100 == 0 and "resumed from step" in job.output())
    wait_until(job, restoring_or_restored, poll=0.0005)
    delay = index * 0.04
    time.sleep(delay)
    killed = job.alive()
    job.processes[0].kill()
    job.wait()
    first = Path(opened[0]).relative_to(checkpoints_dir) if opened[0] else None
    point = (f"{delay * 1e3:.0f} ms after it first had {first} open" if first else
             "after its restore (no open file caught)")
    if first and "resumed from step" in job.output():
        point += ", after its restore"
    sweep.finish("sigkill_mid_restore", workdir, point if killed else "(the run ended first)")


# What damaged_latest does to the newest checkpoint, case after case: (the files it picks one of,
# relative to the step's directory, and whether it flips a byte or truncates the file to half).
DAMAGES = (("params/**/d/*", "flip"), ("opt_state/**/d/*", "flip"),
           ("opt_state/**/d/*", "truncate"), ("*/_METADATA", "flip"), ("data/*.json", "truncate"),
           ("fingerprint/*", "flip"))


def damaged_latest(sweep: Sweep, index: int) -> None:
    workdir = _partial_run(sweep, "damaged_latest", index)
    latest = workdir / "checkpoints" / str(checkpoints(workdir)[-1])
    pattern, how = DAMAGES[index % len(DAMAGES)]
    victim = sweep.rng.choice(sorted(p for p in latest.glob(pattern) if p.is_file()))
    data = bytearray(victim.read_bytes())
    if how == "truncate":
        victim.write_bytes(data[:len(data) // 2])
        done = f"truncated to {len(data) // 2} of {len(data)} bytes"
    else:
        at = sweep.rng.randrange(len(data))
        data[at] ^= 0xFF
        victim.write_bytes(bytes(data))
        done = f"byte {at} of {len(data)} flipped"
    sweep.finish("damaged_latest", workdir, f"{victim.relative_to(latest.parent)} {done}")


def sigterm_one_of_two(sweep: Sweep, index: int) -> None:
    workdir = sweep.workdir("sigterm_one_of_two", index)
    job = start(workdir, _STEPS.value, sweep.cache, processes=2)
    process = index % 2
    point = signal_during_step(sweep, job, workdir, index, max(_CASES.value // 2, 1),
                               signal.SIGTERM, process)
    codes = job.wait()
    saved = [sorted(p.name for p in (workdir / "checkpoints" / str(s) / "data").glob("*.json"))
             for s in checkpoints(workdir)]
    both = all(names == ["process_0-of-2.json", "process_1-of-2.json"] for names in saved)
    if "ended first" not in point:
        point = (f"SIGTERM to process {process} {point}: exits {codes}, saved step "
                 f"{checkpoints(workdir)[-1]}, "
                 f"{'every save written by both' if both else 'a save missing a process'}")
    sweep.finish("sigterm_one_of_two", workdir, point, processes=2)


def _summary(cases: list[dict]) -> str:
    rows = ["| fault | kill points | survived bitwise | passed over (set aside) |",
            "|---|---|---|---|"]
    for fault in FAULTS:
        mine = [c for c in cases if c["fault"] == fault]
        if mine:
            rows.append(f"| {fault} | {len(mine)} | {sum(c['bitwise'] for c in mine)} of "
                        f"{len(mine)} | {sum(bool(c['set_aside']) for c in mine)} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(_FAULTS.value) - set(FAULTS))
    if unknown:
        sys.exit(f"error: --faults: unknown {unknown}; choose from {', '.join(FAULTS)}")
    # Absolute: the runs' working directory is the repository's.
    root = Path(_WORKDIR.value or tempfile.mkdtemp(prefix="fault_sweep_")).resolve()
    cache = root / "xla_cache"
    began = time.monotonic()
    reference = start(root / "reference" / "run", _STEPS.value, cache)
    reference.wait()
    startup = next(float(line.split("compiled in ")[1].split("s")[0])
                   for line in reference.output().splitlines() if "compiled in" in line)
    timed = start(root / "timed" / "run", _STEPS.value, cache)  # compiled: its steps' duration
    wait_until(timed, lambda: logged_steps(root / "timed" / "run") >= 1)
    first = time.monotonic()
    timed.wait()
    run_seconds = time.monotonic() - first
    references = {1: root / "reference" / "run"}
    if "sigterm_one_of_two" in _FAULTS.value:
        references[2] = root / "reference_two" / "run"
        start(references[2], _STEPS.value, cache, processes=2).wait()
    sweep = Sweep(root, cache, {n: (losses(path), final_params(path))
                                for n, path in references.items()},
                  random.Random(_SEED.value), run_seconds=run_seconds)
    print(f"reference: {_STEPS.value} steps, their run {sweep.run_seconds:.1f} s "
          f"(first compile {startup:.1f} s)", flush=True)
    for fault in _FAULTS.value:
        count = _CASES.value // 2 if fault == "sigterm_one_of_two" else _CASES.value
        for index in range(count):
            globals()[fault](sweep, index)
    print(_summary(sweep.cases))
    print(f"{len(sweep.cases)} cases in {(time.monotonic() - began) / 60:.1f} minutes")
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(sweep.cases, indent=2))
    if not _WORKDIR.value:
        shutil.rmtree(root, ignore_errors=True)
    if not all(c["bitwise"] for c in sweep.cases):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
