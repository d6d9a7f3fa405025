"""HuggingFace interop: GPT-2 and LLaMA built with transformers, imported, compared logit by logit,
exported back, round-tripped, sampled, fine-tuned; tokenizers; one-line errors for bad input.

Nothing is downloaded: the models are small random ones (perturbed away from initialisation, so a
swapped or transposed tensor cannot hide behind norm scales of 1 and biases of 0) and the BPE
tokenizer is trained here.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from hf_models import (LINES, LLAMA3_ROPE, ROOT, VOCAB, WORDS, hf_logits, last_line,  # noqa: E402
                       llama3_model, llama3_tokenizer, lm_logits, next_token_loss, perturb, run,
                       token_ids, train_briefly, train_bpe)
from trees import assert_trees_close  # noqa: E402

import lm  # noqa: E402
from lm import fs, hf  # noqa: E402
from lm import tokenizer as tokenizers  # noqa: E402
from lm.checkpoint import Checkpointer, load_run_config, restore_params  # noqa: E402
from lm.config import ConfigError, default_config  # noqa: E402
from lm.model import ModelConfig, Transformer, rope_frequencies  # noqa: E402
from lm import sampling  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A corpus of random words (predictable inside a word) and a byte-level BPE trained on it."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    corpus = root / "words.txt"
    corpus.write_text(" ".join(rng.choice(WORDS, 20_000)) + "\n")
    bpe = train_bpe([corpus.read_text()[:20_000]] + LINES * 20, VOCAB, ["<|endoftext|>"])
    bpe.save(str(root / "tokenizer.json"))
    return corpus, root / "tokenizer.json"


@pytest.fixture(scope="module")
def gpt2(data, tmp_path_factory):
    """GPT-2, trained a little on the words with the BPE tokenizer, saved with it."""
    corpus, tokenizer_file = data
    out = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2,
                                     n_head=4, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    perturb(model, 0)
    bpe = hf_tokenizers.Tokenizer.from_file(str(tokenizer_file))
    train_briefly(model, np.array(bpe.encode(corpus.read_text()).ids))
    model.save_pretrained(out)
    shutil.copy(tokenizer_file, out / "tokenizer.json")
    return model, out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """LLaMA with grouped-query attention, an untied head, a non-default rope_theta and epsilon,
    and a sentencepiece tokenizer.model."""
    out = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    perturb(model, 1)
    model.eval()
    model.save_pretrained(out)
    spm = tokenizers.train_sentencepiece([" ".join(WORDS)] * 50, vocab_size=290)
    (out / "tokenizer.model").write_bytes(spm.model_proto)
    return model, out


@pytest.fixture(scope="module")
def llama3(data, tmp_path_factory):
    """A bfloat16 Llama 3.x-style checkpoint with its tokenizer.json; the reference is the same
    bfloat16 weights computed in float32 (as lm computes them by default), loaded afresh: a model
    cast to bfloat16 and back keeps its rope frequencies rounded to bfloat16."""
    out = tmp_path_factory.mktemp("llama3")
    llama3_model(2).save_pretrained(out)
    llama3_tokenizer(data[1], out)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), out


@pytest.fixture(scope="module")
def qwen2(data, tmp_path_factory):
    """Qwen2: biases on q/k/v alone, an untied head, a large rope_theta, the byte-level BPE."""
    out = tmp_path_factory.mktemp("qwen2")
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0)
    model = transformers.Qwen2ForCausalLM(config)
    perturb(model, 3)
    model.eval()
    model.save_pretrained(out)
    shutil.copy(data[1], out / "tokenizer.json")
    return model, out


def import_into(model_and_folder, workdir):
    """(transformers model, its folder, the imported workdir, lm config, lm params)."""
    model, folder = model_and_folder
    config = hf.import_checkpoint(folder, workdir)
    cfg = ModelConfig.from_config(config.model, config.model.vocab_size)
    return model, folder, workdir, cfg, restore_params(workdir, hf.param_shapes(cfg))


@pytest.fixture(scope="module")
def imports(request, tmp_path_factory):
    """imports(NAME): the model fixture NAME imported, once: (model, folder, workdir, cfg, params)."""
    return functools.cache(lambda name: import_into(request.getfixturevalue(name),
                                                    tmp_path_factory.mktemp(f"{name}_lm")))


@pytest.fixture(scope="module")
def exports(imports, tmp_path_factory):
    """exports(NAME): that import exported back into a transformers folder, once."""
    def export(name):
        out = tmp_path_factory.mktemp(f"{name}_exported")
        hf.export_checkpoint(imports(name)[2], out)
        return out
    return functools.cache(export)


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama3", "qwen2"])
def architecture(request):
    return request.param


@pytest.fixture(scope="module")
def imported(architecture, imports):
    return imports(architecture)


@pytest.fixture(scope="module")
def exported(architecture, exports):
    return exports(architecture)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def imported_gpt2_or_llama(request, imports):
    return imports(request.param)


def test_imported_model_matches_transformers_logits_and_loss(imported):
    model, _, _, cfg, params = imported
    ids = token_ids((2, 24))
    ours, theirs = lm_logits(cfg, params, ids), hf_logits(model, ids)
    print(f"{type(model).__name__}: max |logit difference| {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    with torch.no_grad():
        hf_loss = model(torch.tensor(ids, dtype=torch.long),
                        labels=torch.tensor(ids, dtype=torch.long)).loss.item()
    assert next_token_loss(ours.astype(np.float64), ids) == pytest.approx(hf_loss, abs=1e-5)


def test_import_writes_the_workdir_contract(imported):
    model, folder, workdir, cfg, params = imported
    config = json.loads((workdir / "config.json").read_text())
    assert set(config) == set(default_config())
    assert config["model"]["vocab_size"] == model.config.vocab_size
    assert config["model"]["num_layers"] == 2
    assert config["model"]["num_kv_heads"] == (getattr(model.config, "num_key_value_heads", 0)
                                               or model.config.num_attention_heads)
    assert Path(config["data"]["tokenizer"]) == (workdir / "tokenizer.json").resolve()
    tok = tokenizers.load(workdir / "tokenizer.json")
    if (folder / "tokenizer.model").exists():  # the LLaMA: sentencepiece, embedded as it was
        assert isinstance(tok, tokenizers.SentencePieceTokenizer)
        assert tok.model_proto == (folder / "tokenizer.model").read_bytes()
    else:
        assert isinstance(tok, tokenizers.HuggingFaceTokenizer)
        assert tok.eos_id == model.config.eos_token_id
    assert (workdir / "checkpoints" / "0" / "params").is_dir()
    # A run in this workdir passes over the parameters-only step (init_from loads it).
    checkpointer = Checkpointer(workdir / "checkpoints", default_config().train)
    assert checkpointer.steps() == [0] and checkpointer.restore_latest(None) is None
    checkpointer.close()
    assert (workdir / "checkpoints" / "0" / "params").is_dir()
    assert jax.tree.structure(params) == jax.tree.structure(hf.param_shapes(cfg))
    assert params["layers"]["attn"]["query"]["kernel"].shape[0] == 2  # scanned layout


def test_exported_model_loads_in_transformers_with_the_same_logits(imported, exported):
    model, folder, _, cfg, params = imported
    loaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    assert type(loaded) is type(model)
    ids = token_ids((2, 24), seed=1)
    diff = np.abs(hf_logits(loaded, ids) - lm_logits(cfg, params, ids)).max()
    print(f"exported {type(model).__name__}: max |logit difference| {diff:.2e}")
    assert diff <= 1e-4
    for name in ("tokenizer.json", "tokenizer.model"):  # the tokenizer goes back as it came
        if (folder / name).exists():
            assert (exported / name).read_bytes() == (folder / name).read_bytes()
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == model.config.eos_token_id
    # The weights go back in the checkpoint's dtype (the bfloat16 Llama's stay bfloat16).
    stored = {e["dtype"] for e in hf._safetensors_header(folder / "model.safetensors")[0].values()}
    assert {e["dtype"] for e in hf._safetensors_header(exported / "model.safetensors")[0].values()
            } == stored
    assert json.loads((exported / "config.json").read_text())["dtype"] == cfg.param_dtype


def test_import_export_import_round_trips_exactly(imported, exported, tmp_path):
    _, _, _, cfg, params = imported
    config = hf.import_checkpoint(exported, tmp_path / "again")
    assert ModelConfig.from_config(config.model, config.model.vocab_size) == cfg
    assert_trees_close(restore_params(tmp_path / "again", hf.param_shapes(cfg)), params)


def greedy(model, params, prompt, num_new):
    """lm's greedy decoding: KV-cache prefill, then one token per step."""
    options = sampling.SamplingOptions(temperature=0.0)
    return np.asarray(sampling.generate(model, params, [prompt], num_new, options=options)[0])


