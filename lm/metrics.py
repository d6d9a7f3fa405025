"""Where a run reports: the console (process 0), `metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm


def console(message: str) -> None:
    """Print on process 0 without breaking an active progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


class MetricsWriter:
    """One JSON object per record in `metrics.jsonl`, the same scalars in TensorBoard."""

    def __init__(self, workdir: Path):
        self._enabled = jax.process_index() == 0
        if self._enabled:
            from tensorboardX import SummaryWriter  # no TensorFlow needed

            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")
            self._tensorboard = SummaryWriter(str(workdir))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self._enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


def format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for name, value in metrics.items():
        if name in ("tokens_per_sec", "tokens"):
            parts.append(f"{name} {value:,.0f}")
        elif name == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        else:
            parts.append(f"{name} {value:.4g}")
    return "  ".join(parts)
