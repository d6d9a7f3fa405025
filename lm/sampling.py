"""Autoregressive sampling by full recomputation inside one jitted loop.

Each new token reruns the model over a fixed-size buffer (causality makes the unfilled tail
irrelevant). Simple and exact: it is also the reference that faster cached decoding is checked against.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import Transformer


def filter_logits(logits: jax.Array, valid_vocab: int, top_k: int) -> jax.Array:
    """Mask the vocabulary's padding ids, and all but the `top_k` largest logits when top_k > 0."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


def sample(model: Transformer, params: Any, prompt: np.ndarray, num_new: int, *, seed: int = 0,
           temperature: float = 1.0, top_k: int = 0, valid_vocab: int | None = None) -> np.ndarray:
    """Continue one prompt (1-D token ids) by up to `num_new` tokens; greedy when temperature is 0.

    The prompt keeps its last tokens if prompt plus continuation would not fit the context.
    """
    context = model.cfg.context_length
    num_new = min(num_new, context - 1)
    prompt = np.asarray(prompt, np.int32)[-(context - num_new):]
    start = len(prompt)
    valid_vocab = valid_vocab or model.cfg.vocab_size
    buffer = jnp.zeros((1, context), jnp.int32).at[0, :start].set(prompt)

    @jax.jit
    def decode(params, buffer, rng):
        def step(i, carry):
            buffer, rng = carry
            rng, key = jax.random.split(rng)
            logits = model.apply({"params": params}, buffer)[0, start + i - 1]
            logits = filter_logits(logits, valid_vocab, top_k)
            token = (jnp.argmax(logits) if temperature == 0
                     else jax.random.categorical(key, logits / temperature))
            return buffer.at[0, start + i].set(token), rng
        return jax.lax.fori_loop(0, num_new, step, (buffer, rng))[0]

    out = decode(params, buffer, jax.random.key(seed))
    return np.asarray(jax.device_get(out))[0, start:start + num_new]
