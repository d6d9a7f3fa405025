"""Restart a binary once with an allocator that keeps freed memory for the next step.

XLA:CPU allocates a step's temporaries (gigabytes for GPT-2 small) with malloc and frees them after
the step. glibc serves a buffer that large with a fresh mapping and unmaps it at free, so every step
first-touches all of it again: page faults, zeroing and, with huge pages, compaction, all in the
kernel, a large part of a CPU step. Keeping the memory (glibc's tunables, or jemalloc, a little
faster) removes that. XLA:CPU starts a step before the last one has released its temporaries, so a
training loop keeps two sets, mapped once. Measurements: docs/benchmarks.md (the allocator table).

With jemalloc installed (Debian/Ubuntu: libjemalloc2) it is preloaded with page decay off. Otherwise
glibc's tunables keep the memory: no mmap, no trimming, huge pages, and one arena (a thread's own
arena would still map a large buffer afresh); its threads then share one lock, so on a many-core host
with heavy host-side work prefer jemalloc. Either is read only when a process starts, hence the
restart, which prints one line on stderr.

Only where it was measured: the CPU backend. A GPU or TPU host keeps its allocator (XLA allocates
device memory itself there, while glibc's one arena and no trimming could slow grain's and orbax's
threads), judged before JAX is imported: JAX_PLATFORMS when set, else the absence of accelerator
devices (/dev/nvidia*, /dev/kfd, /dev/accel*, /dev/vfio/N) and of libtpu. LM_ALLOCATOR=off never
restarts, LM_ALLOCATOR=on restarts on any backend; a user's own choice (GLIBC_TUNABLES or MALLOC_CONF
set, even empty, or a malloc in LD_PRELOAD) is kept as it is. Stdlib only.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import os
import sys
from typing import Mapping

JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
GLIBC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  "glibc.malloc.trim_threshold=1099511627776")


MODES = ("auto", "on", "off")  # LM_ALLOCATOR: auto restarts on the CPU backend only
_ACCELERATORS = ("nvidia*", "kfd", "accel*", "vfio/[0-9]*")  # GPU (NVIDIA, AMD), TPU (v4, v5+)


def cpu_backend(env: Mapping[str, str], devices: str = "/dev") -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS names only cpu, or, unset, this host has no
    accelerator device under `devices` and no libtpu."""
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return all(p == "cpu" for p in platforms)
    if any(glob.glob(os.path.join(devices, pattern)) for pattern in _ACCELERATORS):
        return False
    return importlib.util.find_spec("libtpu") is None


def _mode(env: Mapping[str, str]) -> str:
    mode = env.get("LM_ALLOCATOR", "") or "auto"
    if mode not in MODES:
        raise ValueError(f"LM_ALLOCATOR={mode!r} is not one of {', '.join(MODES)}")
    return mode


def environment(env: Mapping[str, str], jemalloc: str | None = "find", devices: str = "/dev"
                ) -> dict[str, str]:
    """`env` with the allocator settings added, or unchanged: the user chose an allocator,
    LM_ALLOCATOR=off, or (LM_ALLOCATOR=auto) the backend will not be the CPU. `jemalloc`: the
    library to preload, None for glibc's tunables, "find" to look for it."""
    chosen = "GLIBC_TUNABLES" in env or "MALLOC_CONF" in env or any(
        name in env.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))
    mode = _mode(env)
    if sys.platform != "linux" or chosen or mode == "off" or (
            mode == "auto" and not cpu_backend(env, devices)):
        return dict(env)
    if jemalloc == "find":
        jemalloc = ctypes.util.find_library("jemalloc")
    if jemalloc is None:
        return {**env, "GLIBC_TUNABLES": GLIBC_TUNABLES}
    preload = " ".join(filter(None, (jemalloc, env.get("LD_PRELOAD"))))
    return {**env, "LD_PRELOAD": preload, "MALLOC_CONF": JEMALLOC_CONF}


def _this_environment() -> dict[str, str]:
    try:
        return environment(os.environ)
    except ValueError as e:
        sys.exit(f"error: {e}")


def restart_with_retained_memory() -> None:
    """Re-execute this process, same arguments, with `environment` when it changes anything."""
    env = _this_environment()
    if env == dict(os.environ):
        return
    kind = "jemalloc" if "MALLOC_CONF" in env else "glibc's tunables"
    print(f"lm: restarting once with {kind} keeping freed memory for XLA:CPU "
          f"(LM_ALLOCATOR=off skips this)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":  # eval "$(python -m lm.allocator)" before starting Jupyter, for example
    import shlex

    print("\n".join(f"export {name}={shlex.quote(value)}"
                    for name, value in _this_environment().items()
                    if os.environ.get(name) != value))
