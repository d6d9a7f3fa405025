"""The device mesh and the one table that decides how every named axis is split across it.

The model only names axes ("embed", "heads", "act_batch", ...). `LOGICAL_AXIS_RULES` maps those names
to the mesh axes `data`, `fsdp` and `tensor`, so changing the parallelism is a config change:
- data:   batch split, parameters replicated (plain data parallelism);
- fsdp:   batch split and parameters split along `embed` (ZeRO-3 style, gathered per layer);
- tensor: heads, MLP width and vocabulary split (Megatron style), activations split to match.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from lm.config import MESH_AXES, ConfigError, mesh_shapes

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("positions", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), sized from config.mesh.

    Axes are Auto: linen's logical constraints are sharding hints, which Explicit axes reject.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shapes(config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 3
    if dcn == (1, 1, 1):
        return jax.make_mesh(ici, MESH_AXES, axis_types=auto, devices=devices)
    # A slice is a TPU slice on TPUs and a process (host) elsewhere.
    by_process = devices[0].platform != "tpu"
    slices = len({d.process_index if by_process else d.slice_index for d in devices})
    if slices != dcn[0] * dcn[1]:
        raise ConfigError(f"config.mesh.dcn_data*dcn_fsdp={dcn[0] * dcn[1]} must equal the number "
                          f"of {'processes' if by_process else 'TPU slices'} ({slices})")
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_sharding(mesh: Mesh, logical_axes: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES))


def tree_shardings(mesh: Mesh, boxed_tree: Any) -> Any:
    """Shardings for a tree of `nn.Partitioned` boxes (or shapes of them) from their axis names."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def split_axes(logical: str, size: int) -> tuple[str, ...] | None:
    """The axes of the current mesh (`jax.set_mesh`, read while tracing) that split a dimension of
    `size` named `logical`: None without a mesh, where those axes all have size 1, or where they do
    not divide `size` (the dimension then stays whole). For code that splits by hand (shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    rule = dict(LOGICAL_AXIS_RULES).get(logical)
    names = (rule,) if isinstance(rule, str) else tuple(rule or ())
    names = tuple(n for n in names if not mesh.empty and n in mesh.axis_names and mesh.shape[n] > 1)
    return names if names and size % math.prod(mesh.shape[n] for n in names) == 0 else None


def shards(logical: str, size: int) -> int:
    """How many pieces the current mesh splits a dimension of `size` named `logical` into."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[n] for n in split_axes(logical, size) or ())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return logical_sharding(mesh, ("act_batch", "act_length"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local: dict[str, np.ndarray], global_rows: int) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the batch axes of the mesh."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:  # the whole batch is local: a plain put is several times faster
        return jax.device_put(local, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
            for k, v in local.items()}
