"""A decoder-only Transformer in Flax linen: GPT-2 style or LLaMA style, chosen by config.

GPT-2:  learned positions, LayerNorm, GELU MLP, biases, tied input/output embeddings.
LLaMA:  rotary positions (RoPE), RMSNorm, SwiGLU MLP, no biases, grouped-query attention, own head.

Every parameter and the main activations carry logical axis names; `lm/sharding.py` maps them onto
the device mesh. The model is a pure function of (params, tokens) -> float32 logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from lm import attention, sharding
from lm.config import ConfigError, resolve_attention


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    d_model: int
    d_ff: int
    context_length: int
    dropout: float = 0.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    mlp: str = "gelu"
    use_bias: bool = True
    qkv_bias: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_impl: str = "auto"
    loss_chunk_positions: int = 0  # see loss_chunk
    # Kernels stored [fan_out, fan_in], as PyTorch's nn.Linear stores them: the decoding layout
    # (sampling.decoding_layout), never a training one.
    transposed_kernels: bool = False
    # LoRA adapters (config.lora, lm/lora.py): their rank (0: none), alpha, dropout, and the names
    # of the Dense layers that get them.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()

    @property
    def attention(self) -> str:
        """The attention implementation this model runs (lm/attention.py), `auto` resolved."""
        return resolve_attention(self.attention_impl, self.dtype, self.dropout)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_config(cls, model: ConfigDict, vocab_size: int) -> ModelConfig:
        """The model section of a run config, with the vocabulary size and defaults resolved."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in model.items() if k in names}
        if not model.d_ff:  # LLaMA keeps SwiGLU's parameter count near a 4x GELU MLP's
            fields["d_ff"] = (-(-8 * model.d_model // 3 // 256) * 256 if model.mlp == "swiglu"
                              else 4 * model.d_model)
        fields.update(vocab_size=vocab_size, num_kv_heads=model.num_kv_heads or model.num_heads)
        return cls(**fields)

    def adapted(self, lora: ConfigDict | None) -> ModelConfig:
        """This model with config.lora's adapters (none when its rank is 0); `gate` names a layer
        of SwiGLU MLPs only."""
        if not lora or not lora.rank:
            return self
        targets = tuple(t for t in (t.strip() for t in lora.targets.split(","))
                        if t and (t != "gate" or self.mlp == "swiglu"))
        return dataclasses.replace(self, lora_rank=lora.rank, lora_alpha=float(lora.alpha),
                                   lora_dropout=float(lora.dropout), lora_targets=targets)

    @classmethod
    def for_run(cls, config: ConfigDict, tokenizer_vocab: int, tensor: int) -> ModelConfig:
        """A run's model, its vocabulary resolved against the tokenizer's and checked, as is its
        divisibility by the mesh's tensor axis."""
        vocab = config.model.vocab_size
        if vocab == 0:
            multiple = config.model.vocab_multiple
            vocab = -(-tokenizer_vocab // multiple) * multiple
        if vocab < tokenizer_vocab:
            raise ConfigError(f"config.model.vocab_size={vocab} is smaller than the tokenizer's "
                              f"{tokenizer_vocab} ids; set it to 0 (automatic) or at least "
                              f"{tokenizer_vocab}")
        cfg = cls.from_config(config.model, vocab).adapted(config.get("lora"))
        for name, size in (("vocab_size", cfg.vocab_size), ("d_ff", cfg.d_ff)):
            if size % tensor:
                raise ConfigError(f"model {name}={size} must be divisible by config.mesh.tensor="
                                  f"{tensor}; change one of them")
        return cfg


# Keys and values of every layer: {"key": .., "value": ..}, each [layers, batch, kv_heads, length,
# head_dim]. One layout for scanned and unscanned models, so decoding code need not know which.
KVCache = dict[str, jax.Array]


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {"key": jnp.zeros(shape, cfg.dtype), "value": jnp.zeros(shape, cfg.dtype)}


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class Dense(nn.Module):
    """Contract the trailing `in_dims` axes of x with a kernel whose axes are named by `axes`; with
    LoRA (its name in cfg.lora_targets), plus a low-rank adapter's product (`_adapter`)."""
    cfg: ModelConfig
    features: int | tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names: contracted input axes, then output axes
    in_dims: int = 1
    std: float | None = None
    use_bias: bool | None = None  # None: cfg.use_bias
    deterministic: bool = True  # no adapter dropout

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        std = cfg.init_std if self.std is None else self.std
        in_shape = x.shape[-self.in_dims:]
        fan_in = math.prod(in_shape)
        # As one 2-D matmul: for a dot that contracts batch and length together (the kernel's
        # gradient), XLA:CPU would otherwise transpose its operand inside a slow fused loop.
        rows = x.reshape(-1, fan_in).astype(cfg.dtype)
        if cfg.transposed_kernels:
            kernel = self.param("kernel", _init(std, (None, None)), (math.prod(features), fan_in),
                                cfg.param_dtype)
            # XLA:CPU streams a matrix so laid out through a product with a few rows up to 1.8x
            # faster; the barrier keeps XLA from folding the transpose back into the product.
            y = jax.lax.optimization_barrier(kernel.astype(cfg.dtype) @ rows.T).T
        else:
            kernel = self.param("kernel", _init(std, self.axes), in_shape + features,
                                cfg.param_dtype)
            y = rows @ kernel.reshape(fan_in, -1).astype(cfg.dtype)
            if cfg.lora_rank and self.name in cfg.lora_targets:
                y = y + self._adapter(rows, in_shape, features)
        y = y.reshape(x.shape[:-self.in_dims] + features)
        if cfg.use_bias if self.use_bias is None else self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims:])
            y = y + self.param("bias", bias_init, features, cfg.param_dtype).astype(cfg.dtype)
        return y

    def _adapter(self, rows: jax.Array, in_shape: tuple[int, ...], features: tuple[int, ...]
                 ) -> jax.Array:
        """LoRA's alpha/rank * dropout(x) A B beside the frozen kernel: A [inputs..., rank] drawn as
        PEFT draws it (uniform within 1/sqrt(fan-in)), B [rank, outputs...] zero, so that a fresh
        adapter leaves the base model's function unchanged. Float32 whatever the base's dtype
        (the optimizer updates them); named by the kernel's logical axes, so sharded by the same
        rules."""
        cfg, rank = self.cfg, self.cfg.lora_rank
        in_axes, out_axes = self.axes[:self.in_dims], self.axes[self.in_dims:]
        init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                                  in_axis=tuple(range(self.in_dims)), out_axis=-1)
        a = self.param("lora_a", nn.with_logical_partitioning(init_a, in_axes + (None,)),
                       in_shape + (rank,), jnp.float32)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                              (None,) + out_axes),
                       (rank,) + features, jnp.float32)
        x = nn.Dropout(cfg.lora_dropout)(rows, deterministic=self.deterministic)
        h = x @ a.reshape(-1, rank).astype(cfg.dtype)
        return (h @ b.reshape(rank, -1).astype(cfg.dtype)) * (cfg.lora_alpha / rank)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
    scale = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          scale_init=scale, name=name)
    return nn.LayerNorm(cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        use_bias=cfg.use_bias, scale_init=scale, name=name,
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _residual_std(cfg: ModelConfig) -> float:
    # GPT-2: each block adds two residual branches; scaling their output projections keeps the
    # residual stream's variance independent of depth at initialisation.
    return cfg.init_std / (2 * cfg.num_layers) ** 0.5


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The rotation per position of each pair of head dimensions, theta^(-2i/head_dim), rescaled
    for a longer context than the model was pretrained with (config.model.rope_scaling):
    `linear` divides every frequency by the factor (positions interpolated); `llama3` (Llama 3.1+)
    divides only those whose wavelength exceeds original_context/low_freq_factor, keeps those
    shorter than original_context/high_freq_factor (local order stays sharp), and blends linearly
    in between. A constant of the config, computed in float64."""
    half = cfg.head_dim // 2
    freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        freq = freq / factor
    elif cfg.rope_scaling == "llama3":
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        periods_in_context = cfg.rope_original_context * freq / (2 * np.pi)
        keep = np.clip((periods_in_context - low) / (high - low), 0.0, 1.0)
        freq = keep * freq + (1 - keep) * freq / factor
    return freq.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding, half-split layout (as in HF LLaMA). x: [batch, length, heads, head_dim]."""
    angle = positions[:, :, None, None].astype(jnp.float32) * rope_frequencies(cfg)
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# Logits one chunk of the head and loss makes on each device (float32: 64 MiB). Whole, GPT-2's
# logits at 8x1024 are 1.6 GB, over which XLA:CPU ran the head's product and loss slower.
SCORE_CHUNK_ELEMENTS = 2**24
# A train step keeps its logits whole up to this many on each device (float32: 1 GiB): through a
# gradient XLA:CPU runs them faster whole than in chunks recomputed for the backward pass
# (docs/benchmarks.md, long context).
WHOLE_LOGITS_ELEMENTS = 2**28


def loss_chunk(cfg: ModelConfig, batch: int, length: int, train: bool) -> int:
    """Positions per chunk of the output head and loss (`length`: whole logits).
    `cfg.loss_chunk_positions`, else sized per device: the batch rows and vocabulary entries a device
    holds (under the current mesh) times the chunk are SCORE_CHUNK_ELEMENTS; a train step's logits
    stay whole up to WHOLE_LOGITS_ELEMENTS."""
    if cfg.loss_chunk_positions:
        return min(cfg.loss_chunk_positions, length)
    rows = batch // sharding.shards("act_batch", batch)
    vocab = cfg.vocab_size // sharding.shards("act_vocab", cfg.vocab_size)
    if train and rows * length * vocab <= WHOLE_LOGITS_ELEMENTS:
        return length
    return max(1, min(length, SCORE_CHUNK_ELEMENTS // (rows * vocab)))


def embedding_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens] with the table split over the mesh as its axes ("vocab", "embed") say, never
    whole on a device: each device gathers its vocabulary slice over the embed axis (as FSDP gathers
    any weight), looks up the ids in that slice, and the slices' sums over the vocabulary axis make
    the rows. The gradient comes back split the same way. (A plain gather from the split table made
    XLA replicate it, and its gradient, on every device.)"""
    vocab, embed = table.shape
    vocab_axes = sharding.split_axes("vocab", vocab)
    embed_axes = sharding.split_axes("embed", embed)
    batch_axes = sharding.split_axes("act_batch", tokens.shape[0])
    if not (vocab_axes or embed_axes) or not batch_axes:  # whole, or a batch the mesh cannot split
        return jnp.take(table, tokens, axis=0)

    def local(table: jax.Array, tokens: jax.Array) -> jax.Array:
        if embed_axes:
            table = jax.lax.all_gather(table, embed_axes, axis=1, tiled=True)
        if not vocab_axes:
            return jnp.take(table, tokens, axis=0)
        ids = tokens - jax.lax.axis_index(vocab_axes) * table.shape[0]
        inside = (ids >= 0) & (ids < table.shape[0])
        rows = jnp.take(table, jnp.where(inside, ids, 0), axis=0)
        return jax.lax.psum(jnp.where(inside[..., None], rows, 0), vocab_axes)

    return jax.shard_map(local, in_specs=(P(vocab_axes, embed_axes), P(batch_axes)),
                         out_specs=P(batch_axes))(table, tokens)


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per position: the negative log-likelihood of the target, and the log-normaliser."""
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit.astype(jnp.float32), log_z


class Attention(nn.Module):
    cfg: ModelConfig
    deterministic: bool
    layer: int | None = None  # this layer's index in a cache of all layers; None: its own cache

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 cache: KVCache | None = None, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """Causal self-attention, within segments when `segment_ids` [batch, length] are given;
        with `mask` [batch, 1, 1, queries, keys] instead, exactly the keys it allows.

        With a cache (keys and values, [batch, kv_heads, cache_length, head_dim], with a leading
        layers axis when `layer` is set), the new keys and values are written at `positions` and
        the queries attend over the whole cache up to their own positions. Unrolled layers write
        into the stacked cache in place: slicing it per layer and stacking it again would copy it
        at every decoding step. The cache is laid out as the attention products read it, heads
        before positions: laid out like the projections' output, it was transposed (copied whole)
        in every layer and step.
        """
        cfg = self.cfg
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.use_bias or cfg.qkv_bias
        q = Dense(cfg, (heads, head_dim), ("embed", "heads", "head_dim"), use_bias=bias,
                  deterministic=self.deterministic, name="query")(x)
        k = Dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), use_bias=bias,
                  deterministic=self.deterministic, name="key")(x)
        v = Dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), use_bias=bias,
                  deterministic=self.deterministic, name="value")(x)
        if cfg.position == "rope":
            q, k = rope(q, positions, cfg), rope(k, positions, cfg)
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        k = nn.with_logical_constraint(k, ("act_batch", "act_length", "act_kv_heads", None))

        if cache is None and mask is not None:
            out = attention.masked_softmax(q, k, v, mask)
        elif cache is None:
            rate = cfg.dropout if not self.deterministic else 0.0
            out = attention.causal(cfg.attention, q, k, v, segment_ids, rate,
                                   self.make_rng("dropout") if rate else None)
        else:
            # Indexed [batch, new positions, kv_heads, head_dim], like the new keys and values.
            at = (jnp.arange(x.shape[0])[:, None], slice(None), positions)
            at = at if self.layer is None else (self.layer, *at)
            axes = ("act_batch", "act_kv_heads", None, None)
            axes = axes if self.layer is None else (None, *axes)
            cache = {name: nn.with_logical_constraint(
                         cache[name].at[at].set(new.astype(cache[name].dtype)), axes)
                     for name, new in (("key", k), ("value", v))}
            # Read as [batch, keys, kv_heads, head_dim]: XLA folds the transpose into the products.
            k, v = ((cache[name] if self.layer is None else cache[name][self.layer]).swapaxes(1, 2)
                    for name in ("key", "value"))
            slots = jnp.arange(k.shape[1])
            out = attention.masked_softmax(
                q, k, v, (slots[None, None, :] <= positions[:, :, None])[:, None, None])
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        return Dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), in_dims=2,
                     std=_residual_std(cfg), deterministic=self.deterministic,
                     name="out")(out), cache


