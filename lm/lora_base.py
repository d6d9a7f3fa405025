"""The base an adapter run belongs to: recorded at its start, checked whenever its adapters are used.

`lora_base.json` in an adapter run's workdir names the base's checkpoint step directory (resolved
from `train.init_from` when the run starts, so that later checkpoints of the base's own run do not
change it) and a fingerprint of the base's parameters. A resumed run, `lm.load` and `lm.hf export`
restore that step and refuse a base whose fingerprint differs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from lm import checkpoint, fs
from lm.config import ConfigError
from lm.lora import combine, split

BASE_RECORD = "lora_base.json"


@jax.jit
def _word_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    def one(x: jax.Array) -> jax.Array:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
        position = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
        return jnp.sum(words * (2 * position + 1))
    return [one(x) for x in leaves]


def fingerprint(params: Any) -> list[int]:
    """Per array: the sum of its bits as unsigned words times 1, 3, 5, ... by position, modulo
    2**32. Integer sums are exact in any order, so the mesh does not change it; any change within
    one word does."""
    return [int(v) for v in jax.device_get(_word_sums(jax.tree.leaves(params)))]


def _is_adapter_run(workdir: fs.Path) -> bool:
    saved = workdir / "config.json"
    return fs.is_file(saved) and json.loads(fs.read_text(saved)).get("lora", {}).get("rank", 0) > 0


def base_directory(workdir: str | os.PathLike, init_from: str) -> fs.Path:
    """The base's checkpoint step directory: the one the workdir's record names, or for a run
    without a record yet, `init_from`'s latest."""
    record = fs.path(workdir) / BASE_RECORD
    if fs.is_file(record):
        saved = json.loads(fs.read_text(record))
        if init_from and fs.absolute(init_from) != fs.absolute(saved["init_from"]):
            raise ConfigError(f"{workdir} trains adapters for the base {saved['init_from']}, not "
                              f"config.train.init_from={init_from}; use a new --workdir to adapt "
                              f"another base")
        return fs.path(saved["base"])
    if not init_from:
        raise ConfigError(f"{workdir} has LoRA adapters but neither a {BASE_RECORD} nor "
                          f"config.train.init_from naming their base")
    if _is_adapter_run(fs.absolute(init_from)):
        raise ConfigError(f"config.train.init_from={init_from} is itself a LoRA run, whose "
                          f"checkpoints hold adapters only; export it merged (python -m lm.hf "
                          f"export), import that, and adapt the import")
    return checkpoint.step_directory(init_from)


def restore_base(workdir: str | os.PathLike, init_from: str, abstract_base: Any,
                 record: bool = False) -> Any:
    """The frozen base of an adapter run, checked against the fingerprint its record holds; with
    `record` and no record yet (a run's first start), the record is written (by process 0)."""
    directory = base_directory(workdir, init_from)
    base = checkpoint.restore_params(directory, abstract_base)
    prints = fingerprint(base)
    path = fs.path(workdir) / BASE_RECORD
    if fs.is_file(path):
        if json.loads(fs.read_text(path))["fingerprint"] != prints:
            raise ConfigError(f"the base at {directory} is not the one this run's adapters were "
                              f"trained on (its parameters' fingerprint differs from "
                              f"{path}'s); restore that base, or start a new --workdir")
    elif record and jax.process_index() == 0:
        fs.write_text(path, json.dumps({"init_from": os.fspath(fs.absolute(init_from)),
                                        "base": os.fspath(directory), "fingerprint": prints},
                                       indent=2))
    return base


def restore(workdir: str | os.PathLike, init_from: str, step_dir: str | os.PathLike,
            abstract_params: Any) -> Any:
    """An adapter run's whole parameter tree (`abstract_params`, the model with adapters): its base,
    checked, and the adapters of checkpoint `step_dir`."""
    abstract_adapters, abstract_base = split(abstract_params)
    base = restore_base(workdir, init_from, abstract_base)
    return combine(checkpoint.restore_params(step_dir, abstract_adapters), base)
