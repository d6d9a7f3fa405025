"""The compiled, sharded train step: it learns, it is the same computation on any mesh, it shards
what the rules say, it accumulates exactly; plus the optimizer pieces and config validation."""

import functools
import math
import re

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from trees import assert_trees_close

from lm import model as model_module
from lm import optim, sharding, step
from lm.config import ConfigError, default_config, mesh_shape, validate
from lm.model import ModelConfig, Transformer

VOCAB = 128
LENGTH = 16
BATCH = 8
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, tie_embeddings=False,
             num_kv_heads=2)
VARIANTS = {"gpt2": {}, "llama": LLAMA}
ONE_DEVICE = (1, 1, 1)


def run_config(variant="gpt2", mesh=ONE_DEVICE, **model_overrides):
    c = default_config()
    c.model.update(num_layers=2, d_model=32, num_heads=4, context_length=LENGTH)
    c.model.update({**VARIANTS[variant], **model_overrides})
    c.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
    c.optim.update(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=2)
    c.train.update(steps=200, batch_size=BATCH)
    return c


def compile_run(config, skip_nonfinite=False):
    """(mesh, CompiledSteps) for a run config, on as many devices as its mesh needs."""
    devices = jax.devices()[:math.prod(config.mesh[a] for a in ("data", "fsdp", "tensor"))]
    validate(config, len(devices))
    mesh = sharding.make_mesh(config, devices)
    model = Transformer(ModelConfig.from_config(config.model, VOCAB))
    total = config.train.steps
    steps = step.compile_steps(
        model, optim.make_optimizer(config.optim, total),
        optim.learning_rate_schedule(config.optim, total), mesh, seed=config.seed,
        batch_size=config.train.batch_size, grad_accum_steps=config.optim.grad_accum_steps,
        skip_nonfinite=skip_nonfinite)
    return mesh, steps


@functools.cache  # compiling is most of these tests' time: runs with the same settings share it
def compiled(variant="gpt2", mesh=ONE_DEVICE, grad_accum_steps=1, skip_nonfinite=False):
    config = run_config(variant, mesh)
    config.optim.grad_accum_steps = grad_accum_steps
    return compile_run(config, skip_nonfinite)


