"""What every process of a job must decide alike: when to stop, when to save, what to restore.

A decision that differs between processes (one saves step 7, another step 8; one restores step 20,
another falls back to step 10) hangs the job in its next collective or silently splits the run in
two. So a decision is taken once, by process 0 (or from every process's report, gathered to
all), and followed by all. In a single process all of this is local and costs nothing.

- Preemption: SIGTERM may reach the hosts a step or more apart. Multi-process, JAX's preemption
  service (`jax.distributed` installs its SIGTERM handler) agrees on the step after the latest any
  process has reached; `multihost_utils.reached_preemption_sync_point(step)` is then true at that
  step on every process, and false at all others. It is a local check every step; the agreement
  only runs once a notice arrives, over the coordination service, not the devices.
- Saves by wall time: process 0's clock decides. Its flag travels in a tiny collective dispatched
  after a step and read one step later, once that step is done, so it never makes the loop wait;
  and only about once a second (`_Process0Clock`), since each exchange names the step of the next.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def broadcast(value: int) -> int:
    """Process 0's `value`, on every process."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def gather(value: int) -> list[int]:
    """Every process's `value`, in process order, on every process."""
    if jax.process_count() == 1:
        return [value]
    return [int(v) for v in multihost_utils.process_allgather(np.int64(value))]


def _catch_sigterm() -> tuple[threading.Event, Callable[[], None]]:
    """An event set by SIGTERM (the preemption notice), and a function restoring the old handler."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return event, lambda: None
    previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    return event, lambda: signal.signal(signal.SIGTERM, previous)


class _Process0Clock:
    """Process 0's wall-clock save decisions, on every process at the same step.

    A tiny max-reduction over all devices carries process 0's (save now, steps to the next
    exchange); the others add zeros. It is dispatched after a step and read at the next one, once
    that step is done, so the loop never waits for it; and it runs about once every
    `EXCHANGE_SECONDS`, whatever a step takes, since each exchange names the step of the next.
    """

    EXCHANGE_SECONDS = 1.0

    def __init__(self, interval_seconds: float):
        mesh = Mesh(np.array(jax.devices()), ("devices",))
        self._sharding = NamedSharding(mesh, P("devices"))
        self._max = jax.jit(lambda x: x.max(axis=0), out_shardings=NamedSharding(mesh, P()))
        self._interval, self._last_save = interval_seconds, time.monotonic()
        self._pending, self._next, self._last_exchange = None, None, None

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether every process saves at `step`; call it at every step, on every process."""
        save = False
        if self._pending is not None:  # dispatched at the previous step, which is done
            save, gap = (int(v) for v in np.asarray(self._pending))
            self._pending, self._next = None, step - 1 + gap
        if self._next is None or step == self._next:
            self._pending = self._exchange(self._payload(step))
        return bool(save)

    def _payload(self, step: int) -> tuple[int, int]:
        """Process 0's (save at the next step, steps from this exchange to the next)."""
        if jax.process_index() != 0:
            return 0, 0
        now, gap = time.monotonic(), 1
        if self._last_exchange is not None:  # as many steps as took EXCHANGE_SECONDS lately
            steps, seconds = step - self._last_exchange[0], now - self._last_exchange[1]
            gap = min(max(round(self.EXCHANGE_SECONDS * steps / max(seconds, 1e-6)), 1), 10_000)
        self._last_exchange = (step, now)
        due = now - self._last_save >= self._interval
        if due:  # the save follows at the next step: count from here
            self._last_save = now
        return int(due), gap

    def _exchange(self, payload: tuple[int, int]) -> jax.Array:
        local = np.tile(np.array(payload, np.int32), (jax.local_device_count(), 1))
        return self._max(jax.make_array_from_process_local_data(
            self._sharding, local, (jax.device_count(), 2)))


class StepDecisions:
    """Per training step: stop here (a preemption notice reached some process), and save here
    (process 0's wall clock says `save_every_seconds` have passed since the last save)."""

    def __init__(self, save_every_seconds: float = 0.0):
        self._multi = jax.process_count() > 1
        # Multi-process, JAX's handler catches SIGTERM; a Python handler would replace it.
        self._sigterm, self._restore_handler = (threading.Event(), lambda: None) if self._multi \
            else _catch_sigterm()
        self._interval = save_every_seconds
        self._last_save = time.monotonic()
        self._clock = _Process0Clock(save_every_seconds) if self._multi and save_every_seconds \
            else None

    def stop(self, step: int) -> bool:
        """Whether every process stops after `step`; call it at every step, on every process."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._sigterm.is_set()

    def save_due(self, step: int) -> bool:
        """Whether every process saves at `step` for wall time; call it at every step."""
        if self._clock:
            return self._clock.due(step)
        due = bool(self._interval) and time.monotonic() - self._last_save >= self._interval
        if due:
            self._last_save = time.monotonic()
        return due

    def saved(self) -> None:
        """A save happened (for any reason): the wall-time interval restarts."""
        self._last_save = time.monotonic()
        if self._clock:
            self._clock.saved()

    def close(self) -> None:
        self._restore_handler()
