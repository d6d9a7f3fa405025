"""Attention implementations against the reference masked softmax: outputs and gradients, causal,
packed and grouped-query, on 1 and 8 devices (splash attention in Pallas's interpreter, as its own
kernel tests run it on a CPU); which implementation `auto` picks; and what is refused."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trees import assert_trees_close

from lm import attention, sharding
from lm.config import ConfigError, default_config, resolve_attention, validate
from lm.model import ModelConfig

BATCH, HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 8


def qkv(length, kv_heads=KV_HEADS, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(BATCH, length, HEADS, HEAD_DIM)] + [(BATCH, length, kv_heads, HEAD_DIM)] * 2
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def packed(length):
    """Documents starting at 0, and at a row's own later positions: one row a single token."""
    starts = np.array([[0], [length // 4], [length // 2 + 3], [length - 1]])
    return jnp.asarray((np.arange(length)[None] >= starts).astype(np.int32))


def reference(q, k, v, segment_ids):
    length = q.shape[1]
    mask = (jnp.tril(jnp.ones((length, length), bool))[None] if segment_ids is None
            else attention.segment_mask(segment_ids))
    return attention.masked_softmax(q, k, v, mask[:, None, None])


def value_and_grads(fn, q, k, v, segment_ids, mesh=None):
    """The attention output and the gradients of a non-linear function of it, compiled under
    `mesh` (its batch and head axes split by the rules) or none."""
    def objective(q, k, v):
        out = fn(q, k, v, segment_ids)
        return jnp.sum(jnp.sin(out) * out), out
    run = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))
    if mesh is None:
        (_, out), grads = run(q, k, v)
    else:
        with jax.set_mesh(mesh):
            (_, out), grads = run(q, k, v)
    return jax.device_get((out, grads))


def make_mesh(data, fsdp, tensor):
    config = default_config()
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    return sharding.make_mesh(config)


@pytest.mark.parametrize("impl, blocks, length, kv_heads, segments, mesh", [
    ("xla", 4, 20, KV_HEADS, True, None),      # unrolled query blocks, each to its own end
    ("xla", 7, 20, KV_HEADS, True, None),      # a loop of blocks over all keys, the last padded
    ("splash", 0, 200, KV_HEADS, True, None),  # padded to 256: two 128-blocks
    ("splash", 0, 128, KV_HEADS, True, (2, 2, 2)),  # shard_map: 2 rows and 1 kv head a device
    # 2 kv heads on a tensor axis of 4: heads whole, replicated over it; 2 rows a device.
    ("splash", 0, 128, KV_HEADS, False, (2, 1, 4)),
], ids=str)
def test_attention_matches_the_masked_softmax_in_outputs_and_gradients(
        impl, blocks, length, kv_heads, segments, mesh, monkeypatch):
    if blocks:
        monkeypatch.setattr(attention, "query_block", lambda n: -(-n // blocks))
    q, k, v = qkv(length, kv_heads)
    segment_ids = packed(length) if segments else None
    expected = value_and_grads(reference, q, k, v, segment_ids)
    got = value_and_grads(lambda *a: attention.causal(impl, *a), q, k, v, segment_ids,
                          mesh and make_mesh(*mesh))
    assert_trees_close(got, expected, rtol=1e-5, atol=2e-5)


def test_the_xla_attention_graph_does_not_grow_with_the_length():
    def size(length):
        q, k, v = (jax.ShapeDtypeStruct(x.shape[:1] + (length,) + x.shape[2:], x.dtype)
                   for x in qkv(1))
        return len(jax.make_jaxpr(
            jax.grad(lambda q, k, v: jnp.sum(attention.causal("xla", q, k, v))))(q, k, v).eqns)
    assert size(32768) == size(2048)


@pytest.mark.parametrize("backend, dtype, dropout, expected", [
    ("tpu", "bfloat16", 0.0, "splash"), ("tpu", "float32", 0.0, "splash"),
    ("gpu", "bfloat16", 0.0, "cudnn"), ("gpu", "float32", 0.0, "xla"),
    ("tpu", "bfloat16", 0.1, "xla"), ("gpu", "bfloat16", 0.1, "xla"), ("cpu", "bfloat16", 0.0, "xla"),
])
def test_auto_attention_picks_the_fused_kernel_of_the_backend_without_dropout(
        backend, dtype, dropout, expected, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert resolve_attention("auto", dtype, dropout) == expected


def test_the_1b_llama_config_runs_splash_attention_on_a_tpu(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "llama_1b", Path(__file__).parents[1] / "configs" / "llama_1b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert ModelConfig.from_config(config.model, 32000).attention == "splash"
    config.model.attention_impl = "splash"
    validate(config, num_devices=8)


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_a_fused_kernel_with_attention_dropout_is_refused(impl, monkeypatch):
    config = default_config()
    config.model.update(attention_impl=impl, dropout=0.1, dtype="bfloat16")
    monkeypatch.setattr(jax, "default_backend", lambda: {"cudnn": "gpu", "splash": "tpu"}[impl])
    with pytest.raises(ConfigError, match=f"attention_impl='{impl}' has no attention dropout"):
        validate(config, num_devices=1)
    with pytest.raises(ConfigError, match="dropout"):  # a model built without validate refuses too
        ModelConfig.from_config(config.model, 256).attention


@pytest.mark.parametrize("impl, backend", [("cudnn", "cpu"), ("splash", "cpu"), ("splash", "gpu")])
def test_a_fused_kernel_is_refused_where_it_does_not_run(impl, backend, monkeypatch):
    config = default_config()
    config.model.update(attention_impl=impl, dtype="bfloat16")
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    with pytest.raises(ConfigError, match=f"attention_impl='{impl}' needs a"):
        validate(config, num_devices=1)


def test_a_llama_model_with_splash_attention_gives_the_logits_of_xla_attention():
    from test_model import logits, model_config, random_params, random_tokens
    xla, splash = (model_config("llama", attention_impl=impl) for impl in ("xla", "splash"))
    params, tokens = random_params(xla), random_tokens((2, 16))
    segment_ids = (np.arange(16)[None] >= np.array([[0], [5]])).astype(np.int32)
    np.testing.assert_allclose(logits(splash, params, tokens, segment_ids=segment_ids),
                               logits(xla, params, tokens, segment_ids=segment_ids),
                               atol=1e-5, rtol=0)