def gelu_exact(x: jax.Array) -> jax.Array:
    """x * Phi(x) as PyTorch's nn.GELU() computes it, x/2 (1 + erf(x / sqrt 2)). jax.nn.gelu's exact
    form goes through erfc, which XLA:CPU runs at half the speed (docs/benchmarks.md)."""
    return 0.5 * x * (1 + jax.lax.erf(x * 2**-0.5))


class Mlp(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = functools.partial(Dense, cfg, deterministic=self.deterministic)
        if cfg.mlp == "swiglu":
            gate = dense(cfg.d_ff, ("embed", "mlp"), name="gate")(x)
            h = nn.silu(gate) * dense(cfg.d_ff, ("embed", "mlp"), name="up")(x)
        else:
            # GPT-2 uses the tanh approximation of GELU; PyTorch's nn.GELU (nanoGPT) the exact erf.
            up = dense(cfg.d_ff, ("embed", "mlp"), name="up")(x)
            h = gelu_exact(up) if cfg.mlp == "gelu_exact" else nn.gelu(up, approximate=True)
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.d_model, ("mlp", "embed"), std=_residual_std(cfg), name="down")(h)


class Block(nn.Module):
    """Pre-norm residual block; returns (x, this layer's updated cache) so that nn.scan can stack it."""
    cfg: ModelConfig
    deterministic: bool
    layer: int | None = None  # see Attention

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 cache: KVCache | None = None, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        drop = functools.partial(nn.Dropout(cfg.dropout), deterministic=self.deterministic)
        h, cache = Attention(cfg, self.deterministic, self.layer, name="attn")(
            _norm(cfg, "attn_norm")(x), positions, segment_ids, cache, mask)
        x = x + drop(h)
        x = x + drop(Mlp(cfg, self.deterministic, name="mlp")(_norm(cfg, "mlp_norm")(x)))
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), cache


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, deterministic: bool = True,
                 cache: KVCache | None = None, targets: jax.Array | None = None,
                 mask: jax.Array | None = None,
                 scorer: Callable[[jax.Array, jax.Array], tuple] = token_losses,
                 train: bool = False):
        """tokens [batch, length] int -> logits [batch, length, vocab] float32.

        Decoding: with `cache` (from `init_cache`), tokens are written into it at `positions` and
        attend to every cached position up to their own; returns (logits, updated cache).
        Scoring: with `targets` [batch, length], returns token_losses' (nll, log_z), each [batch,
        length]; the head and its loss run over chunks of positions (see loss_chunk; `train`: for
        a gradient). `scorer(logits, targets)` replaces token_losses there (e.g. to also say whether
        each target is the most likely token). `mask` [batch, 1, 1, queries, keys] says which keys
        each query sees, in place of causal attention within segment_ids (e.g. continuations that
        share one context, lm/scoring.py); it runs the reference softmax.
        """
        cfg = self.cfg
        batch, length = tokens.shape
        if cfg.position == "learned" and length > cfg.context_length:
            raise ValueError(f"{length} tokens exceed the learned position table's "
                             f"context_length={cfg.context_length}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        table = self.param("embed", _init(cfg.init_std, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
        x = embedding_lookup(table, tokens).astype(cfg.dtype)
        if cfg.position == "learned":
            pos_table = self.param("pos_embed", _init(cfg.init_std, ("positions", "embed")),
                                   (cfg.context_length, cfg.d_model), cfg.param_dtype)
            pos_table = nn.with_logical_constraint(pos_table, (None, None))
            x = x + jnp.take(pos_table, positions, axis=0).astype(cfg.dtype)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, prevent_cse=not cfg.scan_layers,
                             policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
        if cfg.scan_layers:  # one compiled block, looped: compile time does not grow with depth
            stack = nn.scan(block, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                            length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, cache = stack(cfg, deterministic, name="layers")(x, positions, segment_ids, cache,
                                                                mask)
        else:
            for i in range(cfg.num_layers):
                x, cache = block(cfg, deterministic, i, name=f"layers_{i}")(
                    x, positions, segment_ids, cache, mask)

        x = _norm(cfg, "final_norm")(x)
        if cfg.tie_embeddings:
            def head(h: jax.Array) -> jax.Array:
                return jnp.dot(h, table.T.astype(cfg.dtype))
        else:
            head = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head")

        def logits_of(h: jax.Array) -> jax.Array:
            logits = nn.with_logical_constraint(head(h), ("act_batch", "act_length", "act_vocab"))
            return logits.astype(jnp.float32)

        if targets is not None:
            return self._score(logits_of, x, targets, scorer,
                               loss_chunk(cfg, batch, length, train))
        logits = logits_of(x)
        return logits if cache is None else (logits, cache)

    def _score(self, logits_of: Callable[[jax.Array], jax.Array], x: jax.Array,
               targets: jax.Array, scorer: Callable[[jax.Array, jax.Array], tuple],
               chunk: int) -> tuple:
        """`scorer` (token_losses) over chunks of `chunk` positions (batch rows stay whole, so that
        a chunk is sharded as the batch is), each chunk's logits recomputed in the backward pass:
        only one chunk's logits and their gradient exist at a time."""
        batch, length, _ = x.shape
        if chunk >= length:
            return scorer(logits_of(x), targets)
        count = -(-length // chunk)
        x = jnp.pad(x, ((0, 0), (0, count * chunk - length), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, count * chunk - length)))

        def split(a: jax.Array) -> jax.Array:  # [count, batch, chunk, ...]
            return a.reshape(batch, count, chunk, *a.shape[2:]).swapaxes(0, 1)

        def body(module, carry, chunk_in):
            h, t = chunk_in
            return carry, scorer(logits_of(h), t)

        # Lifted, not jax.lax.map: an untied head is a submodule, its kernel broadcast to each chunk.
        scan = nn.scan(nn.remat(body, prevent_cse=False), variable_broadcast="params",
                       split_rngs={"params": False})
        _, losses = scan(self, None, (split(x), split(targets)))
        return tuple(a.swapaxes(0, 1).reshape(batch, count * chunk)[:, :length] for a in losses)