def test_greedy_continuation_matches_transformers_generate(imported):
    model, _, _, cfg, params = imported
    prompt = token_ids((6,), seed=2)
    ours = greedy(Transformer(cfg), params, prompt, 12)
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=12,
                             do_sample=False, pad_token_id=0)
    theirs = out[0, len(prompt):].numpy()
    ours = ours[:len(theirs)]  # transformers may stop at the end-of-text token; lm here does not
    if not np.array_equal(ours, theirs):  # only a near-tie may send float noise another way
        first = int(np.argmax(ours != theirs))
        top2 = np.sort(hf_logits(model, np.concatenate([prompt, theirs[:first]])[None])[0, -1])
        assert top2[-1] - top2[-2] < 1e-4, (ours, theirs)


def test_sharded_safetensors_and_pytorch_bin_import_the_same(imports, tmp_path):
    model, folder, _, cfg, params = imports("gpt2")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for source in (sharded, pickled):
        hf.import_checkpoint(source, tmp_path / f"{source.name}_lm")
        assert_trees_close(restore_params(tmp_path / f"{source.name}_lm", hf.param_shapes(cfg)),
                           params)


def test_a_bfloat16_checkpoint_stays_bfloat16_unless_asked(imports, tmp_path):
    model, folder, _, cfg, params = imports("llama3")
    assert cfg.param_dtype == "bfloat16"
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(params)} == {"bfloat16"}
    config = hf.import_checkpoint(folder, tmp_path / "f32", dtype="float32")
    assert config.model.param_dtype == "float32"
    as_f32 = ModelConfig.from_config(config.model, config.model.vocab_size)
    assert_trees_close(restore_params(tmp_path / "f32", hf.param_shapes(as_f32)),
                       jax.tree.map(lambda x: np.asarray(x, np.float32), params))
    # A bfloat16 pytorch_model.bin (its config.json says so) reads the same.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
               pickled / "pytorch_model.bin")
    hf.import_checkpoint(pickled, tmp_path / "pickled_lm")
    assert_trees_close(restore_params(tmp_path / "pickled_lm", hf.param_shapes(cfg)), params)


