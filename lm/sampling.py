"""Autoregressive generation with a KV cache: one prefill of the prompts, then one jitted loop.

Prompts of different lengths share a batch, right-padded: each row's new tokens are written at its
own positions, and a query attends only to cache slots at or before its position, so a row never
sees another row's padding (later tokens overwrite it before anyone can attend to it).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from lm import lora, sharding
from lm.model import Transformer, init_cache


@struct.dataclass
class SamplingOptions:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 disable those.

    A pytree: the compiled decoder takes these as values, so trying another temperature, top_k or
    top_p reuses it.
    """
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

    def as_arrays(self) -> SamplingOptions:
        """The same options as float32/int32 scalars: one compiled decoder for any values."""
        return SamplingOptions(np.float32(self.temperature), np.int32(self.top_k),
                               np.float32(self.top_p))


def filter_logits(logits: jax.Array, top_k: int | jax.Array = 0,
                  top_p: float | jax.Array = 1.0) -> jax.Array:
    """-inf for all but the `top_k` largest logits and the smallest set whose mass reaches top_p.

    `top_k` and `top_p` may be traced: one descending sort of the vocabulary serves both, and
    lax.cond skips the sort when neither filter is on and the nucleus when top_p is 1. The sort is
    lax.top_k of the whole vocabulary: XLA:CPU lowers any lax.top_k to that sort (a small k is no
    faster), and jnp.sort then reversed was slower.
    """
    top_k, top_p = jnp.asarray(top_k), jnp.asarray(top_p)

    def nucleus(ordered: jax.Array, kth: jax.Array) -> jax.Array:
        ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)  # within the top k
        probs = jax.nn.softmax(ordered, axis=-1)
        # A token is needed while the mass of the tokens ranked above it is still short of top_p.
        needed = jnp.cumsum(probs, axis=-1) - probs < top_p
        return jnp.maximum(kth, jnp.min(jnp.where(needed, ordered, jnp.inf), axis=-1, keepdims=True))

    def filtered(logits: jax.Array) -> jax.Array:
        ordered = jax.lax.top_k(logits, logits.shape[-1])[0]
        k = jnp.where(top_k > 0, top_k, logits.shape[-1])
        kth = jnp.take(ordered, k - 1, axis=-1)[..., None]  # ties with the k-th stay
        threshold = jax.lax.cond(top_p < 1.0, nucleus, lambda _, kth: kth, ordered, kth)
        return jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.lax.cond((top_k > 0) | (top_p < 1.0), filtered, lambda x: x, logits)


def choose(logits: jax.Array, key: jax.Array, options: SamplingOptions,
           valid_vocab: int) -> jax.Array:
    """Next tokens [batch] from logits [batch, vocab]; the vocabulary's padding ids never win."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
    temperature = jnp.asarray(options.temperature, jnp.float32)

    def sample(logits: jax.Array) -> jax.Array:
        logits = filter_logits(logits / temperature, options.top_k, options.top_p)
        # Inverse-CDF sampling: one uniform number per row, where jax.random.categorical draws
        # Gumbel noise for every vocabulary entry (several times slower on a CPU).
        cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
        u = (1.0 - jax.random.uniform(key, (logits.shape[0], 1))) * cdf[:, -1:]  # in (0, total]
        # The first index whose cdf reaches u: a filtered (probability 0) token never is one.
        return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)

    def greedy(logits: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature > 0, sample, greedy, logits)


def decoding_model(model: Transformer) -> Transformer:
    """The model of `decoding_layout`."""
    return Transformer(dataclasses.replace(lora.plain(model.cfg), scan_layers=False,
                                           tie_embeddings=False,
                                           transposed_kernels=jax.default_backend() == "cpu"))


def decoding_layout(model: Transformer, params: Any) -> tuple[Transformer, Any]:
    """The same model with its weights laid out for many one-token steps: layers unrolled, since a
    scanned stack is sliced (copied) out at every step, and, on a CPU, every kernel (the tied
    output head too) stored [fan_out, fan_in]: XLA:CPU streams a matrix so laid out through a
    product with a few rows faster (the sampling rows of scripts/benchmark.py).

    Laying out a model twice changes nothing: `generate` takes either layout, so a caller that
    samples many times lays out once (as `lm.load` does).
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


