"""A disk cache of compiled programs, so that running a config again does not compile it again.

The binaries point JAX's persistent compilation cache at `--compilation_cache_dir` (by default
~/.cache/lm/xla, or $XDG_CACHE_HOME/lm/xla). A program is looked up by a hash of its HLO, the
compile options, the devices and the JAX/XLA versions, so a changed config, mesh or version compiles
afresh and a cached program is the one a fresh compile would make: losses are unchanged. Programs
that compile in under a second are not stored (JAX's default). Kept free of heavy imports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags

ENV = "JAX_COMPILATION_CACHE_DIR"  # JAX's own variable: a user who set it keeps it

_DEFAULT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm" / "xla"
_DIR = flags.DEFINE_string(
    "compilation_cache_dir", str(_DEFAULT), "Where compiled programs are kept between runs (the "
    f"cache is trusted: keep it private); '' turns it off. ${ENV}, when set, is used instead of "
    "the default.")
# Least recently used programs are dropped beyond this (a Shakespeare run stores 0.65 MB).
MAX_BYTES = 4 * 2**30


def _writable(path: str) -> bool:
    from lm import fs  # (imports JAX, which `enable` imports anyway)
    from lm.config import ConfigError

    try:
        fs.makedirs(path)
    except ConfigError:
        return False
    return fs.is_remote(path) or os.access(path, os.W_OK)


def enable() -> str | None:
    """Use the cache directory the flag (or $JAX_COMPILATION_CACHE_DIR) names; returns it, or None
    when the cache is off. Call before the first compile."""
    import jax

    path = _DIR.value if _DIR.present or ENV not in os.environ else os.environ[ENV]
    path = os.path.expanduser(path) if path else None
    if path and not _writable(path):  # a run without the cache is still a run: say so, once
        print(f"warning: cannot write the compilation cache {path}, so every program compiles; "
              f"pass --compilation_cache_dir= a writable directory, or empty for no cache",
              file=sys.stderr)
        path = None
    jax.config.update("jax_compilation_cache_dir", path)
    if path:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