def test_export_shards_weights_over_max_shard_size_as_transformers_does(imports, tmp_path):
    model, _, workdir, cfg, params = imports("llama3")
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier export's weights")
    hf.export_checkpoint(workdir, out, max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    sizes = {s.name: sum(np.prod(e["shape"]) * 2 for e in hf._safetensors_header(s)[0].values())
             for s in shards}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert all(size <= 40_000 or len(hf._safetensors_header(out / name)[0]) == 1
               for name, size in sizes.items())  # only a tensor over the limit stands alone
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = token_ids((2, 24), seed=3)
    np.testing.assert_allclose(hf_logits(loaded, ids), hf_logits(model, ids), atol=1e-5, rtol=0)
    hf.import_checkpoint(out, tmp_path / "again")
    assert_trees_close(restore_params(tmp_path / "again", hf.param_shapes(cfg)), params)


def test_a_sharded_export_into_a_bucket_imports_back_by_ranged_reads(imports, gcs_server, tmp_path):
    _, _, workdir, cfg, params = imports("llama3")
    hf.export_checkpoint(workdir, "gs://bucket/llama3", max_shard_size="40KB")
    names = {p.name for p in fs.listdir("gs://bucket/llama3")}
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    hf.import_checkpoint("gs://bucket/llama3", tmp_path / "again")
    assert_trees_close(restore_params(tmp_path / "again", hf.param_shapes(cfg)), params)


@pytest.mark.parametrize("rope", [
    LLAMA3_ROPE,
    # Llama 3.1 8B's values, at its head dimension
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
         high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="default", rope_theta=1e6)])
