"""The binaries restart themselves once with an allocator that keeps freed memory, on the CPU
backend only, say so in one line, and respect a user's own choice of allocator or LM_ALLOCATOR."""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm import allocator

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux only")
CHOICES = ("GLIBC_TUNABLES", "MALLOC_CONF", "LD_PRELOAD")
JEMALLOC = allocator.environment({}).get("LD_PRELOAD")  # None where jemalloc is not installed

# Prints a line before the restart and the settings after it: one restart shows as two "start".
PROBE = ("import os, sys; from lm import allocator; print('start', flush=True); "
         "allocator.restart_with_retained_memory(); "
         f"print([os.environ.get(k) for k in {CHOICES}], sys.argv[1:])")

# Allocates, frees and allocates again a 256 MiB buffer: the page faults of the second touch.
REUSE = ("import resource, numpy as np; np.ones(2**26, np.float32); "
         "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; np.ones(2**26, np.float32); "
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")


def environment(**extra) -> dict:
    """The tests' environment (JAX_PLATFORMS=cpu: tests/conftest.py) without allocator choices."""
    return {**{k: v for k, v in os.environ.items() if k not in (*CHOICES, "LM_ALLOCATOR")},
            "JAX_PLATFORMS": "cpu", **extra}


def run(code: str, env: dict, *args: str, stderr: list | None = None) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    if stderr is not None:
        stderr.extend(result.stderr.splitlines())
    return result.stdout.splitlines()


def test_restart_happens_once_with_the_allocator_and_the_same_arguments():
    settings = allocator.environment(environment())
    expected = str([settings.get(k) for k in CHOICES])
    stderr = []
    assert run(PROBE, environment(), "a", "--b=1", stderr=stderr) == [
        "start", "start", f"{expected} ['a', '--b=1']"]
    assert len(stderr) == 1 and stderr[0].startswith("lm: restarting once with ")
    assert stderr[0].endswith("(LM_ALLOCATOR=off skips this)")


@pytest.mark.parametrize("env, devices, restarts", [
    ({"JAX_PLATFORMS": "cpu"}, ["nvidia0"], True),  # told: the CPU, whatever the host has
    ({"JAX_PLATFORMS": "cuda"}, [], False),
    ({"JAX_PLATFORMS": "tpu,cpu"}, [], False),
    ({}, [], True),
    ({}, ["nvidiactl", "nvidia0"], False),
    ({}, ["kfd"], False),
    ({}, ["accel0"], False),  # TPU v4
    ({}, ["vfio/vfio", "vfio/0"], False),  # TPU v5 and later
    ({}, ["vfio/vfio"], True),  # the VFIO control node alone is no accelerator
    ({"LM_ALLOCATOR": "off", "JAX_PLATFORMS": "cpu"}, [], False),
    ({"LM_ALLOCATOR": "on", "JAX_PLATFORMS": "tpu"}, [], True),
], ids=["JAX_PLATFORMS=cpu", "JAX_PLATFORMS=cuda", "JAX_PLATFORMS=tpu,cpu", "no accelerator",
        "NVIDIA GPU", "AMD GPU", "TPU v4", "TPU v5", "VFIO alone", "LM_ALLOCATOR=off",
        "LM_ALLOCATOR=on"])
def test_the_allocator_is_chosen_only_for_the_cpu_backend_unless_told(tmp_path, env, devices,
                                                                      restarts):
    if not env and restarts and importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed: a TPU host")
    for device in devices:
        (tmp_path / device).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / device).touch()
    base = {k: v for k, v in environment().items() if k != "JAX_PLATFORMS"}
    chosen = allocator.environment({**base, **env}, jemalloc=None, devices=str(tmp_path))
    assert (chosen != {**base, **env}) == restarts


def test_off_or_another_backend_starts_without_a_restart_and_a_bad_value_is_one_line():
    for env in (environment(LM_ALLOCATOR="off"), environment(JAX_PLATFORMS="tpu")):
        stderr = []
        assert run(PROBE, env, "a", stderr=stderr)[0:2] == ["start", f"{[None] * 3} ['a']"]
        assert not any("restarting" in line for line in stderr)
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                            env=environment(LM_ALLOCATOR="yes"), text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: LM_ALLOCATOR='yes' is not one of auto, on, off"


@pytest.mark.parametrize("choice", [{"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                    {"MALLOC_CONF": ""}, {"LD_PRELOAD": "libtcmalloc.so.4"}])
def test_a_users_own_allocator_choice_is_kept_without_a_restart(choice):
    kept = str([choice.get(k) for k in CHOICES])
    assert run(PROBE, environment(**choice), "a") == ["start", f"{kept} ['a']"]


def test_jemalloc_is_preloaded_before_other_libraries_and_glibc_is_the_fallback():
    env = environment(LD_PRELOAD="libfoo.so")
    with_jemalloc = allocator.environment(env, jemalloc="libjemalloc.so.2")
    assert with_jemalloc["LD_PRELOAD"] == "libjemalloc.so.2 libfoo.so"
    assert with_jemalloc["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert "GLIBC_TUNABLES" not in with_jemalloc
    assert allocator.environment(env, jemalloc=None) == {
        **env, "GLIBC_TUNABLES": allocator.GLIBC_TUNABLES}


@pytest.mark.parametrize("library", ["glibc", "jemalloc"])
def test_freed_memory_is_reused_without_page_faults(library):
    if library == "jemalloc" and JEMALLOC is None:
        pytest.skip("jemalloc is not installed")
    env = allocator.environment(environment(), jemalloc=None if library == "glibc" else JEMALLOC)
    [faults] = run(REUSE, env)
    # Mapped afresh, 256 MiB takes a fault per page: at least 128, were they all 2 MiB pages.
    assert int(faults) < 32
    [faults] = run(REUSE, environment(GLIBC_TUNABLES=""))  # glibc's defaults: it is mapped afresh
    assert int(faults) >= 128


def test_train_binary_runs_with_the_allocator_when_started_without_one(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "lm.train", "--config=configs/tiny.py", f"--workdir={tmp_path}"],
        cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    environ = Path(f"/proc/{process.pid}/environ")
    wanted = [f"{k}={v}".encode() for k, v in allocator.environment(environment()).items()
              if k in CHOICES]
    # glibc's loader may cut GLIBC_TUNABLES at each ':' in the block that /proc shows, as it
    # parses it (Debian's glibc 2.36); the value the process itself reads stays whole.
    forms = [(b"\0" + w + b"\0", b"\0" + w.replace(b":", b"\0") + b"\0") for w in wanted]
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            # The restart keeps the process id and replaces its environment.
            block = b"\0" + environ.read_bytes()
            if all(whole in block or cut in block for whole, cut in forms):
                return
            time.sleep(0.05)
        pytest.fail(f"the train binary never ran with {wanted}")
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


def test_the_module_prints_the_settings_as_shell_exports_for_a_notebook_server():
    env = environment(LD_PRELOAD="libfoo.so")
    printed = subprocess.run([sys.executable, "-m", "lm.allocator"], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    echo = 'echo "' + "|".join(f"${name}" for name in CHOICES) + '"'
    shell = subprocess.run(["bash", "-c", "\n".join([*printed, echo])], env=env,
                           capture_output=True, text=True)
    settings = allocator.environment(env)
    assert shell.stdout.strip() == "|".join(settings.get(name, "") for name in CHOICES)
