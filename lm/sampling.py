"""Autoregressive generation with a KV cache: one prefill of the prompts, then one jitted loop.

Prompts of different lengths share a batch, right-padded: each row's new tokens are written at its
own positions, and a query attends only to cache slots at or before its position, so a row never
sees another row's padding (later tokens overwrite it before anyone can attend to it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lm import lora, sharding
from lm.model import Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 disable those."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """-inf for all but the `top_k` largest logits and the smallest set whose mass reaches top_p."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # A token is needed while the mass of the tokens ranked above it is still short of top_p.
        needed = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(needed, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def choose(logits: jax.Array, key: jax.Array, options: SamplingOptions,
           valid_vocab: int) -> jax.Array:
    """Next tokens [batch] from logits [batch, vocab]; the vocabulary's padding ids never win."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
    if options.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / options.temperature, options.top_k, options.top_p)
    # Inverse-CDF sampling: one uniform number per row, where jax.random.categorical draws Gumbel
    # noise for every vocabulary entry (3x slower on a CPU at batch 8, 50k tokens).
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = (1.0 - jax.random.uniform(key, (logits.shape[0], 1))) * cdf[:, -1:]  # in (0, total]
    # The first index whose cdf reaches u: a filtered (probability 0) token never is one.
    return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


def decoding_model(model: Transformer) -> Transformer:
    """The model of `decoding_layout`."""
    return Transformer(dataclasses.replace(lora.plain(model.cfg), scan_layers=False,
                                           tie_embeddings=False,
                                           transposed_kernels=jax.default_backend() == "cpu"))


def decoding_layout(model: Transformer, params: Any) -> tuple[Transformer, Any]:
    """The same model with its weights laid out for many one-token steps: layers unrolled, since a
    scanned stack is sliced (copied) out at every step, and, on a CPU, every kernel (the tied
    output head too) stored [fan_out, fan_in]: XLA:CPU streams a matrix so laid out through a
    product with a few rows up to 1.8x faster (the sampling rows of scripts/benchmark.py).

    Laying out a model twice changes nothing: `generate` takes either layout, so a caller that
    samples many times lays out once (as `lm.load` does; 0.1-0.7 s for GPT-2 small on a CPU).
    """
    laid_out = decoding_model(model)
    if model.cfg.lora_rank:  # LoRA adapters merged into their kernels: one product where two were
        cfg, params = lora.merge(model.cfg, params)
        model = Transformer(cfg)
    if laid_out.cfg == model.cfg:
        return model, params
    params = dict(params)
    if model.cfg.scan_layers:
        stack = params.pop("layers")
        params.update({f"layers_{i}": jax.tree.map(lambda w, i=i: w[i], stack)
                       for i in range(model.cfg.num_layers)})
    if model.cfg.tie_embeddings:
        params["lm_head"] = {"kernel": params["embed"].T}
    if not laid_out.cfg.transposed_kernels:
        return laid_out, params
    # Only a kernel's Dense knows how many of its leading axes are inputs: take each fan-in from
    # the shapes the decoding model declares.
    shapes = nn.unbox(jax.eval_shape(laid_out.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))

    def transpose(path, w, shape):
        return w.reshape(shape.shape[1], -1).T if path[-1].key == "kernel" else w
    return laid_out, jax.tree_util.tree_map_with_path(transpose, params, shapes["params"])


def _decode(model: Transformer, options: SamplingOptions, max_new: int, valid_vocab: int,
            eos_id: int, on_token: Callable | None, params: Any, tokens: jax.Array,
            lengths: jax.Array, rng: jax.Array) -> jax.Array:
    batch, prompt_length = tokens.shape
    model, params = decoding_layout(model, params)
    cache = init_cache(model.cfg, batch, prompt_length + max_new - 1)
    positions = jnp.broadcast_to(jnp.arange(prompt_length), tokens.shape)
    logits, cache = model.apply({"params": params}, tokens, positions, cache=cache)
    rng, key = jax.random.split(rng)
    token = choose(logits[jnp.arange(batch), lengths - 1], key, options, valid_vocab)
    out = jnp.full((batch, max_new), eos_id, jnp.int32).at[:, 0].set(token)
    if on_token is not None:
        jax.debug.callback(on_token, token, ordered=True)

    def running(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def step(carry):
        i, token, cache, out, done, rng = carry
        logits, cache = model.apply({"params": params}, token[:, None],
                                    (lengths + i - 1)[:, None], cache=cache)
        rng, key = jax.random.split(rng)
        token = jnp.where(done, eos_id, choose(logits[:, 0], key, options, valid_vocab))
        if on_token is not None:
            jax.debug.callback(on_token, token, ordered=True)
        return i + 1, token, cache, out.at[:, i].set(token), done | (token == eos_id), rng

    carry = (jnp.int32(1), token, cache, out, token == eos_id, rng)
    out = jax.lax.while_loop(running, step, carry)[3]
    return nn.with_logical_constraint(out, (None, None))  # every process gets every row


@functools.lru_cache(maxsize=16)  # a notebook calling generate again should not recompile
def _compiled_decode(*static) -> Callable:
    return jax.jit(functools.partial(_decode, *static))


def generate(model: Transformer, params: Any, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, options: SamplingOptions = SamplingOptions(), seed: int = 0,
             eos_id: int | None = None, valid_vocab: int | None = None,
             mesh: Mesh | None = None, on_token: Callable[[np.ndarray], None] | None = None,
             pad_to: int = 0) -> list[np.ndarray]:
    """Continue each prompt (token ids) by up to `max_new_tokens`; a row stops at `eos_id`.

    Returns each row's new tokens, without the end-of-document token. `on_token` receives each
    step's tokens [batch] as they are chosen (for streaming). On a mesh, the batch is padded to
    the batch axes' size and the cache is sharded like the activations. The prompts are padded to
    the longest, or to `pad_to` positions if more: each width compiles its own program, so a
    caller with many batches pads to a few widths.
    """
    options.check()
    cfg = model.cfg
    lengths = np.array([len(p) for p in prompts], np.int32)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if min(lengths, default=0) < 1:
        raise ValueError("every prompt needs at least one token (e.g. the end-of-document id)")
    if lengths.max() + max_new_tokens > cfg.context_length:
        raise ValueError(f"a prompt of {lengths.max()} tokens plus max_new_tokens="
                         f"{max_new_tokens} exceeds the context of {cfg.context_length} tokens")
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-len(prompts) // shards) * shards
    tokens = np.zeros((rows, max(lengths.max(), pad_to)), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.concatenate([lengths, np.ones(rows - len(prompts), np.int32)])
    eos = -1 if eos_id is None else eos_id
    decode = _compiled_decode(model, options, max_new_tokens, valid_vocab or cfg.vocab_size, eos,
                              on_token)
    if mesh is None:
        out = decode(params, tokens, lengths, jax.random.key(seed))
    else:  # the logical constraints inside the model shard the batch and the cache
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            out = decode(params, tokens, lengths, jax.random.key(seed))
    out = np.asarray(jax.device_get(out))[:len(prompts)]
    return [row[:np.argmax(row == eos)] if (row == eos).any() else row for row in out]
