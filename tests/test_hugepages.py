"""The binaries restart themselves once with glibc's huge-page tunable, and respect a user's own."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm import hugepages

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux only")

# Prints a line before the restart and the environment after it: one restart shows as two "start".
PROBE = ("import os, sys; from lm import hugepages; print('start', flush=True); "
         "hugepages.restart_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return {**env, **extra}


def probe(env: dict) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, "a", "--b=1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_restart_happens_once_with_the_tunable_and_the_same_arguments():
    assert probe(environment()) == ["start", "start", f"{hugepages.TUNABLES} ['a', '--b=1']"]


def test_a_users_own_glibc_tunables_are_kept_without_a_restart():
    env = environment(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert probe(env) == ["start", "glibc.malloc.arena_max=2 ['a', '--b=1']"]


def test_train_binary_runs_with_huge_pages_when_started_without_them(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "lm.train", "--config=configs/tiny.py", f"--workdir={tmp_path}"],
        cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    environ = Path(f"/proc/{process.pid}/environ")
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            # The restart keeps the process id and replaces its environment.
            if f"GLIBC_TUNABLES={hugepages.TUNABLES}".encode() in environ.read_bytes().split(b"\0"):
                return
            time.sleep(0.05)
        pytest.fail(f"the train binary never ran with GLIBC_TUNABLES={hugepages.TUNABLES}")
    finally:
        process.kill()
        process.wait()


def console_script(name: str) -> str:
    script = Path(sys.executable).with_name(name)  # where pip installs it, beside the interpreter
    if not script.exists():
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return str(script)


@pytest.mark.parametrize("binary", [
    ["-m", "lm.train"], ["-m", "lm.evaluate"], ["lm-train"], ["lm-evaluate"]],
    ids=["python -m lm.train", "python -m lm.evaluate", "lm-train", "lm-evaluate"])
def test_binaries_restart_before_importing_jax(binary):
    # -X importtime survives the restart (sys.orig_argv) and logs each process's imports to
    # stderr: JAX imported before the restart would be imported twice, a second of every start.
    command = binary if binary[0] == "-m" else [console_script(binary[0])]
    result = subprocess.run([sys.executable, "-X", "importtime", *command, "--helpshort"],
                            cwd=ROOT, env=environment(), capture_output=True, text=True,
                            timeout=120)
    jax_imports = [line for line in result.stderr.splitlines() if re.search(r"\|\s*jax$", line)]
    assert len(jax_imports) == 1, result.stderr[-2000:]