def make_batch(seed=0, lengths=(16, 3, 9, 16, 1, 12, 7, 14)):
    """Random tokens; row i scores its first lengths[i] positions, as padded rows do. The uneven
    counts make a mean of per-row or per-micro-batch means differ from the mean over tokens."""
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LENGTH + 1), dtype=np.int32)
    mask = (np.arange(LENGTH) < np.array(lengths)[:, None]).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def train(mesh, steps, batch, num_steps):
    """The final state and each step's metrics, from a fresh init."""
    state, batch = steps.init(), sharding.global_batch(mesh, batch, BATCH)
    history = []
    for _ in range(num_steps):
        state, metrics = steps.train(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_a_tiny_model_overfits_one_batch():
    mesh, steps = compiled()
    batch = make_batch(seed=1, lengths=[LENGTH] * BATCH)
    state, history = train(mesh, steps, batch, 150)
    assert history[0]["loss"] == pytest.approx(math.log(VOCAB), abs=0.1)
    assert history[-1]["loss"] < 0.3
    evaluated = jax.device_get(steps.eval(state.params, sharding.global_batch(mesh, batch, BATCH)))
    assert evaluated["nll"] / evaluated["tokens"] < 0.3


def test_a_batch_with_every_position_masked_has_loss_and_gradient_zero_and_no_tokens():
    mesh, steps = compiled()
    batch = {**make_batch(), "mask": np.zeros((BATCH, LENGTH), np.float32)}
    _, [metrics] = train(mesh, steps, batch, 1)
    assert (metrics["loss"], metrics["grad_norm"], metrics["tokens"], metrics["nonfinite"]) == (
        0.0, 0.0, 0.0, 0.0)


def test_a_skipped_update_leaves_the_learning_rate_the_schedules_at_the_step():
    """Warmup over 2 steps: the learning rate is 0 at step 0, half the peak at step 1. After a
    skipped step 0, step 1 applies half the peak: Adam's first update moves a parameter without
    weight decay by the learning rate wherever its gradient is far above eps."""
    mesh, steps = compiled(skip_nonfinite=True)
    nan = make_batch(seed=1)
    nan["mask"][0, 0] = np.nan
    state = steps.init()
    before = jax.device_get(state.params)  # (the step donates the state it is given)
    state, skipped = steps.train(state, sharding.global_batch(mesh, nan, BATCH))
    assert skipped["nonfinite"] == 1.0 and int(state.step) == 1
    state, metrics = steps.train(state, sharding.global_batch(mesh, make_batch(), BATCH))
    half_peak = run_config().optim.learning_rate / 2
    assert metrics["learning_rate"] == np.float32(half_peak)
    moved = jax.tree.map(np.subtract, jax.device_get(state.params), before)
    grads = jax.tree.map(lambda m: m / 0.1, jax.device_get(  # Adam's first moment: (1 - b1) * g
        optax.tree_utils.tree_get(state.opt_state, "mu")))
    checked = 0
    for path, delta in jax.tree_util.tree_leaves_with_path(moved):
        if path[-1].key == "bias":
            grad = functools.reduce(lambda node, key: node[key.key], path, grads)
            steep = np.abs(grad) > 1e-4
            np.testing.assert_allclose(np.abs(delta[steep]), half_peak, rtol=1e-3)
            checked += steep.sum()
    assert checked > 100


def test_float16_training_without_loss_scaling_is_refused():
    c = valid_config()
    c.model.dtype = "float16"
    with pytest.raises(ConfigError, match=r"config.model.dtype='float16' would train without loss "
                                          r"scaling.*use bfloat16"):
        validate(c, num_devices=8)


def test_the_cpu_train_step_runs_xlas_own_dots_not_ynnpack_fusions():
    _, steps = compiled()
    assert "__ynn_fusion" not in steps.train.as_text()
    assert steps.train.as_text().count(" dot(") >= 2 * 6  # forward and gradient products remain


def test_a_train_option_unknown_to_xla_falls_back_to_its_defaults(monkeypatch):
    monkeypatch.setattr(step, "CPU_TRAIN_OPTIONS", {"xla_cpu_option_of_an_older_xla": ""})
    mesh, steps = compile_run(run_config())
    _, history = train(mesh, steps, make_batch(), 3)  # the first update has a learning rate of 0
    assert history[2]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("variant, mesh", [
    ("gpt2", (8, 1, 1)), ("gpt2", (1, 8, 1)), ("gpt2", (2, 1, 4)), ("gpt2", (2, 2, 2)),
    ("llama", (2, 2, 2))], ids=lambda x: x if isinstance(x, str) else "x".join(map(str, x)))
def test_sharded_training_matches_one_device(variant, mesh):
    # Three steps: warmup starts at a learning rate of 0, so the params move from the second on.
    batch = make_batch()
    expected_state, expected = train(*compiled(variant, ONE_DEVICE), batch, 3)
    state, history = train(*compiled(variant, mesh), batch, 3)
    for got, want in zip(history, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert_trees_close(jax.device_get(state.params), jax.device_get(expected_state.params),
                       atol=1e-5)


def test_evaluation_scored_in_chunks_on_a_mesh_equals_one_device_scoring_whole(monkeypatch):
    # LLaMA: its untied head's kernel is split over the vocabulary by the tensor axis.
    batch = make_batch()
    one_mesh, one = compiled("llama", ONE_DEVICE)
    params = one.init().params
    whole = jax.device_get(one.eval(params, sharding.global_batch(one_mesh, batch, BATCH)))
    # Chunks are sized per device, whose share of the logits is 2 rows by 64 vocabulary entries
    # here: 5 positions a chunk, 4 chunks (sized from the global batch, a chunk was 1 position).
    monkeypatch.setattr(model_module, "SCORE_CHUNK_ELEMENTS", 2 * 5 * 64)
    mesh, steps = compile_run(run_config("llama", (2, 2, 2)))
    assert "f32[2,5,64]" in steps.eval.as_text()
    params = jax.device_put(params, steps.state_sharding.params)
    chunked = jax.device_get(steps.eval(params, sharding.global_batch(mesh, batch, BATCH)))
    assert chunked["tokens"] == whole["tokens"] == make_batch()["mask"].sum()
    assert chunked["nll"] == pytest.approx(whole["nll"], rel=1e-5)


def loss_and_gradients(config, params, batch):
    """The objective (z-loss included) and its gradients, compiled for the config's mesh."""
    devices = jax.devices()[:math.prod(config.mesh[a] for a in ("data", "fsdp", "tensor"))]
    mesh = sharding.make_mesh(config, devices)
    model = Transformer(ModelConfig.from_config(config.model, VOCAB))
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch["inputs"])["params"]
    params = jax.device_put(params, sharding.tree_shardings(mesh, shapes))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        objective = jax.value_and_grad(lambda p, b: step.loss_sums(p, model, b, 1e-2, None)[0])
        return jax.device_get(jax.jit(objective)(params, sharding.global_batch(mesh, batch, BATCH)))


@pytest.mark.parametrize("variant", VARIANTS)  # a head of its own, and one tied to the embedding
def test_a_chunked_training_loss_on_a_mesh_has_the_loss_and_gradients_of_whole_logits(variant):
    from test_model import random_params  # far from initialisation: gradients of every size
    batch = make_batch()
    params = random_params(ModelConfig.from_config(run_config(variant).model, VOCAB))
    whole = loss_and_gradients(run_config(variant), params, batch)  # small: whole logits
    # 4 chunks, the last padded; the vocabulary (and so the head, or the tied table) split in two.
    chunked = loss_and_gradients(run_config(variant, (2, 2, 2), loss_chunk_positions=5), params,
                                 batch)
    # Gradients up to ~20; whole logits on the same mesh differ from one device by ~2e-5 too.
    assert_trees_close(chunked, whole, rtol=1e-5, atol=5e-5)


def test_a_chunked_training_loss_never_holds_the_whole_logits_nor_their_gradient():
    def temporaries(chunk, vocab=8192):
        model = Transformer(ModelConfig.from_config(
            run_config("llama", loss_chunk_positions=chunk).model, vocab))
        tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), np.int32)
        params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
        batch = {"inputs": tokens, "targets": tokens, "mask": tokens.update(dtype=np.float32)}
        grad = jax.jit(jax.grad(lambda p, b: step.loss_sums(p, model, b, 0.0, None)[0]))
        return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    logits = BATCH * LENGTH * 8192 * 4
    # Whole, the backward pass holds the logits (or their softmax) and their gradient; in chunks,
    # recomputed chunk by chunk, neither. (Saving each chunk's softmax for the backward pass
    # instead would hold as much as the whole logits.)
    assert temporaries(4) < temporaries(0) - logits


