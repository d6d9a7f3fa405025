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
restart. A user's own choice (GLIBC_TUNABLES or MALLOC_CONF set, even empty, or a malloc in
LD_PRELOAD) is kept as it is. Stdlib only.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Mapping

JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
GLIBC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  "glibc.malloc.trim_threshold=1099511627776")


def environment(env: Mapping[str, str], jemalloc: str | None = "find") -> dict[str, str]:
    """`env` with the allocator settings added, or unchanged when it already chose its own.
    `jemalloc`: the library to preload, None for glibc's tunables, "find" to look for it."""
    chosen = "GLIBC_TUNABLES" in env or "MALLOC_CONF" in env or any(
        name in env.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))
    if sys.platform != "linux" or chosen:
        return dict(env)
    if jemalloc == "find":
        jemalloc = ctypes.util.find_library("jemalloc")
    if jemalloc is None:
        return {**env, "GLIBC_TUNABLES": GLIBC_TUNABLES}
    preload = " ".join(filter(None, (jemalloc, env.get("LD_PRELOAD"))))
    return {**env, "LD_PRELOAD": preload, "MALLOC_CONF": JEMALLOC_CONF}


def restart_with_retained_memory() -> None:
    """Re-execute this process, same arguments, with `environment` when it changes anything."""
    env = environment(os.environ)
    if env == dict(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":  # eval "$(python -m lm.allocator)" before starting Jupyter, for example
    import shlex

    print("\n".join(f"export {name}={shlex.quote(value)}"
                    for name, value in environment(os.environ).items()
                    if os.environ.get(name) != value))
