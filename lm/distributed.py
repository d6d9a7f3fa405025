"""Multi-host runs on JAX's own distributed runtime (`jax.distributed`), never a home-made one.

Every process runs the same command. On a multi-host TPU slice, under SLURM, or under an MPI-style
launcher, JAX finds the coordinator itself; anywhere else pass `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`. Afterwards `jax.devices()` is every process's devices, each
process feeds only its own rows of the global batch, and process 0 alone writes logs and metrics.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
from absl import flags

from lm.config import ConfigError

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for a cluster JAX cannot detect.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "A process silent this long is taken for dead and the job "
    "stops, instead of the survivors waiting for it forever.")


def detected_cluster(env: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process launcher JAX can detect by itself, if this process runs under one."""
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        return "multi-host TPU"
    return None


def initialize() -> None:
    """Join the job described by the flags or the environment; a single process does nothing."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ConfigError("--coordinator_address, --num_processes and --process_id go together; "
                          "pass all three, or none to let JAX detect the cluster")
    if explicit[0] is None and detected_cluster() is None:
        return
    # Collectives between CPU devices of different processes (tests, CPU clusters) need gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*explicit, heartbeat_timeout_seconds=_HEARTBEAT.value)
