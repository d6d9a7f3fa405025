"""The eval binary and `lm.load`: perplexity against a float64 reference, sliding windows, 1 vs 8
devices, sampling from the command line, and one-line errors for bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from compilations import compilations

import lm
from lm import corpus
from lm.checkpoint import load_run_config
from lm.config import default_config
from lm.perplexity import windows
from lm.tokenizer import document_ids
from lm.train import _check_resumable, train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Return the number of items.", "x = 1\n", "Raise ValueError if missing."]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = default_config()
    config.model.update(num_layers=2, num_heads=4, d_model=32, context_length=32)
    config.train.update(steps=10, batch_size=8, log_every=5, eval_every=10, eval_batches=1,
                        checkpoint_every=5, sample_length=8)
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def run(workdir):
    return lm.load(workdir)


def reference_nats(run, ids: np.ndarray, begin: int, target: int) -> float:
    """-log p(ids[target + 1] | ids[begin:target + 1]) in float64, from a zero-padded window."""
    window = np.zeros(run.model.cfg.context_length, np.int32)
    window[:target + 1 - begin] = ids[begin:target + 1]
    logits = run.logits(window)[target - begin].astype(np.float64)
    log_z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    return float(log_z - logits[ids[target + 1]])


def test_perplexity_and_bits_per_byte_match_a_float64_reference(run):
    score = run.perplexity(TEXTS)
    nats = tokens = 0
    for text in TEXTS:
        ids = document_ids(run.tokenizer, text)
        nats += sum(reference_nats(run, ids, 0, j) for j in range(len(ids) - 1))
        tokens += len(ids) - 1
    assert score.tokens == tokens
    assert score.nats == pytest.approx(nats, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert score.bytes == sum(len(t.encode("utf-8")) for t in TEXTS)
    assert score.bits_per_byte == pytest.approx(nats / (math.log(2) * score.bytes), rel=1e-5)


def test_sliding_windows_score_each_token_once_with_at_least_context_minus_stride(run):
    length, stride = run.model.cfg.context_length, 8
    text = " ".join(TEXTS * 4)
    ids = document_ids(run.tokenizer, text)
    score = run.perplexity(text, stride=stride)
    # Target j is scored by the first window that reaches it: the one starting at k * stride.
    begins = [max(0, -(-(j - length + 1) // stride)) * stride for j in range(len(ids) - 1)]
    assert all(j - b >= length - stride or b == 0 for j, b in enumerate(begins))
    nats = sum(reference_nats(run, ids, b, j) for j, b in enumerate(begins))
    assert score.tokens == len(ids) - 1
    assert score.nats == pytest.approx(nats, rel=1e-5)


def test_windows_mask_every_target_exactly_once():
    ids = np.arange(50)
    rows = list(windows(ids, 16, 5))
    scored = np.concatenate([r["targets"][r["mask"] > 0] for r in rows])
    assert scored.tolist() == ids[1:].tolist()


def test_a_document_shorter_than_the_window_scores_the_same_at_any_stride(run):
    scores = [run.perplexity(TEXTS[0], stride=s).nats for s in (1, 5, 32)]
    assert scores == pytest.approx([scores[0]] * 3, rel=1e-6)


def test_perplexity_is_the_same_on_one_device_and_on_an_8_device_mesh(workdir, run):
    one = lm.load(workdir, devices=jax.devices()[:1]).perplexity(TEXTS, stride=8)
    mixed = lm.load(workdir, fsdp=2, tensor=2).perplexity(TEXTS, stride=8)
    eight = run.perplexity(TEXTS, stride=8)
    assert one.tokens == mixed.tokens == eight.tokens
    assert mixed.nats == pytest.approx(one.nats, rel=1e-5)
    assert eight.nats == pytest.approx(one.nats, rel=1e-5)


def test_scoring_other_texts_again_compiles_nothing(run):
    run.perplexity(TEXTS)
    with compilations() as compiled:
        score = run.perplexity(["Another text entirely, longer than the context of 32 tokens."],
                               stride=8)
    assert compiled == [] and score.tokens > 32


def test_load_takes_a_checkpoint_step_directory_or_a_step(workdir):
    assert lm.load(workdir).step == 10
    assert lm.load(workdir, step=5).step == 5
    assert lm.load(workdir / "checkpoints" / "5").step == 5


def test_a_workdir_written_by_an_older_lm_loads_and_resumes_with_todays_defaults(
        tmp_path, workdir, run):
    """Its config.json lacks the fields added since (they take their defaults) and may hold one
    removed since (ignored): lm.load and the train binary's resume check read it alike."""
    saved = json.loads((workdir / "config.json").read_text())
    for section, field in (("mesh", "dcn_data"), ("mesh", "dcn_fsdp"),
                           ("model", "vocab_multiple"), ("model", "attention_impl")):
        del saved[section][field]
    saved["train"]["a_field_removed_since"] = 1
    old = tmp_path / "old"
    shutil.copytree(workdir / "checkpoints" / "10", old / "checkpoints" / "10")
    shutil.copy(workdir / "tokenizer.json", old)
    (old / "config.json").write_text(json.dumps(saved))
    loaded = lm.load(old)
    assert loaded.config.model.vocab_multiple == 128 and loaded.step == 10
    ids = document_ids(run.tokenizer, TEXTS[0])
    np.testing.assert_array_equal(loaded.logits(ids), run.logits(ids))
    _check_resumable(load_run_config(workdir), old)  # nothing that fixes the checkpoints changed


