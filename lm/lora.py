"""LoRA: low-rank adapters trained on a frozen base model (`config.lora`).

An adapter is a pair of parameters of a Dense layer (lm/model.py): `lora_a` [inputs..., rank] and
`lora_b` [rank, outputs...], whose product, times alpha/rank, adds to the layer's frozen kernel.
A run differentiates and optimizes the adapters alone: the train state holds them as its `params`
(with their optimizer state, and nothing for the base) and the base as `frozen`, restored from
`train.init_from` (lm/lora_base.py). Checkpoints hold the adapters. For sampling and export the
adapters are merged into the kernels once (`merge`), leaving a plain model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from lm.model import ModelConfig

ADAPTERS = ("lora_a", "lora_b")


def _is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTERS


def split(params: Any) -> tuple[dict, dict]:
    """(the adapters, the rest: the base) of a parameter tree, each keeping the tree's nesting."""
    flat = traverse_util.flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if _is_adapter(k)}
    base = {k: v for k, v in flat.items() if not _is_adapter(k)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def combine(adapters: Any, base: Any | None) -> Any:
    """The model's whole parameter tree from `split`'s parts (`adapters` alone when base is None)."""
    if base is None:
        return adapters
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base),
                                         **traverse_util.flatten_dict(adapters)})


def _merged_kernel(layer: dict, scale: float) -> jax.Array:
    """kernel + scale * A B, computed in float32 and stored in the kernel's dtype. A scanned stack
    has a leading layers axis on all three."""
    kernel, a, b = layer["kernel"], layer["lora_a"], layer["lora_b"]
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    rank = a.shape[-1]
    a2 = a.reshape(*a.shape[:lead], -1, rank).astype(jnp.float32)
    b2 = b.reshape(*b.shape[:lead], rank, -1).astype(jnp.float32)
    delta = jnp.matmul(a2, b2).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def plain(cfg: ModelConfig) -> ModelConfig:
    """The model without adapters."""
    return dataclasses.replace(cfg, lora_rank=0, lora_targets=())


def merge(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """(the same model without adapters, its parameters with each adapter added to its kernel), as
    PEFT's merge_and_unload does: one plain product per layer where there were two."""
    if not cfg.lora_rank:
        return cfg, params
    scale = cfg.lora_alpha / cfg.lora_rank

    def walk(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "lora_a" in node:
            rest = {k: v for k, v in node.items() if k not in ADAPTERS}
            return {**rest, "kernel": _merged_kernel(node, scale)}
        return {k: walk(v) for k, v in node.items()}
    return plain(cfg), walk(dict(params))


def adapter_parameters(cfg: ModelConfig) -> int:
    """How many adapter parameters the model has (rank * (fan-in + fan-out) per adapted layer)."""
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.d_ff
    sizes = {"query": (d, cfg.num_heads * hd), "key": (d, cfg.num_kv_heads * hd),
             "value": (d, cfg.num_kv_heads * hd), "out": (cfg.num_heads * hd, d),
             "gate": (d, ff) if cfg.mlp == "swiglu" else (0, 0), "up": (d, ff), "down": (ff, d)}
    per_layer = sum(sum(sizes[t]) for t in cfg.lora_targets)
    return cfg.lora_rank * per_layer * cfg.num_layers