def test_a_train_step_keeps_its_logits_whole_only_while_they_are_small():
    def chunk(vocab, batch, length, train=True):
        c = run_config()
        c.model.context_length = length
        return model_module.loss_chunk(ModelConfig.from_config(c.model, vocab), batch, length, train)
    assert chunk(50304, 8, 256) == 256  # GPT-2's CPU benchmark step: faster whole
    assert chunk(128256, 1, 8192) < 8192  # a LLaMA 3 vocabulary at 8k context: 4 GB a row whole
    assert chunk(50304, 8, 256, train=False) < 256  # evaluation's forward is faster in chunks


def test_the_embedding_table_and_its_gradient_are_never_whole_on_a_device():
    # vocab 128 x embed 32, split over tensor and fsdp: gathered over fsdp for the lookup and the
    # tied head, a device holds at most [64, 32] of it (replicated for the lookup, [128, 32]).
    _, steps = compiled("gpt2", (2, 2, 2))
    assert "f32[128,32]" not in steps.train.as_text()


def test_parameters_and_optimizer_state_are_sharded_by_the_rules():
    _, steps = compiled("gpt2", (2, 2, 2))
    state = steps.init()
    # Full sizes: layers=2, embed=32, heads=4, head_dim=8, mlp=128, vocab=128, positions=16; a
    # device holds half of every axis split over fsdp or tensor (each 2 here), all of the others.
    expected = {
        ("layers", "attn", "query", "kernel"): (P(None, "fsdp", "tensor", None), (2, 16, 2, 8)),
        ("layers", "attn", "out", "kernel"): (P(None, "tensor", None, "fsdp"), (2, 2, 8, 16)),
        ("layers", "mlp", "up", "kernel"): (P(None, "fsdp", "tensor"), (2, 16, 64)),
        ("layers", "mlp", "down", "kernel"): (P(None, "tensor", "fsdp"), (2, 64, 16)),
        ("layers", "attn_norm", "scale"): (P(None, "fsdp"), (2, 16)),
        ("embed",): (P("tensor", "fsdp"), (64, 16)),
        ("pos_embed",): (P(None, "fsdp"), (16, 16)),
    }
    adam = [optax.tree_utils.tree_get(state.opt_state, name) for name in ("mu", "nu")]
    for path, (spec, shard_shape) in expected.items():
        for tree in (state.params, *adam):
            leaf = functools.reduce(lambda node, key: node[key], path, tree)
            assert leaf.sharding.spec == spec, path
            assert leaf.addressable_shards[0].data.shape == shard_shape, path


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_sharded_initial_state_is_exactly_the_models_own_initialisation(variant):
    # The state's initializer is compiled at a lower optimisation level (faster to compile).
    _, steps = compiled(variant, (2, 2, 2))
    config = run_config(variant)
    model = Transformer(ModelConfig.from_config(config.model, VOCAB))
    tokens = np.zeros((1, LENGTH), np.int32)
    expected = nn.unbox(jax.jit(model.init)(jax.random.key(config.seed), tokens))["params"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(steps.init().params), expected)


