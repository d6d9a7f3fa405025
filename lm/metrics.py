"""Where a run reports: the console (process 0), `metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
from tqdm import tqdm

from lm import fs
from lm.config import ConfigError


def console(message: str) -> None:
    """Print on process 0 without breaking an active progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


class _EventFile:
    """A TensorBoard event file in a bucket, written through lm's filesystem layer: objects cannot
    be appended to, so each flush (tensorboardX's, every two minutes and at close) uploads the
    records so far whole."""

    def __init__(self, path: str):
        self.path, self._records = path, bytearray()
        self.error: ConfigError | None = None  # of the latest flush; MetricsWriter.close raises it

    def write(self, data: bytes) -> None:
        self._records += data

    def flush(self) -> None:
        """Upload the records so far. A failure is kept rather than raised: tensorboardX flushes
        from its own thread and again at exit, where it would print tracebacks (and, left
        unclosed, flush again); a later flush that succeeds uploads everything."""
        try:
            fs.write_bytes(self.path, bytes(self._records))
            self.error = None
        except ConfigError as e:
            self.error = e

    def close(self) -> None:
        self.flush()


class _EventFiles:
    """tensorboardX's writer factory interface, for gs:// and s3:// log directories (its own
    factories need google-cloud-storage, or boto3 and another endpoint variable)."""

    def __init__(self):
        self.opened: list[_EventFile] = []

    def open(self, path: str) -> _EventFile:
        self.opened.append(_EventFile(path))
        return self.opened[-1]

    def directory_check(self, path: str) -> None:
        fs.makedirs(path)


def import_tensorboardx():
    """tensorboardX (no TensorFlow needed), imported without PyTorch: tensorboardX imports torch
    wherever it is installed, for tensor types lm never passes, and that import is seconds of a
    run's start-up."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
    try:
        import tensorboardX
        import tensorboardX.record_writer
    finally:
        if block:
            del sys.modules["torch"]
    return tensorboardX


def _summary_writer(logdir: str, files: _EventFiles):
    tensorboardX = import_tensorboardx()
    for scheme in ("gs", "s3"):
        tensorboardX.record_writer.register_writer_factory(scheme, files)
    return tensorboardX.SummaryWriter(logdir)


class MetricsWriter:
    """One JSON object per record in `metrics.jsonl`, the same scalars in TensorBoard."""

    def __init__(self, workdir: str | os.PathLike):
        self._enabled = jax.process_index() == 0
        if self._enabled:
            self._jsonl = fs.AppendFile(fs.path(workdir) / "metrics.jsonl")
            self._event_files = _EventFiles()  # a bucket's; a local logdir needs none
            with fs.errors(workdir):
                self._tensorboard = _summary_writer(os.fspath(workdir), self._event_files)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self._enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._enabled:
            try:
                self._jsonl.close()
            finally:
                self._tensorboard.close()
            for events in self._event_files.opened:
                if events.error is not None:
                    raise events.error


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


class Reporter:
    """A run's progress: bar (on a terminal), console lines, metrics file; throughput and MFU."""

    def __init__(self, workdir: str | os.PathLike, start: int, total: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops: float | None):
        self.total, self.tokens_per_step = total, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.writer = MetricsWriter(workdir)
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                        disable=None if jax.process_index() == 0 else True)  # None: terminal only
        self._mark(start)

    def _mark(self, step: int) -> None:
        """Start a new throughput interval at `step` (after a pause such as evaluation)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def step(self) -> None:
        self.bar.update(1)

    def train(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds_per_step = (time.perf_counter() - self._last_time) / (step - self._last_step)
        metrics["tokens_per_sec"] = self.tokens_per_step / seconds_per_step
        if self.peak_flops:
            metrics["mfu"] = metrics["tokens_per_sec"] * self.flops_per_token / self.peak_flops
        self._mark(step)
        self.writer.write(step, metrics)
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_sec']:,.0f}")
        eta = time.strftime("%H:%M:%S", time.gmtime(seconds_per_step * (self.total - step)))
        console(f"step {step}/{self.total}  {format_metrics(metrics)}  eta {eta}")
        return metrics

    def eval(self, step: int, val_loss: float, tokens: int, baseline: float) -> None:
        self.writer.write(step, {"val_loss": val_loss, "val_tokens": tokens})
        console(f"step {step}/{self.total}  val_loss {val_loss:.4f} over {tokens:,} tokens  "
                f"(unigram baseline {baseline:.3f})")
        self._mark(step)  # evaluation time is not training throughput

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