def evaluate(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lm.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_perplexity_binary_scores_the_validation_split_and_writes_json(workdir, run, tmp_path):
    out = tmp_path / "ppl.json"
    result = evaluate(f"--workdir={workdir}", "--mode=perplexity", f"--output_json={out}")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    config = run.config
    docs = corpus.split_documents(corpus.read_documents(config.data), config.data.val_fraction,
                                  config.seed)[1]
    expected = run.perplexity(docs, stride=16)
    assert numbers["tokens"] == expected.tokens and numbers["step"] == 10
    assert numbers["cross_entropy"] == pytest.approx(expected.cross_entropy, rel=1e-5)
    assert numbers["perplexity"] == pytest.approx(math.exp(numbers["cross_entropy"]))
    assert f"perplexity {numbers['perplexity']:.3f}" in result.stderr + result.stdout


def test_sample_binary_takes_the_huggingface_generate_flags(workdir, tmp_path):
    def sample(*flags):
        out = tmp_path / "samples.json"
        result = evaluate(f"--workdir={workdir}", "--mode=sample", "--prompt=def ",
                          "--prompt=The value", *flags, f"--output_json={out}")
        assert result.returncode == 0, result.stderr
        return [s["text"] for s in json.loads(out.read_text())["samples"]]

    drawn = sample("--max_length=12", "--temperature=0.7", "--num_return_sequences=3", "--seed=0")
    assert len(drawn) == 6
    assert sample("--max_length=12", "--temperature=0.7", "--num_return_sequences=3",
                  "--seed=0") == drawn
    greedy = sample("--max_new_tokens=6", "--temperature=0", "--num_return_sequences=2")
    assert greedy[0] == greedy[1] and greedy[2] == greedy[3]


@pytest.mark.parametrize("flags, message", [
    (["--step=999"], "no checkpoint at step 999; it has steps 5, 10"),
    (["--mode=sample", "--prompt=" + "word " * 20, "--max_new_tokens=10"], "exceeds the context"),
    (["--mode=sample", "--temperature=-1"], "temperature=-1.0 must be >= 0"),
    (["--mode=sample", "--top_p=1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--mode=sample", "--top_k=-2"], "top_k=-2 must be >= 0"),
    (["--mode=sample", "--num_return_sequences=0"], "num_return_sequences=0 must be >= 1"),
    (["--mode=sample", "--max_new_tokens=40"], "leave no room for a prompt"),
])
def test_bad_evaluation_input_is_a_one_line_error(workdir, flags, message):
    result = evaluate(f"--workdir={workdir}", *flags)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr


def test_a_too_long_prompt_is_truncated_from_the_left_when_asked(workdir):
    result = evaluate(f"--workdir={workdir}", "--mode=sample", "--prompt=" + "word " * 20,
                      "--max_new_tokens=10", "--truncate_prompt", "--temperature=0")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def special_workdir(tmp_path_factory):
    """A workdir of a random model with a byte-level BPE (HuggingFace `tokenizers`) whose head
    always prefers the special token <|im_start|>; "€" is three tokens (no merge has its bytes)."""
    hf_tokenizers = pytest.importorskip("tokenizers")
    import flax.linen as nn
    import orbax.checkpoint as ocp
    from lm import tokenizer as tokenizers
    from lm.model import ModelConfig, Transformer

    workdir = tmp_path_factory.mktemp("special")
    bpe = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    bpe.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = hf_tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(["alpha bravo charlie delta echo"] * 50, hf_tokenizers.trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = tokenizers.HuggingFaceTokenizer(bpe.to_str(), eos_id=0)
    tokenizers.save(tokenizer, workdir / "tokenizer.json")
    config = default_config()
    config.model.update(num_layers=1, num_heads=4, d_model=32, context_length=32)
    (workdir / "config.json").write_text(config.to_json())
    model = Transformer(ModelConfig.for_run(config, tokenizer.vocab_size, 1))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32), np.int32)))["params"]
    # The final norm outputs e_0 at every position, so the logits are the embeddings' column 0.
    params["final_norm"] = {"scale": np.zeros(32, np.float32),
                            "bias": np.eye(32, dtype=np.float32)[0]}
    params["embed"] = params["embed"].at[bpe.token_to_id("<|im_start|>"), 0].set(100.0)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(workdir / "checkpoints" / "0" / "params", params)
    checkpointer.wait_until_finished()
    return workdir


def test_samples_leave_special_tokens_out_unless_asked(special_workdir):
    run = lm.load(special_workdir)
    assert run.generate("alpha", 5, temperature=0) == [""]
    assert run.generate("alpha", 5, temperature=0, skip_special_tokens=False) == [
        "<|im_start|>" * 5]


def test_a_truncated_prompt_keeps_its_last_token_ids_not_a_reencoding_of_them(special_workdir,
                                                                             tmp_path):
    # Decoding 26 of the 60 ids of 20 "€" starts inside a character: U+FFFD, which re-encodes as
    # three ids per cut byte, longer than the room.
    out = tmp_path / "samples.json"
    result = evaluate(f"--workdir={special_workdir}", "--mode=sample", "--prompt=" + "€" * 20,
                      "--max_new_tokens=5", "--truncate_prompt", "--temperature=0",
                      f"--output_json={out}")
    assert result.returncode == 0, result.stderr
    [sample] = json.loads(out.read_text())["samples"]
    assert sample["prompt"].endswith("€" * 9) and sample["text"] == ""


def test_a_workdir_without_checkpoints_or_an_empty_data_file_is_a_one_line_error(tmp_path, workdir):
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for flags, message in ([f"--workdir={tmp_path}"], "has no checkpoint yet"),\
                          ([f"--workdir={tmp_path / 'nowhere'}"], "is not a run's workdir"),\
                          ([f"--workdir={workdir}", f"--data={empty}"], "empty"):
        result = evaluate(*flags)
        assert result.returncode != 0
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, result.stderr
