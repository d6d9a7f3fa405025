"""What the per-step agreement costs (lm/agreement.py: the preemption sync point, and process 0's
wall-clock save flag), on the baby Shakespeare step in two processes, data across them.

    python scripts/step_decisions_overhead.py            # ~2 minutes on 2 CPU cores

Each process drives one CPU device. Rounds alternate between the training loop's pattern without
the decisions (dispatch step i, wait for step i-1's metrics) and with them (the same, then
`StepDecisions.stop(i)` and `save_due(i)` with an interval never reached: process 0's clock is
still exchanged, about once a second); the medians of the per-step times and their ratio are
printed, and the time of the calls alone: stop(), and one exchange of the clock waited for.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_ROUNDS = flags.DEFINE_integer("rounds", 8, "Rounds of each kind, alternated.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per round.")
_PROCESS = flags.DEFINE_integer("process_id", -1, "Internal: this process's index.")
_PORT = flags.DEFINE_integer("port", 0, "Internal: the coordinator's port.")


def measure() -> None:
    import jax
    import numpy as np

    jax.config.update("jax_num_cpu_devices", 1)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{_PORT.value}", 2, _PROCESS.value)
    from configs import shakespeare_char
    from lm import agreement, optim, sharding, step
    from lm.model import ModelConfig, Transformer

    config = shakespeare_char.get_config()
    config.mesh.update(data=1, dcn_data=2)
    mesh = sharding.make_mesh(config)
    cfg = ModelConfig.from_config(config.model, 65)
    steps = step.compile_steps(Transformer(cfg), optim.make_optimizer(config.optim, 2000),
                               optim.learning_rate_schedule(config.optim, 2000), mesh, seed=0,
                               batch_size=12)
    rows, length = 12 // 2, cfg.context_length
    tokens = np.random.default_rng(_PROCESS.value).integers(0, 65, (rows, length + 1), np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "mask": np.ones((rows, length), np.float32)}
    state = steps.init()
    decisions = agreement.StepDecisions(save_every_seconds=1e9)
    counter = 0

    def run(with_decisions: bool) -> float:
        nonlocal state, counter
        pending, start = None, time.perf_counter()
        for _ in range(_STEPS.value):
            counter += 1
            state, metrics = steps.train(state, sharding.global_batch(mesh, local, 12))
            if pending is not None:
                float(jax.device_get(pending["nonfinite"]))
            pending = metrics
            if with_decisions:
                decisions.stop(counter)
                decisions.save_due(counter)
        jax.block_until_ready(pending)
        return (time.perf_counter() - start) / _STEPS.value

    run(False), run(True)  # warm up both
    times = {False: [], True: []}
    for r in range(_ROUNDS.value):
        for kind in ((False, True) if r % 2 == 0 else (True, False)):
            times[kind].append(run(kind))
    calls = 200
    start = time.perf_counter()
    for _ in range(calls):
        counter += 1
        decisions.stop(counter)
    stop_us = (time.perf_counter() - start) / calls * 1e6
    clock = decisions._clock  # noqa: SLF001  (its exchange alone, not its cadence)
    start = time.perf_counter()
    for _ in range(calls):
        np.asarray(clock._exchange((0, 0)))  # noqa: SLF001
    exchange_us = (time.perf_counter() - start) / calls * 1e6
    if _PROCESS.value == 0:
        plain, agreed = (statistics.median(times[k]) * 1e3 for k in (False, True))
        print(f"baby Shakespeare step, 2 processes x 1 CPU device, medians of {_ROUNDS.value} "
              f"rounds of {_STEPS.value} steps:\n  without the decisions {plain:.2f} ms/step\n"
              f"  with them             {agreed:.2f} ms/step ({agreed / plain - 1:+.1%})\n"
              f"  calls alone: stop() {stop_us:.1f} us; an exchange of process 0's clock, "
              f"waited for, {exchange_us:.0f} us (in the loop: about once a second, not waited "
              f"for)")
    decisions.close()


def main(argv: list[str]) -> None:
    del argv
    if _PROCESS.value >= 0:
        measure()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, f"--process_id={i}", f"--port={port}",
                               f"--rounds={_ROUNDS.value}", f"--steps={_STEPS.value}"],
                              cwd=ROOT, env={"JAX_PLATFORMS": "cpu", **os.environ},
                              stderr=subprocess.DEVNULL) for i in range(2)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    app.run(main)
