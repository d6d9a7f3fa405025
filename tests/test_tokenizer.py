"""Tokenizers: exact round trips on any Unicode, sentencepiece training from Python and the shell."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm import tokenizer as tokenizers
from lm.config import ConfigError, default_config
from lm.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Съешь же ещё этих мягких французских булок.",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "الحمد لله رب العالمين",
    "emoji 🎉🚀 and flags 🇫🇷, family 👨‍👩‍👧",
]
HARD = [
    "a\tb\r\nc\x00d\x07 double  spaces   and trailing  ",
    "combining: e\u0301 n\u0303 \u0915\u094d\u0937, zero width: a\u200bb",
    "never seen: ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 🦑",
    "\n\nleading newlines and a lone surrogate-free astral 𐍈",
    "",
]


@pytest.fixture(scope="module")
def sentencepiece():
    return tokenizers.train_sentencepiece(LINES * 50, vocab_size=400)


@pytest.mark.parametrize("text", LINES + HARD)
def test_sentencepiece_round_trips_any_text_exactly(sentencepiece, text):
    assert sentencepiece.decode(sentencepiece.encode(text)) == text


@pytest.mark.parametrize("text", LINES + HARD)
def test_byte_tokenizer_round_trips_any_text_exactly(text):
    byte = tokenizers.ByteTokenizer()
    assert byte.decode(byte.encode(text)) == text


def test_char_tokenizer_round_trips_its_corpus_and_names_an_unseen_character():
    char = tokenizers.CharTokenizer.fit(LINES)
    assert all(char.decode(char.encode(line)) == line for line in LINES)
    with pytest.raises(ConfigError, match="'☃' is not in this run's character vocabulary"):
        char.encode("☃")


def test_saved_tokenizers_load_back_identical(sentencepiece, tmp_path):
    for tokenizer in (sentencepiece, tokenizers.CharTokenizer.fit(LINES),
                      tokenizers.ByteTokenizer()):
        tokenizers.save(tokenizer, tmp_path / "tokenizer.json")
        loaded = tokenizers.load(tmp_path / "tokenizer.json")
        assert loaded.to_json() == tokenizer.to_json()
        assert list(loaded.encode(LINES[3])) == list(tokenizer.encode(LINES[3]))


def test_sentencepiece_reserves_special_ids_and_user_symbols(sentencepiece):
    assert (sentencepiece.bos_id, sentencepiece.eos_id, sentencepiece.pad_id) == (1, 2, 3)
    assert sentencepiece.vocab_size == 400
    special = tokenizers.train_sentencepiece(LINES * 50, 400, user_defined_symbols=["<sep>"])
    assert list(special.encode("<sep>")) == [4]
    assert len(special.encode_batch(["a b", "c"])) == 2


def test_a_vocabulary_the_corpus_cannot_support_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot train a vocabulary of 50"):
        tokenizers.train_sentencepiece(LINES * 50, vocab_size=50)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_cli_trains_a_model_that_loads_and_round_trips(tmp_path, model_type):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, line in enumerate(LINES):
        (corpus / f"{i}.txt").write_text(line * 40 + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "lm.tokenizer", f"--input={corpus}/*.txt",
         f"--model_prefix={tmp_path}/spm/model", "--vocab_size=390",
         f"--model_type={model_type}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    tokenizer = tokenizers.SentencePieceTokenizer.from_file(tmp_path / "spm" / "model.model")
    assert tokenizer.vocab_size == 390
    assert all(tokenizer.decode(tokenizer.encode(t)) == t for t in LINES + HARD)


def test_tokenizer_cli_rejects_a_glob_matching_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lm.tokenizer", f"--input={tmp_path}/none/*.txt",
         f"--model_prefix={tmp_path}/m"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --input=")


def test_model_vocabulary_is_padded_or_checked_against_the_tokenizer():
    config = default_config()
    assert ModelConfig.for_run(config, 500, tensor=1).vocab_size == 512
    config.model.vocab_size = 300
    with pytest.raises(ConfigError, match="vocab_size=300 is smaller than the tokenizer's 500"):
        ModelConfig.for_run(config, 500, tensor=1)


def test_train_n_in_the_config_trains_on_the_training_split_only(tmp_path):
    from lm import corpus, prepare

    docs = [f"document {i}: " + LINES[i % len(LINES)] * 5 for i in range(40)]
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "docs" / f"{i:02}.txt").write_text(doc)
    config = default_config().data
    config.update(path=str(tmp_path / "docs"), tokenizer="train:420", val_fraction=0.1)
    prepare.prepare(config, 0, tmp_path / "prepared")
    tokenizer = prepare.load(tmp_path / "prepared").tokenizer
    assert tokenizer.vocab_size == 420
    assert json.loads(json.dumps(tokenizer.to_json()))["type"] == "sentencepiece"
    train_docs, val_docs = corpus.split_documents(corpus.read_documents(config), 0.1, 0)
    assert tokenizer.to_json() == tokenizers.train_sentencepiece(train_docs, 420).to_json()


def test_every_tokenizer_has_the_special_ids_and_a_batch_encoder(sentencepiece):
    for tokenizer in (sentencepiece, tokenizers.ByteTokenizer(),
                      tokenizers.CharTokenizer.fit(LINES)):
        assert {tokenizer.bos_id, tokenizer.pad_id} <= set(range(-1, tokenizer.vocab_size))
        assert 0 <= tokenizer.eos_id < tokenizer.vocab_size
        batch = tokenizer.encode_batch(LINES)
        assert [b.tolist() for b in batch] == [tokenizer.encode(t).tolist() for t in LINES]


def test_a_line_sample_is_bounded_uniform_seeded_and_in_stream_order():
    lines = (f"line {i}" for i in range(100_000))  # a stream: never a list
    sample = tokenizers.sample_lines(lines, 2000, seed=0)
    positions = [int(line.split()[1]) for line in sample]
    assert len(sample) == 2000 and positions == sorted(set(positions))
    per_tenth = np.bincount(np.array(positions) // 10_000, minlength=10)
    assert ((per_tenth - 200) ** 2 / 200).sum() < 27.9  # 200 in each tenth: chi-square, p=0.001
    assert tokenizers.sample_lines((f"line {i}" for i in range(100_000)), 2000, 0) == sample
    assert tokenizers.sample_lines(iter(["a", "b"]), 2000) == ["a", "b"]  # fewer: all, in order


def test_the_character_vocabulary_of_a_stream_is_every_character_it_holds():
    stream = (line * 3 for line in LINES + HARD)
    expected = sorted(set("".join(line for line in LINES + HARD)))
    assert tokenizers.CharTokenizer.fit(stream).chars == expected
