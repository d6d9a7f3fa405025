"""Causal self-attention: one local function per implementation, chosen by name in `causal`.

    xla     softmax(QK^T / sqrt(d)) V in XLA, scores in float32, queries in blocks: any backend, and
            the only one with attention dropout
    cudnn   cuDNN's fused flash attention (`jax.nn.dot_product_attention`): GPU, 16-bit
    splash  Pallas splash attention: TPU (elsewhere Pallas interprets it, slowly: the tests do)

Each takes q [batch, length, heads, head_dim] and k, v [batch, length, kv_heads, head_dim], unscaled
(grouped-query attention: query head h reads kv head h // (heads // kv_heads)), and segment ids
[batch, length] or None: a token attends to itself and the earlier tokens of its own segment (packed
documents). `lm.config.resolve_attention` turns `auto` into a name, and refuses dropout with a kernel
that has none. Decoding with a KV cache runs `masked_softmax`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm import sharding

# On the XLA path up to UNROLLED_BLOCKS blocks of queries are unrolled, each over the keys up to its
# end, which skips most of the masked triangle; a longer sequence loops over QUERY_BLOCK-query
# blocks, each over all keys, so that neither the graph nor the scores held grow with its square.
QUERY_BLOCK = 256
UNROLLED_BLOCKS = 4
# Splash attention's block sizes, largest first: the largest that divides the (padded) length.
SPLASH_BLOCKS = (512, 256, 128)


def query_block(length: int) -> int:
    """Queries per block on the XLA path: a quarter of the sequence, within [32, QUERY_BLOCK].
    Smaller blocks skip more of the masked triangle but make smaller products; a quarter was no
    slower than a fixed 128 at any benchmarked shape and faster on the short ones
    (docs/benchmarks.md).
    """
    return min(max(-(-length // UNROLLED_BLOCKS), 32), QUERY_BLOCK)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, q, k]: causal, and a token sees only its own segment (packed documents)."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal & (segment_ids[:, :, None] == segment_ids[:, None, :])


def _dropout(probs: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout, as flax's nn.Dropout; no key: none (evaluation)."""
    if rng is None or rate == 0:
        return probs
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    return jnp.where(keep, probs / (1.0 - rate), 0).astype(probs.dtype)


