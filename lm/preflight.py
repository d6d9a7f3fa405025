"""Compile a run's train step for its mesh and report its size, before any data is read.

    python -m lm.train --config=configs/llama_1b.py --preflight [--memory_budget_gib=80]

Reports parameters, FLOPs per step (the PaLM formula of lm/flops.py) and the compiled step's memory
per device (XLA's memory analysis: arguments + outputs + temporaries - donated aliases), and fails
when that exceeds the budget: the flag, else the device's own memory limit where JAX reports one.
"""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from lm import flops, sharding, step
from lm import tokenizer as tokenizers
from lm.config import ConfigError, validate
from lm.metrics import console
from lm.model import ModelConfig, Transformer


def _tokenizer_vocab(config: ConfigDict) -> int:
    kind = config.data.tokenizer
    if config.model.vocab_size:
        return config.model.vocab_size
    if kind == "byte":
        return tokenizers.ByteTokenizer.vocab_size
    if kind.startswith("train:"):
        return int(kind.split(":")[1])
    if kind.endswith(".model"):
        return tokenizers.SentencePieceTokenizer.from_file(kind).vocab_size
    if kind.endswith(".json"):  # lm's tokenizer.json or a HuggingFace one
        return tokenizers.load(kind).vocab_size
    raise ConfigError("a character vocabulary is known only after reading the data; set "
                      "config.model.vocab_size for the preflight")


def preflight(config: ConfigDict, memory_budget_gib: float = 0.0) -> dict:
    validate(config)
    mesh = sharding.make_mesh(config)
    cfg = ModelConfig.for_run(config, _tokenizer_vocab(config), mesh.shape["tensor"])
    t = config.train
    steps = step.compile_run(config, Transformer(cfg), mesh)
    params = sum(x.size for x in jax.tree.leaves(steps.abstract_state.model_params()))
    memory = (steps.memory_bytes_per_device or 0) / 2 ** 30
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2 ** 30
    budget = memory_budget_gib or limit
    report = {"parameters": params, "flops_per_step": flops.train_flops_per_token(cfg)
              * t.batch_size * cfg.context_length, "memory_gib_per_device": memory,
              "memory_budget_gib": budget or None, "compile_seconds": steps.compile_seconds,
              "mesh": dict(mesh.shape)}
    console(f"preflight: {params:,} parameters; {report['flops_per_step']:.3e} FLOPs per step; "
            f"mesh {dict(mesh.shape)} of {mesh.devices.flat[0].device_kind}; train step compiled in "
            f"{steps.compile_seconds:.1f}s, ~{memory:,.2f} GiB per device"
            + (f" of a {budget:,.1f} GiB budget" if budget else ""))
    if budget and memory > budget:
        raise ConfigError(f"the train step needs ~{memory:,.2f} GiB per device, over the "
                          f"{budget:,.1f} GiB budget; add fsdp devices, set "
                          f"config.model.remat_policy, or lower config.train.batch_size (with "
                          f"config.optim.grad_accum_steps to keep the global batch)")
    return report
