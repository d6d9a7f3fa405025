"""The optimizer: AdamW with warmup and decay to a floor, global-norm clipping, a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict


def learning_rate_schedule(optim: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine or linear decay to `min_learning_rate`."""
    peak, floor, warmup = optim.learning_rate, optim.min_learning_rate, optim.warmup_steps
    decay_steps = max((optim.decay_steps or total_steps) - warmup, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak if peak else 0.0)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def at_step(opt_state: Any, step: jax.Array) -> Any:
    """`opt_state` with its learning-rate schedule's count set to the train state's `step`.

    The step is a run's one counter: an update skipped as non-finite keeps the optimizer state as
    it was (the schedule's count too) while the step, and the data, move on; so the schedule is
    read at the step, and the learning rate applied is the one logged for it.
    """
    def set_count(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(step, node.count.dtype))
        return node
    return jax.tree.map(set_count, opt_state,
                        is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState))


def weight_decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """Decay matrices only (LoRA's adapters too): not norms or biases, and embeddings only when
    asked."""
    def decays(path, _) -> bool:
        # The parameter's name is the last dict key (a boxed leaf adds a `.value` after it).
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return (name in ("kernel", "lora_a", "lora_b")
                or (decay_embeddings and name in ("embed", "pos_embed")))
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ConfigDict, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2,
                        eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=lambda p: weight_decay_mask(p, optim.decay_embeddings))
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return adamw
