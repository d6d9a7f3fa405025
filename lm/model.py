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
from ml_collections import ConfigDict

from lm.config import ConfigError


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
    def fused_attention(self) -> bool:
        """Whether attention runs as cuDNN's fused (flash) kernel rather than softmax(QK^T)V."""
        if self.attention_impl == "auto":  # cuDNN wants 16-bit inputs and has no attention dropout
            return (jax.default_backend() == "gpu" and self.dtype != "float32"
                    and self.dropout == 0)
        return self.attention_impl == "cudnn"

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


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, 1, 1, q, k]: causal, and a token sees only its own segment (packed documents)."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same_segment)[:, None, None]


def query_block(length: int) -> int:
    """Queries per block of causal attention on the XLA path (see _causal_attention_by_blocks): a
    quarter of the sequence, within [32, 256]. Smaller blocks skip more of the masked triangle but
    make smaller products. Against a fixed 128 on 2 CPU cores (medians of alternated runs): baby
    Shakespeare (64 tokens) 41.0 against 42.7 ms a step, the 6-layer/384 model (256) 2.08-2.15
    against 2.14-2.23 s, GPT-2's evaluation at 8x1024 16.0 against 16.2 s; GPT-2's 8x256 train
    step 11.10 against 10.97 s, within its noise.
    """
    return min(max(length // 4, 32), 256)


# Logits made at once when the model scores targets (float32 elements: 64 MiB). Whole, GPT-2's
# logits at 8x1024 are 1.6 GB, and XLA:CPU ran the head's product and loss over them 1.4x slower.
SCORE_CHUNK_ELEMENTS = 2**24


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
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """mask: [batch, 1, 1, q, k] (see attention_mask), or None for plain causal attention.

        With a cache (keys and values, [batch, kv_heads, cache_length, head_dim], with a leading
        layers axis when `layer` is set), the new keys and values are written at `positions` and
        the queries attend over the whole cache. Unrolled layers write into the stacked cache in
        place: slicing it per layer and stacking it again would copy it at every decoding step.
        The cache is laid out as the attention products read it, heads before positions: laid out
        like the projections' output, it was transposed (copied whole) in every layer and step.
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

        if cache is not None:
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
        if cfg.fused_attention and cache is None:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=None if mask is None else mask[:, :, 0], is_causal=mask is None,
                implementation="cudnn")
        elif mask is None and cache is None:
            out = self._causal_attention_by_blocks(q, k, v)
        else:
            out = self._softmax_attention(q, k, v, mask)
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        return Dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), in_dims=2,
                     std=_residual_std(cfg), deterministic=self.deterministic,
                     name="out")(out), cache

    def _causal_attention_by_blocks(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Causal attention, queries in blocks of `query_block`, each over the keys up to its end:
        with four blocks, three quarters of the masked triangle is skipped, and a block's
        scores are a fraction of the whole matrix (400 MB a layer at 8x1024 on the GPT-2 shape).

        Laid out heads first, a kv head's group of query heads folded into the rows: XLA:CPU runs
        these products 1.7x faster forward and 1.15-1.25x backward than with [batch, length,
        heads] operands (8x1024 and 16x256, measured); heads and batch stay separate axes, so that
        their tensor and data sharding carry through without a gather.
        """
        batch, length, heads, head_dim = q.shape
        kv_heads = k.shape[2]
        groups = heads // kv_heads
        q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(2, 0, 3, 1, 4)
        k, v = (x.transpose(2, 0, 1, 3) for x in (k, v))  # [kv_heads, batch, length, head_dim]
        blocks, block = [], query_block(length)
        for start in range(0, length, block):
            end = min(start + block, length)
            rows = q[:, :, :, start:end].reshape(kv_heads, batch, groups * (end - start), head_dim)
            mask = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
            scores = jnp.einsum("kbrd,kbsd->kbrs", rows, k[:, :, :end])
            probs = self._probs(scores, jnp.tile(mask, (groups, 1)))
            out = jnp.einsum("kbrs,kbsd->kbrd", probs, v[:, :, :end])
            blocks.append(out.reshape(kv_heads, batch, groups, end - start, head_dim))
        out = jnp.concatenate(blocks, axis=3)  # [kv_heads, batch, groups, length, head_dim]
        return out.transpose(1, 3, 0, 2, 4).reshape(batch, length, heads, head_dim)

    def _probs(self, scores: jax.Array, mask: jax.Array) -> jax.Array:
        """Attention weights from raw q.k scores: scaled, masked, softmax in float32, dropout."""
        scores = scores.astype(jnp.float32) / self.cfg.head_dim ** 0.5
        probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
        return nn.Dropout(self.cfg.dropout)(probs.astype(self.cfg.dtype),
                                            deterministic=self.deterministic)

    def _softmax_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                           mask: jax.Array | None) -> jax.Array:
        """mask: [batch or 1, 1, 1, queries, keys]."""
        batch, length, heads, head_dim = q.shape
        kv_heads = k.shape[2]  # keys may be longer than the queries: a cache, a block
        # Grouped-query attention: query heads are grouped so that each group shares one kv head.
        # Without groups the axis is left out: XLA:CPU would copy the scores through a strided
        # layout for a size-1 axis (a third of a forward pass at 8x1024).
        g = "g" if heads > kv_heads else ""
        if g:
            q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        else:
            mask = mask[:, 0]  # [batch, 1, q, k]
        probs = self._probs(jnp.einsum(f"btk{g}d,bskd->bk{g}ts", q, k), mask)
        out = jnp.einsum(f"bk{g}ts,bskd->btk{g}d", probs, v)
        return out.reshape(batch, length, heads, head_dim)


def gelu_exact(x: jax.Array) -> jax.Array:
    """x * Phi(x) as PyTorch's nn.GELU() computes it, x/2 (1 + erf(x / sqrt 2)). jax.nn.gelu's exact
    form goes through erfc, which XLA:CPU runs at half the speed: the baby Shakespeare step (4 such
    MLPs) took 2.2 ms less with this one (paired, alternated runs)."""
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
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        drop = functools.partial(nn.Dropout(cfg.dropout), deterministic=self.deterministic)
        h, cache = Attention(cfg, self.deterministic, self.layer, name="attn")(
            _norm(cfg, "attn_norm")(x), positions, mask, cache)
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
                 scorer: Callable[[jax.Array, jax.Array], tuple] = token_losses):
        """tokens [batch, length] int -> logits [batch, length, vocab] float32.

        Decoding: with `cache` (from `init_cache`), tokens are written into it at `positions` and
        attend to every cached position up to their own; returns (logits, updated cache).
        Scoring: with `targets` [batch, length], returns token_losses' (nll, log_z), each [batch,
        length]; the head and its loss run over chunks of positions, logits never whole.
        `scorer(logits, targets)` replaces token_losses there (e.g. to also say whether each target
        is the most likely token). `mask` [batch, 1, 1, queries, keys] says which keys each query
        sees, in place of segment_ids' (e.g. continuations that share one context, lm/scoring.py).
        """
        cfg = self.cfg
        batch, length = tokens.shape
        if cfg.position == "learned" and length > cfg.context_length:
            raise ValueError(f"{length} tokens exceed the learned position table's "
                             f"context_length={cfg.context_length}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        # Unpacked batches need only the causal mask, which the fused kernel builds itself.
        if mask is None and segment_ids is not None:
            mask = attention_mask(segment_ids)
        if cache is not None:
            slots = jnp.arange(cache["key"].shape[3])
            mask = (slots[None, None, :] <= positions[:, :, None])[:, None, None]

        table = self.param("embed", _init(cfg.init_std, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
        # Gather from a replicated copy: a gather from a vocab/fsdp-split table makes XLA fall back
        # to a full rematerialisation, and FSDP gathers every weight for its use anyway.
        x = jnp.take(nn.with_logical_constraint(table, (None, None)), tokens, axis=0)
        x = x.astype(cfg.dtype)
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
                            in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, cache = stack(cfg, deterministic, name="layers")(x, positions, mask, cache)
        else:
            for i in range(cfg.num_layers):
                x, cache = block(cfg, deterministic, i, name=f"layers_{i}")(
                    x, positions, mask, cache)

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
            return self._score(logits_of, x, targets, scorer)
        logits = logits_of(x)
        return logits if cache is None else (logits, cache)

    def _score(self, logits_of: Callable[[jax.Array], jax.Array], x: jax.Array,
               targets: jax.Array, scorer: Callable[[jax.Array, jax.Array], tuple]) -> tuple:
        """`scorer` (token_losses) over chunks of positions of at most SCORE_CHUNK_ELEMENTS logits;
        batch rows stay whole, so that a chunk is sharded as the batch is."""
        batch, length, _ = x.shape
        chunk = max(1, min(length, SCORE_CHUNK_ELEMENTS // (batch * self.cfg.vocab_size)))
        count = -(-length // chunk)
        x = jnp.pad(x, ((0, 0), (0, count * chunk - length), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, count * chunk - length)))

        def split(a: jax.Array) -> jax.Array:  # [count, batch, chunk, ...]
            return a.reshape(batch, count, chunk, *a.shape[2:]).swapaxes(0, 1)

        def body(module, carry, chunk_in):
            h, t = chunk_in
            return carry, scorer(logits_of(h), t)

        # Lifted, not jax.lax.map: an untied head is a submodule, its kernel broadcast to each chunk.
        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
        _, losses = scan(self, None, (split(x), split(targets)))
        return tuple(a.swapaxes(0, 1).reshape(batch, count * chunk)[:, :length] for a in losses)