def test_accumulating_micro_batches_equals_one_full_batch_step():
    batch = make_batch()
    expected_state, expected = train(*compiled("gpt2", (2, 1, 4)), batch, 2)
    state, history = train(*compiled("gpt2", (2, 1, 4), grad_accum_steps=4), batch, 2)
    for got, want in zip(history, expected):
        assert got["tokens"] == want["tokens"] == sum(batch["mask"].ravel())
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert_trees_close(without_key_bias(jax.device_get(state.params)),
                       without_key_bias(jax.device_get(expected_state.params)), atol=1e-6, rtol=1e-5)


def without_key_bias(params):
    """Params with the attention key bias zeroed. Its gradient is zero in exact arithmetic (softmax
    ignores a shift shared by all keys), so Adam, dividing by sqrt(v) + eps, turns rounding noise
    there into updates that differ between summation orders; every other leaf must match."""
    def zero_key_bias(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        return 0 * leaf if names[-2:] == ["key", "bias"] else leaf
    return jax.tree_util.tree_map_with_path(zero_key_bias, params)


def decayed(mask):
    """The '/'-joined paths of the leaves a weight-decay mask marks True."""
    return {"/".join(k.key for k in path)
            for path, on in jax.tree_util.tree_flatten_with_path(mask)[0] if on}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_applies_to_kernels_and_optionally_embeddings(variant, decay_embeddings):
    model = Transformer(ModelConfig.from_config(run_config(variant).model, VOCAB))
    boxed = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, LENGTH), np.int32))["params"]
    kernels = {f"layers/{module}/kernel" for module in
               ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/up", "mlp/down")}
    if variant == "gpt2":
        embeddings = {"embed", "pos_embed"}
    else:
        kernels |= {"layers/mlp/gate/kernel", "lm_head/kernel"}
        embeddings = {"embed"}
    expected = kernels | embeddings if decay_embeddings else kernels
    assert decayed(optim.weight_decay_mask(nn.unbox(boxed), decay_embeddings)) == expected
    # The optimizer is initialised with boxed (nn.Partitioned) params: same answer through the box.
    assert decayed(nn.unbox(optim.weight_decay_mask(boxed, decay_embeddings))) == expected


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("decay_steps", [0, 60])  # 0: decay over the run's 100 steps
def test_learning_rate_warms_up_to_the_peak_then_decays_to_the_floor(schedule, decay_steps):
    c = default_config().optim
    c.update(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, schedule=schedule,
             decay_steps=decay_steps)
    lr = optim.learning_rate_schedule(c, total_steps=100)
    end = decay_steps or 100
    rate = lambda s: float(lr(s))
    assert rate(0) == 0.0
    assert rate(5) == pytest.approx(5e-4, rel=1e-5)
    assert rate(10) == pytest.approx(1e-3, rel=1e-5)
    # Halfway through the decay both shapes are halfway between peak and floor.
    assert rate((10 + end) / 2) == pytest.approx(5.5e-4, rel=1e-4)
    rates = [rate(s) for s in range(10, end + 1)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    for s in (end, end + 1, 100, 1000):
        assert rate(s) == pytest.approx(1e-4, rel=1e-5), s


def test_dropout_masks_differ_between_steps_and_repeat_with_the_seed():
    # A large init makes the logits, and so the loss, sensitive to which activations are dropped;
    # a zero learning rate keeps the params fixed, so losses can differ only through dropout.
    config = run_config("gpt2", (2, 2, 2), dropout=0.1, init_std=0.5)
    config.optim.update(learning_rate=0.0, min_learning_rate=0.0)
    batch = make_batch()
    mesh, steps = compile_run(config)
    state, history = train(mesh, steps, batch, 2)
    _, repeat = train(*compile_run(config), batch, 2)
    clean = jax.device_get(steps.eval(state.params, sharding.global_batch(mesh, batch, BATCH)))
    losses = [m["loss"] for m in history]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)
    for loss in losses:
        assert loss != pytest.approx(clean["nll"] / clean["tokens"], rel=1e-3)
    assert [m["loss"] for m in repeat] == losses


def valid_config():
    c = run_config("gpt2", (2, 2, 2))
    validate(c, num_devices=8)  # the baseline passes, so each error below comes from its change
    return c


@pytest.mark.parametrize("field, value, names", [
    ("model.num_heads", 5, "config.model.num_heads=5"),
    ("mesh.data", 4, "config.mesh"),
    ("train.batch_size", 6, "config.train.batch_size=6"),
    ("optim.learning_rate", -1e-3, "config.optim.learning_rate=-0.001"),
    ("model.num_kv_heads", 1, "config.model.num_kv_heads=1"),
])
def test_validate_names_the_field_of_an_invalid_config(field, value, names):
    c = valid_config()
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(names)):
        validate(c, num_devices=8)