def test_rope_frequencies_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = 128 if rope["rope_theta"] == 500000.0 else 16
    hf_config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                         rope_parameters=rope)
    config = default_config()
    config.model.update(hf._rope_fields(hf_config.to_dict(), []), d_model=4 * head_dim,
                        num_heads=4, position="rope")
    ours = rope_frequencies(ModelConfig.from_config(config.model, 8))
    if rope["rope_type"] == "default":
        theirs = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=2e-6)
    if rope["rope_type"] == "llama3":  # all three bands: kept, blended, divided by the factor
        plain = rope["rope_theta"] ** (-np.arange(head_dim // 2) / (head_dim // 2))
        ratio = plain / ours
        assert np.isclose(ratio, 1).any() and np.isclose(ratio, rope["factor"]).any()
        assert ((ratio > 1.01) & (ratio < rope["factor"] - 0.01)).any()


def test_mistral_with_a_window_longer_than_its_use_and_linear_rope_scaling(tmp_path):
    """Mistral's sliding window caps the imported context (within it the window never acts); its
    logits and greedy continuation are transformers'; it exports as the LLaMA it then equals."""
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=24, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000.0})
    model = transformers.MistralForCausalLM(config)
    perturb(model, 4)
    model.eval().save_pretrained(tmp_path / "mistral")
    _, _, workdir, cfg, params = import_into((model, tmp_path / "mistral"), tmp_path / "lm")
    assert (cfg.context_length, cfg.rope_scaling, cfg.rope_scaling_factor) == (24, "linear", 2.0)
    ids = token_ids((2, 24), seed=5)
    ours, theirs = lm_logits(cfg, params, ids), hf_logits(model, ids)
    print(f"MistralForCausalLM: max |logit difference| {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # Past the window transformers' model does differ: why the context stops there.
    longer, unwindowed = token_ids((1, 40), seed=5), dataclasses.replace(cfg, context_length=64)
    assert np.abs(hf_logits(model, longer) - lm_logits(unwindowed, params, longer))[0, 30:].max() > 1e-3
    prompt = token_ids((6,), seed=6)
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompt[None]), max_new_tokens=12, do_sample=False,
                                pad_token_id=0)[0, 6:].numpy()
    assert greedy(Transformer(cfg), params, prompt, 12)[:len(theirs)].tolist() == theirs.tolist()
    assert hf.export_checkpoint(workdir, tmp_path / "out") == hf.LLAMA
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    np.testing.assert_allclose(hf_logits(loaded, ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_a_native_lm_model_exports_unrolled_tied_with_biases(tmp_path):
    """A LLaMA-style lm model with every bias, a tied head, unrolled layers and a padded vocab."""
    config = default_config()
    config.model.update(num_layers=2, num_heads=4, num_kv_heads=2, d_model=32, context_length=16,
                        norm="rmsnorm", position="rope", mlp="swiglu", use_bias=True,
                        tie_embeddings=True, scan_layers=False)
    config.data.tokenizer = "byte"
    cfg = ModelConfig.from_config(config.model, 384)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.3,
                          hf.param_shapes(cfg))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(config.to_json_best_effort())
    tokenizers.save(tokenizers.ByteTokenizer(), tmp_path / "run" / "tokenizer.json")
    hf._save_params(params, tmp_path / "run" / "checkpoints", step=7)
    assert hf.export_checkpoint(tmp_path / "run", tmp_path / "out", step=7) == hf.LLAMA
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.attention_bias and loaded.config.tie_word_embeddings
    assert loaded.config.vocab_size == 384 and loaded.config.eos_token_id == 256
    ids = token_ids((2, 16))
    np.testing.assert_allclose(hf_logits(loaded, ids), lm_logits(cfg, params, ids), atol=1e-4)


def test_imported_workdir_fine_tunes_from_the_command_line(gpt2, data, tmp_path):
    """The CLI import, then `lm.train` from it: the first loss is the imported model's loss."""
    model, folder = gpt2
    corpus, _ = data
    result = run("lm.hf", "import", f"--hf_dir={folder}", f"--workdir={tmp_path / 'imported'}")
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout
    result = run("lm.train", f"--config=configs/imported.py:{tmp_path / 'imported'}",
                 f"--workdir={tmp_path / 'run'}", f"--config.data.path={corpus}",
                 "--config.train.steps=2", "--config.train.batch_size=8",
                 "--config.train.log_every=1", "--config.train.eval_every=2",
                 "--config.train.eval_batches=1", "--config.train.sample_length=8",
                 "--config.optim.learning_rate=1e-4", "--config.optim.warmup_steps=1")
    assert result.returncode == 0, result.stderr
    assert "parameters initialised from" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in records if r.get("step") == 1 and "loss" in r)
    ids = tokenizers.load(tmp_path / "imported" / "tokenizer.json").encode(corpus.read_text())
    windows = np.stack([ids[s:s + 32] for s in range(0, 64 * 32, 32)])
    expected = next_token_loss(hf_logits(model, windows).astype(np.float64), windows)
    assert first == pytest.approx(expected, abs=0.3)
    assert first < math.log(VOCAB) - 2, result.stdout
    # The fine-tuned run (saved from an 8-device mesh) exports like the import did.
    hf.export_checkpoint(tmp_path / "run", tmp_path / "exported")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    cfg = ModelConfig.from_config(load_run_config(tmp_path / "run").model, VOCAB)
    tuned = restore_params(tmp_path / "run", hf.param_shapes(cfg))
    np.testing.assert_allclose(hf_logits(loaded, windows[:2]), lm_logits(cfg, tuned, windows[:2]),
                               atol=1e-4)


