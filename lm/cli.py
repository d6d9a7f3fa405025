"""The console scripts `lm-train` and `lm-evaluate`: each restarts with its allocator (lm/allocator.py)
before it imports its binary, whose imports (JAX among them) a restart would otherwise pay twice."""

from __future__ import annotations

from lm import allocator


def train() -> None:
    allocator.restart_with_retained_memory()
    from lm.train import run
    run()


def evaluate() -> None:
    allocator.restart_with_retained_memory()
    from lm.evaluate import run
    run()