class _InOrder:
    """Passes each step's tokens to `on_token` in step order. The decoder's callbacks are
    unordered (JAX orders effects on one device only) and may arrive in any order."""

    def __init__(self, on_token: Callable[[np.ndarray], None]):
        self.on_token, self.next, self.pending = on_token, 0, {}
        self.lock = threading.Lock()

    def __call__(self, step: int, tokens: np.ndarray) -> None:
        with self.lock:
            self.pending[step] = tokens
            while self.next in self.pending:
                self.on_token(self.pending.pop(self.next))
                self.next += 1


# The streamers of the decoders running now, by id: a compiled decoder calls back into the one whose
# id it is given, so a new streamer needs no new program.
_STREAMERS: dict[int, _InOrder] = {}
_stream_ids = itertools.count()


def _stream(stream_id: jax.Array, step: jax.Array, tokens: jax.Array) -> None:
    _STREAMERS[int(stream_id)](int(step), np.asarray(tokens))


def _send(stream_id: jax.Array, step: jax.Array, tokens: jax.Array) -> None:
    # Replicated first: the callback reads the tokens on one device, gathered cheaply from copies.
    jax.debug.callback(_stream, stream_id, step, nn.with_logical_constraint(tokens, (None,)))


def _decode(model: Transformer, max_new: int, valid_vocab: int, eos_id: int, streams: bool,
            params: Any, tokens: jax.Array, lengths: jax.Array, rng: jax.Array,
            options: SamplingOptions, stream_id: jax.Array) -> jax.Array:
    batch, prompt_length = tokens.shape
    model, params = decoding_layout(model, params)
    cache = init_cache(model.cfg, batch, prompt_length + max_new - 1)
    positions = jnp.broadcast_to(jnp.arange(prompt_length), tokens.shape)
    logits, cache = model.apply({"params": params}, tokens, positions, cache=cache)
    rng, key = jax.random.split(rng)
    token = choose(logits[jnp.arange(batch), lengths - 1], key, options, valid_vocab)
    out = jnp.full((batch, max_new), eos_id, jnp.int32).at[:, 0].set(token)
    if streams:
        _send(stream_id, 0, token)

    def running(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def step(carry):
        i, token, cache, out, done, rng = carry
        logits, cache = model.apply({"params": params}, token[:, None],
                                    (lengths + i - 1)[:, None], cache=cache)
        rng, key = jax.random.split(rng)
        token = jnp.where(done, eos_id, choose(logits[:, 0], key, options, valid_vocab))
        if streams:
            _send(stream_id, i, token)
        return i + 1, token, cache, out.at[:, i].set(token), done | (token == eos_id), rng

    carry = (jnp.int32(1), token, cache, out, token == eos_id, rng)
    out = jax.lax.while_loop(running, step, carry)[3]
    return nn.with_logical_constraint(out, (None, None))  # every process gets every row


@functools.lru_cache(maxsize=16)  # a notebook calling generate again should not recompile
def _compiled_decode(*static) -> Callable:
    """The decoder of a model, length, vocabulary, end id and whether it streams; sampling options
    and the streamer are its arguments."""
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
    decode = functools.partial(
        _compiled_decode(model, max_new_tokens, valid_vocab or cfg.vocab_size, eos,
                         on_token is not None),
        params, tokens, lengths, jax.random.key(seed), options.as_arrays())
    stream_id = next(_stream_ids)
    if on_token is not None:
        _STREAMERS[stream_id] = _InOrder(on_token)
    try:
        if mesh is None:
            out = decode(np.int32(stream_id))
        else:  # the logical constraints inside the model shard the batch and the cache
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                out = decode(np.int32(stream_id))
        out = np.asarray(jax.device_get(out))[:len(prompts)]
    finally:
        if on_token is not None:
            jax.effects_barrier()  # every token streamed before the streamer goes
            del _STREAMERS[stream_id]
    return [row[:np.argmax(row == eos)] if (row == eos).any() else row for row in out]
