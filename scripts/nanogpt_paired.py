"""lm against an independent PyTorch nanoGPT, step for step: the same initial weights, the same
batches, so that any difference is a difference of the two implementations.

    python scripts/nanogpt_paired.py                     # configs/shakespeare_char.py, 2000 steps
    python scripts/nanogpt_paired.py --config.train.steps=200 --config.seed=1

The reference is nanoGPT's model written in PyTorch (its `GPT`: fused q/k/v projection, `sdpa`
causal attention, bias-free LayerNorm, exact GELU, tied head) and its training loop (`AdamW` with
2-D weights decayed, `clip_grad_norm_`, the learning rate set before each step). Its learning
rate comes from its own formula, not from optax. lm's initial weights are copied into it, then
both train on lm's batches. Every `train.log_every` steps it prints both losses; at the end, both
validation losses over the split's windows and the largest loss difference seen.

Only a nanoGPT-shaped config can be paired: LayerNorm, learned positions, tied embeddings, GELU,
no biases, multi-head attention, no dropout (the two would draw different masks), no z-loss, one
micro-batch. Needs `torch` (the test extra installs it).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lm import data, optim, prepare, sharding, step  # noqa: E402
from lm.config import ConfigError, load_config_flag, parse_flags, validate  # noqa: E402
from lm.model import ModelConfig, Transformer  # noqa: E402

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError:
    sys.exit("error: the reference needs PyTorch; pip install -e '.[test]'")


def check_pairable(config: ConfigDict) -> None:
    """A one-line ConfigError for a config whose model or training nanoGPT's code cannot run."""
    m = config.model
    wanted = {"norm": "layernorm", "position": "learned", "tie_embeddings": True, "use_bias": False,
              "dropout": 0.0, "num_kv_heads": 0, "dtype": "float32", "param_dtype": "float32"}
    for field, value in wanted.items():
        if m[field] != value and not (field == "num_kv_heads" and m[field] == m.num_heads):
            raise ConfigError(f"config.model.{field}={m[field]!r}: nanoGPT's model has "
                              f"{value!r}; set --config.model.{field}={value}")
    if m.mlp not in ("gelu", "gelu_exact"):
        raise ConfigError(f"config.model.mlp={m.mlp!r}: nanoGPT's MLP is a GELU; set "
                          f"--config.model.mlp=gelu_exact")
    for field, value in (("train.z_loss", 0.0), ("optim.grad_accum_steps", 1),
                         ("data.segment_documents", False)):
        section, name = field.split(".")
        if config[section][name] != value:
            raise ConfigError(f"config.{field}={config[section][name]!r}: the reference has no "
                              f"such option; set --config.{field}={value}")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.heads, self.tanh = cfg.num_heads, cfg.mlp == "gelu"
        self.ln_1, self.ln_2 = (nn.LayerNorm(d, eps=cfg.norm_eps, bias=False) for _ in range(2))
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.c_fc = nn.Linear(d, cfg.d_ff, bias=False)
        self.mlp_proj = nn.Linear(cfg.d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.c_attn(self.ln_1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh" if self.tanh else "none")
        return x + self.mlp_proj(h)


class NanoGPT(nn.Module):
    """nanoGPT's `GPT` for an lm ModelConfig; weights come from `load_lm_params`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vocab = cfg.vocab_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # the tied head
        return F.cross_entropy(logits.view(-1, self.vocab), targets.reshape(-1))


def load_lm_params(model: NanoGPT, params: dict[str, Any]) -> None:
    """Copy lm's (unboxed, host) parameters into the reference: kernels [in, out] become Linear
    weights [out, in]; q, k and v are stacked into one projection as nanoGPT's c_attn holds them."""
    d = model.wte.weight.shape[1]
    state = {"wte.weight": params["embed"], "wpe.weight": params["pos_embed"],
             "ln_f.weight": params["final_norm"]["scale"]}
    for i in range(len(model.h)):
        layer = (jax.tree.map(lambda x: x[i], params["layers"]) if "layers" in params
                 else params[f"layers_{i}"])  # scanned layers are stacked on a leading axis
        attn = layer["attn"]
        state |= {
            f"h.{i}.ln_1.weight": layer["attn_norm"]["scale"],
            f"h.{i}.ln_2.weight": layer["mlp_norm"]["scale"],
            f"h.{i}.c_attn.weight": np.concatenate(
                [np.reshape(attn[n]["kernel"], (d, d)).T for n in ("query", "key", "value")]),
            f"h.{i}.attn_proj.weight": np.reshape(attn["out"]["kernel"], (d, d)).T,
            f"h.{i}.c_fc.weight": np.asarray(layer["mlp"]["up"]["kernel"]).T,
            f"h.{i}.mlp_proj.weight": np.asarray(layer["mlp"]["down"]["kernel"]).T}
    model.load_state_dict({k: torch.tensor(np.array(v)) for k, v in state.items()}, strict=True)


def nanogpt_optimizer(model: NanoGPT, config: ConfigDict) -> torch.optim.Optimizer:
    """nanoGPT's configure_optimizers: every tensor of 2 or more dimensions decays (embeddings
    only with optim.decay_embeddings, nanoGPT's choice), norms do not."""
    o = config.optim
    embeddings = (model.wte.weight, model.wpe.weight)

    def decays(p: torch.Tensor) -> bool:
        return p.dim() >= 2 and (o.decay_embeddings or all(p is not e for e in embeddings))
    decay = [p for p in model.parameters() if decays(p)]
    rest = [p for p in model.parameters() if not decays(p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, fused=False)


def nanogpt_learning_rate(step_index: int, config: ConfigDict) -> float:
    """The rate of update `step_index` (from 0): linear warmup from 0, then cosine to the floor."""
    o = config.optim
    if step_index < o.warmup_steps:
        return o.learning_rate * step_index / o.warmup_steps
    decay_steps = (o.decay_steps or config.train.steps) - o.warmup_steps
    ratio = min((step_index - o.warmup_steps) / decay_steps, 1.0)
    return o.min_learning_rate + 0.5 * (1 + math.cos(math.pi * ratio)) * (
        o.learning_rate - o.min_learning_rate)


def reference_step(model: NanoGPT, optimizer: torch.optim.Optimizer, learning_rate: float,
                   grad_clip: float, batch: data.Batch) -> tuple[float, float]:
    """nanoGPT's loop body for one batch: (loss, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    loss = model(*(torch.from_numpy(batch[k].astype(np.int64)) for k in ("inputs", "targets")))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else math.inf)
    optimizer.step()
    return loss.item(), norm.item()


def reference_loss(model: NanoGPT, batches: Iterable[data.Batch]) -> float:
    """Mean token loss over `batches` (every position scored)."""
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            inputs, targets = (torch.from_numpy(batch[k].astype(np.int64))
                               for k in ("inputs", "targets"))
            total += model(inputs, targets).item() * targets.numel()
            count += targets.numel()
    return total / count


def lm_loss(steps: step.CompiledSteps, params: Any, mesh: jax.sharding.Mesh,
            batches: list[data.Batch], rows: int) -> float:
    """Mean token loss of lm's eval step over `batches`."""
    nll = tokens = 0.0
    for batch in batches:
        metrics = steps.eval(params, sharding.global_batch(mesh, batch, rows))
        nll, tokens = nll + float(metrics["nll"]), tokens + float(metrics["tokens"])
    return nll / tokens


def paired_run(config: ConfigDict, workdir: Path) -> dict[str, Any]:
    """Train lm and the reference side by side on `config`'s data (prepared into `workdir`).

    Returns each step's `losses` and `grad_norms` ([steps, 2]: lm, nanoGPT), both validation losses,
    lm's final parameters (on the host) and the trained reference model.
    """
    validate(config)
    check_pairable(config)
    prepared = prepare.prepared_data(config.data, config.seed, workdir)
    mesh = sharding.make_mesh(config)
    cfg = ModelConfig.for_run(config, prepared.tokenizer.vocab_size, mesh.shape["tensor"])
    t = config.train
    steps = step.compile_steps(Transformer(cfg), optim.make_optimizer(config.optim, t.steps),
                               optim.learning_rate_schedule(config.optim, t.steps), mesh,
                               seed=config.seed, batch_size=t.batch_size)
    state = steps.init()
    reference = NanoGPT(cfg)
    load_lm_params(reference, jax.device_get(state.params))
    optimizer = nanogpt_optimizer(reference, config)

    train = data.train_batches(prepared.train, cfg.context_length, t.batch_size, config.seed)
    val = data.eval_batches(prepared.val, cfg.context_length, t.batch_size,
                            t.final_eval_batches or t.eval_batches)
    losses, grad_norms = np.zeros((t.steps, 2)), np.zeros((t.steps, 2))
    start = time.perf_counter()
    for i in range(t.steps):
        batch = next(train)
        state, metrics = steps.train(state, sharding.global_batch(mesh, batch, t.batch_size))
        losses[i, 1], grad_norms[i, 1] = reference_step(
            reference, optimizer, nanogpt_learning_rate(i, config), config.optim.grad_clip, batch)
        losses[i, 0], grad_norms[i, 0] = float(metrics["loss"]), float(metrics["grad_norm"])
        if (i + 1) % t.log_every == 0 or i + 1 == t.steps:
            print(f"step {i + 1}: loss lm {losses[i, 0]:.6f} nanoGPT {losses[i, 1]:.6f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    return {"losses": losses, "grad_norms": grad_norms,
            "val_lm": lm_loss(steps, state.params, mesh, val, t.batch_size),
            "val_nanogpt": reference_loss(reference, val),
            "val_tokens": sum(b["targets"].size for b in val),
            "lm_params": jax.device_get(state.params), "reference": reference}


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # JAX's backend probing is noise to a user
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = load_config_flag(_CONFIG)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            result = paired_run(config, Path(workdir))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    gap = np.abs(result["losses"][:, 0] - result["losses"][:, 1])
    print(f"train loss |lm - nanoGPT|: largest {gap.max():.2e} (step {gap.argmax() + 1}), "
          f"mean {gap.mean():.2e} over {len(gap)} steps")
    print(f"val loss over {result['val_tokens']:,} tokens: lm {result['val_lm']:.5f}, "
          f"nanoGPT {result['val_nanogpt']:.5f}")


if __name__ == "__main__":
    # Defined here, not on import: the tests import this module beside lm.train's own --config.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", str(ROOT / "configs/shakespeare_char.py"), "A nanoGPT-shaped run config.")
    app.run(main, flags_parser=parse_flags)
