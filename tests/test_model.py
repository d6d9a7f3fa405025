"""The Transformer's forward pass: causality, initial loss, layer layouts, GQA, segments, and a
float64 numpy reference for both the GPT-2 and the LLaMA variant."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trees import assert_trees_close

from lm import attention
from lm import model as model_module
from lm.config import default_config
from lm.model import ModelConfig, Transformer

VOCAB = 128
LENGTH = 16
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, tie_embeddings=False,
             num_kv_heads=2)
VARIANTS = {"gpt2": {}, "llama": LLAMA}


def model_config(variant, **overrides):
    model = default_config().model
    model.update(num_layers=2, d_model=32, num_heads=4, context_length=LENGTH)
    model.update({**VARIANTS[variant], **overrides})
    return ModelConfig.from_config(model, VOCAB)


def param_shapes(cfg):
    tokens = jnp.zeros((1, LENGTH), jnp.int32)
    return nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens))["params"]


def random_params(cfg, seed=1):
    """Params in the model's own tree, but far from initialisation: at init, norm scales are 1,
    biases 0 and attention nearly uniform, which would hide wrong scalings, swapped biases or a
    leaky mask. (Numpy draws also skip compiling the initialisers, which takes seconds on CPU.)"""
    rng = np.random.default_rng(seed)
    def draw(path, shape):
        noise = 0.2 * rng.standard_normal(shape.shape).astype(np.float32)
        return 1.0 + noise if path[-1].key == "scale" else noise
    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def random_tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, shape, dtype=np.int32)


@functools.partial(jax.jit, static_argnums=0)  # static: one compilation per model config
def forward(cfg, params, tokens, positions=None, segment_ids=None):
    return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids)


def logits(cfg, params, tokens, **kwargs):
    return np.asarray(forward(cfg, params, tokens, **kwargs))


def next_token_loss(cfg, params, tokens):
    predicted = Transformer(cfg).apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(predicted, tokens[:, 1:]).mean()


mean_loss = jax.jit(next_token_loss, static_argnums=0)
gradients = jax.jit(jax.grad(next_token_loss, argnums=1), static_argnums=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_token_changes_only_its_own_and_later_logits(variant):
    cfg = model_config(variant)
    params, tokens = random_params(cfg), random_tokens((2, LENGTH))
    base = logits(cfg, params, tokens)
    for t in range(LENGTH):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        new = logits(cfg, params, changed)
        np.testing.assert_allclose(new[:, :t], base[:, :t], atol=1e-6, rtol=0,
                                   err_msg=f"changing token {t} changed earlier logits")
        change_per_position = np.abs(new - base).max(axis=(0, 2))
        assert np.all(change_per_position[t:] > 1e-3), (t, change_per_position)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_at_initialisation_is_close_to_uniform(variant):
    cfg = model_config(variant)
    # rbg: the model's own initialisers, with random bits that compile in a fraction of
    # threefry's time on CPU.
    init = jax.jit(Transformer(cfg).init)
    params = init(jax.random.key(0, impl="rbg"), jnp.zeros((1, LENGTH), jnp.int32))["params"]
    loss = mean_loss(cfg, nn.unbox(params), random_tokens((8, LENGTH + 1)))
    assert abs(float(loss) - math.log(VOCAB)) < 0.05


def stack_layers(unscanned, num_layers):
    """The scanned layout of an unscanned tree: per-layer trees stacked on a leading axis."""
    params = {k: v for k, v in unscanned.items() if not k.startswith("layers_")}
    params["layers"] = jax.tree.map(lambda *xs: np.stack(xs),
                                    *[unscanned[f"layers_{i}"] for i in range(num_layers)])
    return params


@pytest.mark.parametrize("variant", VARIANTS)
def test_scanned_and_unscanned_layers_compute_the_same_logits(variant):
    scanned, unscanned = model_config(variant), model_config(variant, scan_layers=False)
    params = random_params(unscanned)
    stacked = stack_layers(params, unscanned.num_layers)
    assert jax.tree.structure(stacked) == jax.tree.structure(param_shapes(scanned))
    tokens = random_tokens((2, LENGTH))
    np.testing.assert_allclose(logits(scanned, stacked, tokens), logits(unscanned, params, tokens),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_attention_by_query_blocks_equals_one_block(variant, monkeypatch):
    cfg = model_config(variant)
    params, tokens = random_params(cfg), random_tokens((2, LENGTH))

    def loss_and_grads(block):  # a fresh jit per block size: the size is read while tracing
        monkeypatch.setattr(attention, "query_block", lambda length: block)
        return jax.jit(jax.value_and_grad(lambda p: next_token_loss(cfg, p, tokens)))(params)

    blocked, whole = loss_and_grads(5), loss_and_grads(LENGTH)  # blocks of 5, the last shorter
    assert_trees_close(blocked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_scoring_targets_in_chunks_equals_the_loss_of_whole_logits(variant, monkeypatch):
    cfg = model_config(variant)
    params, tokens = random_params(cfg), random_tokens((2, LENGTH + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def scored(chunk):  # positions per chunk; a fresh jit per size: the size is read while tracing
        monkeypatch.setattr(model_module, "SCORE_CHUNK_ELEMENTS", chunk * 2 * VOCAB)

        def objective(p):  # both outputs, so that both gradients are compared
            nll, log_z = Transformer(cfg).apply({"params": p}, inputs, targets=targets)
            return jnp.sum(nll) + jnp.sum(log_z ** 2), (nll, log_z)
        return jax.jit(jax.value_and_grad(objective, has_aux=True))(params)

    (_, (nll, log_z)), _ = chunked = scored(5)  # 4 chunks, the last padded
    whole = logits(cfg, params, inputs).astype(np.float64)
    reference_log_z = np.log(np.exp(whole).sum(-1))
    reference_nll = reference_log_z - np.take_along_axis(whole, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, reference_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_z, reference_log_z, rtol=1e-5, atol=1e-5)
    assert_trees_close(chunked, scored(LENGTH), rtol=1e-5, atol=1e-5)  # gradients up to ~5


# One variant: remat wraps the whole block, whatever is in it, and each gradient compile is slow.
@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_rematerialisation_does_not_change_gradients(policy):
    plain, remat = model_config("gpt2"), model_config("gpt2", remat_policy=policy)
    params, tokens = random_params(plain), random_tokens((2, LENGTH + 1))
    assert_trees_close(gradients(remat, params, tokens), gradients(plain, params, tokens),
                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads(variant):
    gqa, mha = model_config(variant, num_kv_heads=2), model_config(variant, num_kv_heads=4)
    params = random_params(gqa)
    # kv head j serves query heads j*g .. j*g+g-1, so multi-head head h takes kv head h // g.
    groups = gqa.num_heads // gqa.num_kv_heads
    repeated = jax.tree.map(lambda x: x, params)  # new containers, same leaves
    attn = repeated["layers"]["attn"]
    # kernel [layers, embed, kv_heads, head_dim], bias [layers, kv_heads, head_dim]
    for name in ("key", "value"):
        attn[name] = jax.tree.map(lambda x: np.repeat(x, groups, axis=-2), attn[name])
    tokens = random_tokens((2, LENGTH))
    np.testing.assert_allclose(logits(mha, repeated, tokens), logits(gqa, params, tokens),
                               atol=1e-5, rtol=0)


# A float64 numpy forward pass written from the architectures' definitions, not from lm.model.

def ref_norm(p, x, cfg):
    if cfg.norm == "rmsnorm":
        return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + cfg.norm_eps) * p["scale"]
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.norm_eps)
    return normed * p["scale"] + p.get("bias", 0.0)


def ref_rope(x, theta):
    """HF LLaMA's rotate_half form: feature i pairs with i + head_dim/2, at theta^(-2i/head_dim)."""
    length, head_dim = x.shape[1], x.shape[-1]
    angle = np.arange(length)[:, None] * theta ** (-np.arange(0, head_dim, 2) / head_dim)
    angle = np.concatenate([angle, angle], -1)[None, :, None, :]
    rotated = np.concatenate([-x[..., head_dim // 2:], x[..., :head_dim // 2]], -1)
    return x * np.cos(angle) + rotated * np.sin(angle)


def ref_attention(p, x, cfg):
    def project(name):  # [batch, length, heads, head_dim]
        return np.einsum("btd,dhe->bthe", x, p[name]["kernel"]) + p[name].get("bias", 0.0)
    groups = cfg.num_heads // cfg.num_kv_heads
    q = project("query")
    k, v = (np.repeat(project(name), groups, axis=2) for name in ("key", "value"))
    if cfg.position == "rope":
        q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
    scores = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(cfg.head_dim)
    length = x.shape[1]
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhe->bqhe", probs, v)
    return np.einsum("bqhe,hed->bqd", out, p["out"]["kernel"]) + p["out"].get("bias", 0.0)


def ref_mlp(p, x, cfg):
    def dense(name, x):
        return x @ p[name]["kernel"] + p[name].get("bias", 0.0)
    if cfg.mlp == "swiglu":
        gate = dense("gate", x)
        return dense("down", gate / (1 + np.exp(-gate)) * dense("up", x))
    u = dense("up", x)
    if cfg.mlp == "gelu_exact":  # x * Phi(x)
        return dense("down", u * (1 + np.vectorize(math.erf)(u / np.sqrt(2))) / 2)
    return dense("down", 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3))))


