"""The console scripts `lm-train` and `lm-evaluate`: each restarts for huge pages (lm/hugepages.py)
before it imports its binary, whose imports (JAX among them) a restart would otherwise pay twice."""

from __future__ import annotations

from lm import hugepages


def train() -> None:
    hugepages.restart_with_huge_pages()
    from lm.train import run
    run()


def evaluate() -> None:
    hugepages.restart_with_huge_pages()
    from lm.evaluate import run
    run()