@pytest.mark.parametrize("axes, expected", [
    ((-1, 1, 1), (8, 1, 1)), ((-1, 2, 2), (2, 2, 2)), ((2, -1, 1), (2, 4, 1)),
    ((1, 2, -1), (1, 2, 4)), ((2, 2, 2), (2, 2, 2))])
def test_mesh_shape_fills_the_free_axis_from_the_device_count(axes, expected):
    c = default_config()
    c.mesh.update(dict(zip(("data", "fsdp", "tensor"), axes)))
    assert mesh_shape(c, 8) == expected


@pytest.mark.parametrize("axes", [(-1, 3, 1), (-1, -1, 1), (0, 8, 1)])
def test_mesh_shape_rejects_axes_that_cannot_fill_the_devices(axes):
    c = default_config()
    c.mesh.update(dict(zip(("data", "fsdp", "tensor"), axes)))
    with pytest.raises(ConfigError, match="mesh"):
        mesh_shape(c, 8)


def test_loss_is_the_masked_token_mean_and_z_loss_adds_mean_squared_log_normaliser():
    cfg = ModelConfig.from_config(run_config().model, VOCAB)
    model = Transformer(cfg)
    batch = make_batch()
    params = model.init(jax.random.key(0), batch["inputs"])["params"]
    logits = np.asarray(model.apply({"params": params}, batch["inputs"]), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    weights = batch["mask"]

    objective, (nll_sum, count) = step.loss_sums(nn.unbox(params), model, batch, 1e-2, None)
    assert count == weights.sum()
    np.testing.assert_allclose(nll_sum / count, (nll * weights).sum() / weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(objective - nll_sum, 1e-2 * (log_z ** 2 * weights).sum(), rtol=1e-5)