def _probs(scores: jax.Array, mask: jax.Array, head_dim: int, dtype,
           rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Attention weights from raw q.k scores: scaled, masked, softmax in float32, then dropout."""
    scores = scores.astype(jnp.float32) / head_dim ** 0.5
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return _dropout(probs.astype(dtype), rate, rng)


def masked_softmax(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """The reference: mask [batch or 1, 1, 1, queries, keys]; keys may outnumber the queries (a
    cache)."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    # Grouped-query attention: query heads are grouped so that each group shares one kv head.
    # Without groups the axis is left out: XLA:CPU would copy the scores through a strided
    # layout for a size-1 axis (a third of a forward pass at 8x1024).
    g = "g" if heads > kv_heads else ""
    if g:
        q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    else:
        mask = mask[:, 0]  # [batch, 1, q, k]
    probs = _probs(jnp.einsum(f"btk{g}d,bskd->bk{g}ts", q, k), mask, head_dim, q.dtype)
    out = jnp.einsum(f"bk{g}ts,bskd->btk{g}d", probs, v)
    return out.reshape(batch, length, heads, head_dim)


def _block_mask(rows: jax.Array, keys: int, row_segments: jax.Array | None,
                key_segments: jax.Array | None, groups: int) -> jax.Array:
    """[1, batch or 1, groups * rows, keys] for query positions `rows` over keys 0..keys-1."""
    mask = jnp.arange(keys)[None, :] <= rows[:, None]
    if row_segments is None:
        mask = mask[None]
    else:
        mask = mask & (row_segments[:, :, None] == key_segments[:, None, :keys])
    return jnp.tile(mask, (1, groups, 1))[None]


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
         rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Queries in blocks of `query_block`, a block's scores a fraction of the whole matrix (400 MB a
    layer at 8x1024 on the GPT-2 shape). Up to UNROLLED_BLOCKS blocks each attend to the keys up to
    their end: with four, three eighths of the scores are skipped. Beyond, a loop over blocks, each
    over all keys and recomputed in the backward pass, holds one block's scores at a time.

    Laid out heads first, a kv head's group of query heads folded into the rows: XLA:CPU runs
    these products faster, forward and backward, than with [batch, length, heads] operands
    (docs/benchmarks.md); heads and batch stay separate axes, so that their tensor and data
    sharding carry through without a gather.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(2, 0, 3, 1, 4)
    k, v = (x.transpose(2, 0, 1, 3) for x in (k, v))  # [kv_heads, batch, length, head_dim]
    block = query_block(length)
    count = -(-length // block)

    def attend(index, rows, q_rows, keys, row_segments):
        """One block: q_rows [kv_heads, batch, groups, len(rows), head_dim] over keys 0..keys-1."""
        q_rows = q_rows.reshape(kv_heads, batch, groups * rows.shape[0], head_dim)
        mask = _block_mask(rows, keys, row_segments, segment_ids, groups)
        drop_rng = None if rng is None else jax.random.fold_in(rng, index)
        probs = _probs(jnp.einsum("kbrd,kbsd->kbrs", q_rows, k[:, :, :keys]), mask, head_dim,
                       q.dtype, rate, drop_rng)
        out = jnp.einsum("kbrs,kbsd->kbrd", probs, v[:, :, :keys])
        return out.reshape(kv_heads, batch, groups, rows.shape[0], head_dim)

    if count <= UNROLLED_BLOCKS:
        blocks = []
        for i, start in enumerate(range(0, length, block)):
            end = min(start + block, length)
            segments = None if segment_ids is None else segment_ids[:, start:end]
            blocks.append(attend(i, jnp.arange(start, end), q[:, :, :, start:end], end, segments))
        out = jnp.concatenate(blocks, axis=3)  # [kv_heads, batch, groups, length, head_dim]
    else:
        padded = count * block  # the last block's extra queries attend too, and are dropped
        q = jnp.pad(q, ((0, 0),) * 3 + ((0, padded - length), (0, 0)))
        segments = (None if segment_ids is None
                    else jnp.pad(segment_ids, ((0, 0), (0, padded - length))))

        def body(carry, i):
            start = i * block
            rows_segments = (None if segments is None
                             else jax.lax.dynamic_slice_in_dim(segments, start, block, axis=1))
            return carry, attend(i, start + jnp.arange(block),
                                 jax.lax.dynamic_slice_in_dim(q, start, block, axis=3), length,
                                 rows_segments)

        _, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, jnp.arange(count))
        out = jnp.moveaxis(out, 0, 3).reshape(kv_heads, batch, groups, padded, head_dim)
        out = out[:, :, :, :length]
    return out.transpose(1, 3, 0, 2, 4).reshape(batch, length, heads, head_dim)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Unpacked batches need only the causal mask, which the kernel builds itself."""
    mask = None if segment_ids is None else segment_mask(segment_ids)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=segment_ids is None,
                                        implementation="cudnn")


def _splash_kernel(heads: int, length: int) -> Callable[..., jax.Array]:
    """Causal splash attention over one device's heads: (q [heads, length, head_dim], k, v (kv heads
    may be fewer: grouped), segment ids [length] or none) -> out. Imported here, so that a JAX
    without the TPU kernels fails only where they are asked for."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=jax.default_backend() != "tpu")

    def attend(q: jax.Array, k: jax.Array, v: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
        segments = None if segment_ids is None else splash.SegmentIds(segment_ids, segment_ids)
        return kernel(q, k, v, segment_ids=segments)
    return attend


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Per device (shard_map over the batch and head axes of the mesh): each device's rows and
    heads, the length padded to a multiple of 128 (padded keys come after every real query, so
    causality hides them). The kernel applies no 1/sqrt(head_dim) itself."""
    batch, length, heads, head_dim = q.shape
    padded = -(-length // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    q = (q.astype(jnp.float32) / head_dim ** 0.5).astype(q.dtype)
    q, k, v = (jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).swapaxes(1, 2)
               for x in (q, k, v))  # [batch, heads, padded, head_dim]
    if segment_ids is not None:  # padding is a segment of its own, so every query sees a key
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - length)), constant_values=-1)

    def local(q, k, v, *segment_ids):  # one device's rows (vmapped) and heads
        return jax.vmap(_splash_kernel(q.shape[1], padded))(q, k, v, *segment_ids)

    rows = sharding.split_axes("act_batch", batch)
    heads_axes = sharding.split_axes("act_kv_heads", k.shape[1])  # query heads follow their kv head
    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
    if rows or heads_axes:
        specs = (P(rows, heads_axes),) * 3 + (P(rows),) * (len(args) - 3)
        local = jax.shard_map(local, in_specs=specs, out_specs=P(rows, heads_axes), check_vma=False)
    return local(*args).swapaxes(1, 2)[:, :length]


def causal(impl: str, q: jax.Array, k: jax.Array, v: jax.Array,
           segment_ids: jax.Array | None = None, dropout_rate: float = 0.0,
           dropout_rng: jax.Array | None = None) -> jax.Array:
    """Causal attention by the implementation named `impl` (resolved: xla, cudnn or splash).
    Dropout on the attention weights needs `dropout_rng`; only xla has it (see module doc)."""
    implementations = {"xla": functools.partial(_xla, rate=dropout_rate, rng=dropout_rng),
                       "cudnn": _cudnn, "splash": _splash}
    return implementations[impl](q, k, v, segment_ids)