def reference_logits(params, cfg, tokens):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    x = p["embed"][tokens]
    if cfg.position == "learned":
        x = x + p["pos_embed"][:tokens.shape[1]]
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a: a[i], p["layers"])
        x = x + ref_attention(layer["attn"], ref_norm(layer["attn_norm"], x, cfg), cfg)
        x = x + ref_mlp(layer["mlp"], ref_norm(layer["mlp_norm"], x, cfg), cfg)
    x = ref_norm(p["final_norm"], x, cfg)
    return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"]["kernel"])


@pytest.mark.parametrize("variant, overrides", [
    *((variant, {}) for variant in VARIANTS),
    ("gpt2", dict(mlp="gelu_exact", use_bias=False)),  # nanoGPT's
])
def test_logits_match_a_float64_numpy_reference(variant, overrides):
    cfg = model_config(variant, **overrides)
    params, tokens = random_params(cfg), random_tokens((2, LENGTH))
    expected = reference_logits(params, cfg, tokens)
    assert np.abs(expected).max() > 1.0  # large enough that 1e-4 is a strict tolerance
    np.testing.assert_allclose(logits(cfg, params, tokens), expected, atol=1e-4, rtol=0)


def test_exact_gelu_matches_float64_from_the_far_tails_to_zero():
    x = np.linspace(-12, 12, 4801, dtype=np.float32)
    expected = x * (1 + np.vectorize(math.erf)(x.astype(np.float64) / np.sqrt(2))) / 2
    np.testing.assert_allclose(model_module.gelu_exact(x), expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_segments_give_the_same_logits_as_each_document_alone(variant):
    cfg = model_config(variant)
    params, tokens, first = random_params(cfg), random_tokens((2, LENGTH)), 6
    segment_ids = np.broadcast_to((np.arange(LENGTH) >= first).astype(np.int32), tokens.shape)
    positions = np.broadcast_to(np.r_[np.arange(first), np.arange(LENGTH - first)], tokens.shape)
    packed = logits(cfg, params, tokens, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(packed[:, :first], logits(cfg, params, tokens[:, :first]),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[:, first:], logits(cfg, params, tokens[:, first:]),
                               atol=1e-5, rtol=0)