def test_bpe_tokenizer_encodes_like_huggingface_and_round_trips(imports, exports):
    _, folder, workdir, _, _ = imports("gpt2")
    ours = tokenizers.load(workdir / "tokenizer.json")
    reference = hf_tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(exports("gpt2"))
    texts = LINES + [" ".join(WORDS), "<|endoftext|> a special token"]
    for text in texts:
        assert ours.encode(text).tolist() == reference.encode(text).ids
        assert ours.encode(text).tolist() == auto.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == text
    assert [x.tolist() for x in ours.encode_batch(texts)] == [ours.encode(t).tolist() for t in texts]
    assert (ours.vocab_size, ours.eos_id, ours.bos_id) == (VOCAB, 0, 0)
    assert auto.eos_token == "<|endoftext|>"
    # A HuggingFace tokenizer.json also works directly as config.data.tokenizer (an imported
    # model's alone starts prompts as transformers does).
    direct = tokenizers.fit_tokenizer(str(folder / "tokenizer.json"), [])
    assert {**direct.to_json(), "hf_template": True} == ours.to_json()


def test_sentencepiece_tokenizer_exports_to_an_equal_transformers_tokenizer(imports, exports):
    ours = tokenizers.load(imports("llama")[2] / "tokenizer.json")
    auto = transformers.AutoTokenizer.from_pretrained(exports("llama"))
    for text in [" ".join(WORDS), "  golf\thotel ", "unseen: wörld 🎉"]:
        assert auto.encode(text, add_special_tokens=False) == ours.encode(text).tolist()
        assert auto.decode(ours.encode(text)) == ours.decode(ours.encode(text)) == text
    assert (auto.eos_token_id, auto.bos_token_id) == (ours.eos_id, ours.bos_id) == (2, 1)


