"""FLOP counts and hardware peaks for MFU.

Convention (PaLM, appendix B): training FLOPs per token = 6 * N + 12 * L * T * d, where N counts the
weights used in matrix multiplies (the output head included, the embedding lookup not) and the second
term is attention's QK^T and AV over the full context (the masked half is computed, so it counts).
XLA's cost analysis counts a scanned layer once, so it cannot serve a scanned model; the formula can.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from lm import lora
from lm.model import ModelConfig

# Dense bf16 peak per chip, in FLOP/s, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    attention = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    return cfg.num_layers * (attention + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig) -> float:
    """With LoRA adapters, a frozen weight is used forward and for its input's gradient (4 FLOPs a
    token) but gets no gradient of its own; the adapters count 6 like any trained weight."""
    attention = 12.0 * cfg.num_layers * cfg.context_length * cfg.d_model
    if cfg.lora_rank:
        return 4.0 * matmul_params(cfg) + 6.0 * lora.adapter_parameters(cfg) + attention
    return 6.0 * matmul_params(cfg) + attention


def measured_matmul_flops(size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a float32 matmul through XLA on the first device: the CPU's practical peak."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def peak_flops(devices: list[jax.Device], per_device: float = 0.0) -> float | None:
    """The whole mesh's peak FLOP/s: given, from the table, or measured; None if unknown.

    Virtual CPU devices share one host's cores, so on CPU the peak is the host's, whatever the count.
    """
    chips = 1 if devices[0].platform == "cpu" else len(devices)
    if per_device:
        return per_device * chips
    if devices[0].platform == "cpu":
        return measured_matmul_flops()
    kind = devices[0].device_kind
    key = max((k for k in PEAK_FLOPS if kind.startswith(k)), key=len, default=None)
    return PEAK_FLOPS[key] * chips if key else None
