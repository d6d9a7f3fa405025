"""KV-cache decoding against full recomputation, and the sampling rules (greedy, temperature,
top-k, top-p, seeds, end of document) against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compilations import compilations
from test_model import LENGTH, VARIANTS, VOCAB, logits, model_config, random_params, random_tokens

from lm import sharding
from lm.config import default_config
from lm.model import Transformer, init_cache
from lm.sampling import SamplingOptions, choose, decoding_layout, filter_logits, generate

PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 4, 2], [11]]


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_gives_the_logits_of_full_recomputation(variant, scan):
    cfg = model_config(variant, scan_layers=scan)
    params, apply = random_params(cfg), jax.jit(Transformer(cfg).apply)
    tokens = random_tokens((3, LENGTH))
    full = logits(cfg, params, tokens)
    lengths = np.array([4, 9, 1])
    # Right-padded prompts whose padding differs from the tokens decoded later: a leak would show.
    prompts = np.where(np.arange(9) < lengths[:, None], tokens[:, :9], VOCAB - 1)
    positions = np.broadcast_to(np.arange(9), prompts.shape)
    prefill, cache = apply({"params": params}, prompts, positions, cache=init_cache(cfg, 3, LENGTH))
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(prefill[row, :n], full[row, :n], atol=2e-5, rtol=1e-5)
    for position in range(9, LENGTH):  # each row continues from its own length
        at = lengths + position - 9
        step, cache = apply({"params": params}, tokens[np.arange(3), at][:, None], at[:, None],
                            cache=cache)
        np.testing.assert_allclose(step[:, 0], full[np.arange(3), at], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_decoding_layout_computes_the_same_logits(variant, scan):
    cfg = model_config(variant, scan_layers=scan)
    params, tokens = random_params(cfg), random_tokens((2, LENGTH))
    model, laid_out = decoding_layout(Transformer(cfg), params)
    assert not model.cfg.scan_layers and not model.cfg.tie_embeddings
    assert "layers" not in laid_out and f"layers_{cfg.num_layers - 1}" in laid_out
    np.testing.assert_allclose(jax.jit(model.apply)({"params": laid_out}, tokens),
                               logits(cfg, params, tokens), atol=2e-5, rtol=1e-5)
    if jax.default_backend() == "cpu":  # kernels stored [fan_out, fan_in]
        assert laid_out["lm_head"]["kernel"].shape == (cfg.vocab_size, cfg.d_model)
        assert laid_out["layers_0"]["attn"]["out"]["kernel"].shape == (cfg.d_model,) * 2


def test_sampling_takes_either_layout_and_laying_out_twice_changes_nothing(llama):
    model, params = llama
    laid_model, laid_params = decoding_layout(model, params)
    again = decoding_layout(laid_model, laid_params)
    assert again[0] is laid_model and again[1] is laid_params
    for seed in (0, 1):
        assert ([r.tolist() for r in generate(model, params, PROMPTS, 8, seed=seed)]
                == [r.tolist() for r in generate(laid_model, laid_params, PROMPTS, 8, seed=seed)])


def greedy_by_recomputation(cfg, params, prompt, num_new):
    buffer = np.zeros((1, LENGTH), np.int32)  # one shape, one compilation; causality hides the tail
    buffer[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + num_new):
        buffer[0, n] = np.argmax(logits(cfg, params, buffer)[0, n - 1])
    return buffer[0, len(prompt):len(prompt) + num_new].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_of_a_ragged_batch_equals_greedy_recomputation(variant):
    cfg = model_config(variant)
    params = random_params(cfg)
    out = generate(Transformer(cfg), params, PROMPTS, 8, options=SamplingOptions(temperature=0))
    for prompt, row in zip(PROMPTS, out):
        assert row.tolist() == greedy_by_recomputation(cfg, params, prompt, 8)


@pytest.fixture(scope="module")
def llama():
    cfg = model_config("llama")
    return Transformer(cfg), random_params(cfg)


def test_greedy_is_repeatable_and_equals_top_k_1_and_a_vanishing_temperature(llama):
    model, params = llama
    greedy = generate(model, params, PROMPTS, 8, options=SamplingOptions(temperature=0))
    again = generate(model, params, PROMPTS, 8, options=SamplingOptions(temperature=0))
    top1 = generate(model, params, PROMPTS, 8, options=SamplingOptions(top_k=1), seed=3)
    cold = generate(model, params, PROMPTS, 8, options=SamplingOptions(temperature=1e-4), seed=4)
    for rows in (again, top1, cold):
        assert [r.tolist() for r in rows] == [r.tolist() for r in greedy]


def test_a_seed_fixes_the_sample_and_another_seed_changes_it(llama):
    model, params = llama
    draw = lambda seed: [r.tolist() for r in generate(model, params, PROMPTS, 8, seed=seed)]
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_a_row_stops_at_the_end_of_document_token(llama):
    model, params = llama
    free = generate(model, params, PROMPTS, 8, options=SamplingOptions(temperature=0))
    eos = int(free[0][3])  # make row 0's fourth token the end-of-document id
    stopped = generate(model, params, PROMPTS, 8, options=SamplingOptions(temperature=0),
                       eos_id=eos)
    for row, full in zip(stopped, free):
        cut = np.flatnonzero(full == eos)
        assert row.tolist() == full[:cut[0] if len(cut) else None].tolist()
    assert stopped[0].tolist() == free[0][:3].tolist()


def on_a_mesh(model, params):
    """A (2, 2, 2) mesh and the parameters sharded on it."""
    config = default_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config)
    with jax.set_mesh(mesh):
        boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))
    return mesh, jax.device_put(params, sharding.tree_shardings(mesh, boxed["params"]))


def test_generation_on_an_8_device_mesh_equals_one_device(llama):
    model, params = llama
    mesh, sharded = on_a_mesh(model, params)
    options = SamplingOptions(temperature=0.8, top_k=20)
    single = generate(model, params, PROMPTS, 8, options=options, seed=5)
    meshed = generate(model, sharded, PROMPTS, 8, options=options, seed=5, mesh=mesh)
    assert [r.tolist() for r in meshed] == [r.tolist() for r in single]


def test_new_sampling_options_and_streamers_reuse_the_compiled_decoder(llama):
    """Streamed on an 8-device mesh (JAX orders callbacks on one device only): each call's streamer
    gets its own rows, in step order."""
    model, params = llama
    mesh, sharded = on_a_mesh(model, params)
    generate(model, sharded, PROMPTS, 8, options=SamplingOptions(0.8), on_token=lambda _: None,
             mesh=mesh)
    with compilations() as compiled:
        for options in (SamplingOptions(0.5, top_p=0.9), SamplingOptions(1.3, top_k=20),
                        SamplingOptions(0.7, top_k=5, top_p=0.95), SamplingOptions(0.0)):
            streamed = []
            rows = generate(model, sharded, PROMPTS, 8, options=options, mesh=mesh,
                            on_token=streamed.append)
            np.testing.assert_array_equal(np.stack(streamed, 1)[:len(PROMPTS)], rows)
    assert compiled == []


def test_padding_ids_beyond_the_tokenizer_vocabulary_are_never_chosen(llama):
    model, params = llama
    out = generate(model, params, PROMPTS, 8, valid_vocab=10, seed=2)
    assert all(row.max() < 10 for row in out)


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda p: set(np.flatnonzero(np.isfinite(filter_logits(logits, top_p=p))).tolist())
    assert kept(0.5) == {1}
    assert kept(0.51) == {1, 3}
    assert kept(0.8) == {1, 3}
    assert kept(0.81) == {1, 3, 2}
    assert kept(0.96) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}


def test_top_k_keeps_the_k_largest_logits():
    logits = jnp.array([0.1, 3.0, -1.0, 2.0, 0.5])
    assert np.flatnonzero(np.isfinite(filter_logits(logits, top_k=2))).tolist() == [1, 3]


def test_sampled_frequencies_follow_the_tempered_softmax():
    logits = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5])
    options, n = SamplingOptions(temperature=0.7), 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: choose(logits[None], k, options, valid_vocab=5)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=5) / n
    expected = np.asarray(jax.nn.softmax(logits / 0.7))
    # Four standard errors per token: fails by chance about once in 3,000 runs, never with a bug.
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / n))


@pytest.mark.parametrize("options, message", [
    (SamplingOptions(temperature=-1), "temperature"), (SamplingOptions(top_k=-1), "top_k"),
    (SamplingOptions(top_p=0), "top_p"), (SamplingOptions(top_p=1.5), "top_p")])
def test_invalid_sampling_options_are_refused(llama, options, message):
    with pytest.raises(ValueError, match=message):
        generate(*llama, PROMPTS, 4, options=options)


def test_a_prompt_and_continuation_longer_than_the_context_is_refused(llama):
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(*llama, [[1] * (LENGTH - 3)], 4)


def test_asking_for_no_new_tokens_is_refused(llama):
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        generate(*llama, PROMPTS, 0)