def write_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA_CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=64,
                    intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("config, message", [
    (dict(architectures=["BertForMaskedLM"]), "architecture BertForMaskedLM is not supported"),
    ({**LLAMA_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
     "rope scaling 'yarn' \\(supported: default, linear, llama3\\)"),
    ({**LLAMA_CONFIG, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     "rope scaling 'llama3' without 'low_freq_factor'"),
    ({**LLAMA_CONFIG, "rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 4.0}},
     "rope_low_freq_factor=4.0 and rope_high_freq_factor=4.0 must satisfy 0 < low < high"),
    ({**LLAMA_CONFIG, "hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({**LLAMA_CONFIG, "head_dim": 32}, "head_dim=32"),
    ({**LLAMA_CONFIG, "attention_bias": True}, "attention_bias=True but mlp_bias=None"),
    (dict(architectures=["GPT2LMHeadModel"], activation_function="relu", n_embd=64),
     "activation_function='relu'"),
    (LLAMA_CONFIG, "has no weights: expected model.safetensors"),
])
def test_unsupported_or_incomplete_folders_are_one_line_errors(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message) as error:
        hf.import_checkpoint(write_config(tmp_path / "hf", **config), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_wrong_shape_and_missing_tensors_are_named(gpt2, tmp_path):
    _, folder = gpt2
    tensors = load_file(folder / "model.safetensors")
    bad = shutil.copytree(folder, tmp_path / "bad")
    name = "transformer.h.1.attn.c_attn.weight"
    save_file({**tensors, name: tensors[name][:, :-3]}, bad / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"{name} has shape \[64, 189\], but config.json "
                                          rf"implies \[64, 192\]"):
        hf.import_checkpoint(bad, tmp_path / "out")
    save_file({k: v for k, v in tensors.items() if k != name}, bad / "model.safetensors")
    with pytest.raises(ConfigError, match=f"1 tensors missing from the weights, e.g. {name}"):
        hf.import_checkpoint(bad, tmp_path / "out")


def test_export_of_a_model_neither_class_has_is_an_error(tmp_path):
    config = default_config()
    config.model.update(position="rope", vocab_size=128, num_layers=1)
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(ConfigError, match="maps onto neither GPT2LMHeadModel"):
        hf.export_checkpoint(tmp_path, tmp_path / "out")


def test_command_line_errors(tmp_path):
    result = run("lm.hf", "import", f"--hf_dir={tmp_path}", f"--workdir={tmp_path / 'out'}")
    assert last_line(result).startswith(f"error: {tmp_path / 'config.json'} does not exist")
    # Without tokenizers installed: say what to install (a stand-in module that fails to import).
    (tmp_path / "hide" / "tokenizers").mkdir(parents=True)
    (tmp_path / "hide" / "tokenizers" / "__init__.py").write_text("raise ImportError('hidden')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "hide"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "lm.hf", "export", f"--workdir={tmp_path}",
                             f"--hf_dir={tmp_path / 'out'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert "pip install tokenizers huggingface_hub" in last_line(result)


def test_lm_load_and_the_eval_binary_work_on_an_imported_workdir(imported_gpt2_or_llama):
    model, _, workdir, _, _ = imported_gpt2_or_llama
    loaded = lm.load(workdir)
    ids = token_ids((2, 24))
    np.testing.assert_allclose(loaded.logits(ids), hf_logits(model, ids), atol=1e-4, rtol=0)
    assert loaded.perplexity("a short text").tokens > 0
    result = run("lm.evaluate", f"--workdir={workdir}", "--mode=sample", "--prompt=a",
                 "--max_new_tokens=5", "--temperature=0", "--num_return_sequences=2")
    assert result.returncode == 0, result.stderr
