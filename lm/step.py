"""The train state and the pure step functions, compiled with explicit shardings over the mesh.

A batch is a dict of [batch, length] arrays: `inputs` and `targets` (token ids) and `mask` (loss
weight per position: 0 on padding, or where the target is a prompt token when fine-tuning on
completions); with packed documents also `segment_ids` and `positions` (attention stays within a
segment, positions restart at each).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh
from ml_collections import ConfigDict

from lm import lora, optim, sharding
from lm.model import Transformer

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """`params` are what trains (all weights, or a LoRA run's adapters), `opt_state` their
    optimizer state; `frozen` is a LoRA run's base (None otherwise), never differentiated."""
    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = None

    def model_params(self) -> Any:
        """The model's whole parameter tree."""
        return lora.combine(self.params, self.frozen)


def loss_sums(params: Any, model: Transformer, batch: Batch, z_loss: float,
              dropout_rng: jax.Array | None, train: bool = True
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(objective summed over positions, (summed nll, number of scored positions)).

    Sums rather than means, so that micro-batches add up to exactly the full batch's gradient.
    The model makes its logits a chunk of positions at a time where they are large (`train`: for a
    gradient, where whole logits stay faster up to a larger size; see lm/model.py: loss_chunk).
    """
    nll, log_z = model.apply(
        {"params": params}, batch["inputs"], positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"), deterministic=dropout_rng is None,
        targets=batch["targets"], train=train,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng})
    weights = batch["mask"].astype(jnp.float32)
    nll = jnp.sum(nll * weights)
    return nll + z_loss * jnp.sum(jnp.square(log_z) * weights), (nll, jnp.sum(weights))


def _micro_batches(batch: Batch, k: int) -> Batch:
    # Micro-batch j takes rows j, j+k, ...: every device keeps its share of every micro-batch.
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "act_batch", "act_length"))
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: Batch, *, model: Transformer,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, z_loss: float,
               grad_accum_steps: int, dropout_seed: int | None, skip_nonfinite: bool = False
               ) -> tuple[TrainState, Metrics]:
    """One optimizer update on the global batch, accumulated over `grad_accum_steps` micro-batches.

    `metrics["nonfinite"]` is 1 when the loss or the gradient is NaN/inf; with `skip_nonfinite` such
    an update is dropped (the step count still advances, so the data moves on, and the learning
    rate is always the schedule's at the step). A batch with no scored position has loss and
    gradient 0 and counts 0 tokens.
    """
    # Only `params` are differentiated: a LoRA run computes no gradient for its frozen base.
    grad_fn = jax.value_and_grad(
        lambda params, *args: loss_sums(lora.combine(params, state.frozen), *args), has_aux=True)

    def accumulate(carry, micro):
        index, micro_batch = micro
        rng = None
        if dropout_seed is not None:
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), state.step),
                                     index)
        (_, (nll, count)), grads = grad_fn(state.params, model, micro_batch, z_loss, rng)
        return jax.tree.map(jnp.add, carry, (grads, nll, count)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
    micro = (jnp.arange(grad_accum_steps), _micro_batches(batch, grad_accum_steps))
    (grad_sum, nll_sum, count), _ = jax.lax.scan(accumulate, zeros, micro)
    scored = jnp.where(count > 0, count, 1.0)  # nothing scored: sums of 0 over 1, not 0/0
    grads = jax.tree.map(lambda g: g / scored, grad_sum)

    updates, opt_state = optimizer.update(grads, optim.at_step(state.opt_state, state.step),
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    loss, grad_norm = nll_sum / scored, optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "tokens": count, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, model: Transformer) -> Metrics:
    _, (nll, count) = loss_sums(params, model, batch, 0.0, None, train=False)
    return {"nll": nll, "tokens": count}


@dataclasses.dataclass
class CompiledSteps:
    """The jitted, sharded functions of one run, compiled ahead of time for its batch shape."""
    init: Callable[[], TrainState]  # a LoRA run's state without its base (`frozen`)
    train: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    eval: Callable[[Any, Batch], Metrics]  # of the model's whole parameters (model_params())
    state_sharding: Any
    abstract_state: TrainState  # shapes, dtypes and shardings: the target for restoring
    compile_seconds: float
    memory_bytes_per_device: int | None


def _abstract_batch(mesh: Mesh, batch_size: int, length: int, segments: bool) -> Batch:
    spec = jax.ShapeDtypeStruct((batch_size, length), jnp.int32,
                                sharding=sharding.batch_sharding(mesh))
    batch = {"inputs": spec, "targets": spec,
             "mask": jax.ShapeDtypeStruct(spec.shape, jnp.float32, sharding=spec.sharding)}
    if segments:
        batch.update(segment_ids=spec, positions=spec)
    return batch


# XLA:CPU hands its dots, and the elementwise work it fuses around them, to YNNPACK by default,
# materialising broadcasts (a norm's scale, a softmax's sum) at full size as that library's inputs.
# With its own (Eigen) dots instead, the train steps of the Shakespeare models were faster (and
# GPT-2's no slower) in interleaved runs, for a slightly longer compile. The evaluation forward was
# no faster, so only the train step asks for it (docs/benchmarks.md).
CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _compile(lowered: jax.stages.Lowered, options: dict[str, Any]) -> jax.stages.Compiled:
    try:
        return lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as error:
        if not any(name in str(error) for name in options):
            raise
        return lowered.compile()  # an XLA that has dropped the experimental option: its defaults


def compile_steps(model: Transformer, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule, mesh: Mesh, *, seed: int, batch_size: int,
                  z_loss: float = 0.0, grad_accum_steps: int = 1,
                  skip_nonfinite: bool = False, segments: bool = False) -> CompiledSteps:
    """Compile init/train/eval for `mesh`. The state is created directly sharded, never whole.

    `segments`: batches carry `segment_ids` and `positions` (config.data.segment_documents).
    """
    length = model.cfg.context_length
    batch = _abstract_batch(mesh, batch_size, length, segments)

    adapters = model.cfg.lora_rank > 0

    def init() -> TrainState:
        boxed = model.init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32))["params"]
        params, frozen = lora.split(boxed) if adapters else (boxed, None)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), frozen=frozen)

    state_sharding = sharding.tree_shardings(mesh, jax.eval_shape(init))
    dropout = model.cfg.dropout > 0 or model.cfg.lora_dropout > 0
    train = functools.partial(
        train_step, model=model, optimizer=optimizer, schedule=schedule, z_loss=z_loss,
        grad_accum_steps=grad_accum_steps, dropout_seed=seed if dropout else None,
        skip_nonfinite=skip_nonfinite)
    evaluate = functools.partial(eval_step, model=model)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        whole = jax.jit(lambda: nn.unbox(init()), out_shardings=state_sharding)
        state_shape = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   jax.eval_shape(whole), state_sharding)
        # A LoRA run's base comes from its checkpoint (lm/lora_base.py): the initializer leaves it
        # out, and XLA drops its random draw.
        init_jit = jax.jit(lambda: nn.unbox(init()).replace(frozen=None),
                           out_shardings=state_sharding.replace(frozen=None))
        # It runs once: LLVM's O1 compiles it in well under O2's time on a CPU, to the same values
        # (one threefry program per parameter; docs/scaling.md).
        cpu = mesh.devices.flat[0].platform == "cpu"
        init_fn = init_jit.lower().compile(
            compiler_options={"xla_backend_optimization_level": 1} if cpu else None)
        start = time.perf_counter()
        train_fn = _compile(
            jax.jit(train, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                    out_shardings=(state_sharding, sharding.replicated(mesh)),
                    donate_argnums=0).lower(state_shape, batch),
            CPU_TRAIN_OPTIONS if cpu else {})
        compile_seconds = time.perf_counter() - start
        eval_fn = jax.jit(evaluate, in_shardings=(state_sharding.model_params(),
                                                  sharding.batch_sharding(mesh)),
                          out_shardings=sharding.replicated(mesh)
                          ).lower(state_shape.model_params(), batch).compile()
    memory = train_fn.memory_analysis()
    return CompiledSteps(
        init=init_fn, train=train_fn, eval=eval_fn, state_sharding=state_sharding,
        abstract_state=state_shape,
        compile_seconds=compile_seconds,
        memory_bytes_per_device=None if memory is None else (
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes))


def compile_run(config: ConfigDict, model: Transformer, mesh: Mesh) -> CompiledSteps:
    """The steps a run of `config` trains with: its optimizer and schedule, batch, accumulation,
    document packing and non-finite skipping (what `lm.train` runs and `--preflight` measures)."""
    t = config.train
    return compile_steps(
        model, optim.make_optimizer(config.optim, t.steps),
        optim.learning_rate_schedule(config.optim, t.steps), mesh, seed=config.seed,
        batch_size=t.batch_size, z_loss=t.z_loss, grad_accum_steps=config.optim.grad_accum_steps,
        skip_nonfinite=t.skip_nonfinite, segments=config.data.segment_documents)
