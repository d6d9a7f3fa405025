"""Tokenizers behind one interface: sentencepiece (trained here), characters, raw bytes.

Each is saved to and loaded from `tokenizer.json` in the workdir (a sentencepiece model is embedded
in it), so a run can always decode what it trained on. The end-of-document id separates documents
in the token stream.

Train a sentencepiece model from the shell:
    python -m lm.tokenizer --input='corpus/*.txt' --model_prefix=DIR/spm --vocab_size=8000
"""

from __future__ import annotations

import base64
import glob
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import sentencepiece as spm

from lm.config import ConfigError

EOS = "<eos>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def to_json(self) -> dict: ...


class CharTokenizer:
    """One id per character seen in the corpus; id 0 is end-of-document."""

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars) + 1
        self.eos_id = 0
        self._ids = {c: i + 1 for i, c in enumerate(self.chars)}
        self._lookup = np.array([""] + self.chars, dtype=object)

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars))

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self._ids[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise ConfigError(f"character {e.args[0]!r} is not in this run's character vocabulary "
                              f"(built from its training corpus); use characters it has seen") from None

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        return "".join(self._lookup[ids[(ids > 0) & (ids < self.vocab_size)]])

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; 256 is end-of-document. Handles any text."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": "byte"}


class SentencePieceTokenizer:
    """A sentencepiece model, trained for an exact round trip (no normalisation, byte fallback)."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id, self.bos_id, self.pad_id = self._sp.eos_id(), self._sp.bos_id(), self._sp.pad_id()

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        if not Path(path).is_file():
            raise ConfigError(f"sentencepiece model {path} does not exist; train one with "
                              f"`python -m lm.tokenizer` or use config.data.tokenizer=train:N")
        return cls(Path(path).read_bytes())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

    def to_json(self) -> dict:
        return {"type": "sentencepiece", "model": base64.b64encode(self.model_proto).decode()}


def document_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The text's ids after the end-of-document id: how every document starts in training, so a
    prompt or scored document starts the same way."""
    return np.concatenate([[tokenizer.eos_id], tokenizer.encode(text)]).astype(np.int32)


# Sentencepiece drops longer "sentences" silently, so long lines are fed in pieces of this size.
MAX_SENTENCE_CHARS = 4096


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                yield line[start:start + MAX_SENTENCE_CHARS]


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
                        character_coverage: float = 0.9995,
                        user_defined_symbols: Sequence[str] = (),
                        max_sentences: int = 5_000_000, verbose: bool = False
                        ) -> SentencePieceTokenizer:
    """Train on `texts` (documents). Ids: 0 unk, 1 bos, 2 eos, 3 pad, then the user's symbols.

    At most `max_sentences` lines, sampled uniformly, are used, so a huge corpus fits in memory.
    """
    import io

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=list(user_defined_symbols), input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=4 * MAX_SENTENCE_CHARS,
            minloglevel=0 if verbose else 2)
    except RuntimeError as e:
        reason = str(e).split("]")[-1].strip()
        raise ConfigError(f"sentencepiece cannot train a vocabulary of {vocab_size} on this "
                          f"corpus: {reason}") from None
    return SentencePieceTokenizer(model.getvalue())


def fit_tokenizer(kind: str, texts: Sequence[str]) -> Tokenizer:
    """`char`, `byte`, `train:N` (sentencepiece of N pieces on `texts`) or a `.model` path."""
    if kind == "char":
        return CharTokenizer.fit(texts)
    if kind == "byte":
        return ByteTokenizer()
    if kind.startswith("train:"):
        return train_sentencepiece(texts, int(kind.split(":", 1)[1]))
    return SentencePieceTokenizer.from_file(kind)


def from_json(spec: dict) -> Tokenizer:
    if spec["type"] == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(spec["model"]))
    return CharTokenizer(spec["chars"]) if spec["type"] == "char" else ByteTokenizer()


def save(tokenizer: Tokenizer, path: Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_json(), ensure_ascii=False))


def load(path: Path) -> Tokenizer:
    return from_json(json.loads(Path(path).read_text()))


def main(argv: list[str]) -> None:
    from absl import flags

    f = flags.FLAGS
    files = sorted(p for pattern in f.input for p in glob.glob(pattern, recursive=True))
    if not files:
        sys.exit(f"error: --input={','.join(f.input)} matches no files")
    texts = (Path(p).read_text(encoding="utf-8", errors="replace") for p in files)
    print(f"training a {f.model_type} model of {f.vocab_size} pieces on {len(files)} files "
          f"(at most {f.max_sentences:,} lines, sampled)", flush=True)
    try:
        tokenizer = train_sentencepiece(texts, f.vocab_size, f.model_type, f.character_coverage,
                                        f.user_defined_symbols, f.max_sentences, verbose=True)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    out = Path(f.model_prefix + ".model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(tokenizer.model_proto)
    print(f"wrote {out}: vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, eos "
          f"{tokenizer.eos_id}, pad {tokenizer.pad_id}; use it with "
          f"--config.data.tokenizer={out}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_list("input", None, "Text files or globs (comma-separated).", required=True)
    flags.DEFINE_string("model_prefix", None, "Writes PREFIX.model.", required=True)
    flags.DEFINE_integer("vocab_size", 8000, "Number of pieces.")
    flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "Sentencepiece algorithm.")
    flags.DEFINE_float("character_coverage", 0.9995, "Share of characters kept as pieces; the "
                       "rest fall back to bytes (lower it for large alphabets only if needed).")
    flags.DEFINE_list("user_defined_symbols", [], "Special tokens that are never split.")
    flags.DEFINE_integer("max_sentences", 5_000_000, "Lines sampled for training, at most.")
    app.run(main)
