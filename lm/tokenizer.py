"""Tokenizers behind one interface: character-level (vocabulary from the corpus) and raw bytes.

Each is saved to and loaded from `tokenizer.json` in the workdir, so a run can always decode what it
trained on. The end-of-document id separates documents in the token stream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

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


def fit_tokenizer(kind: str, texts: Sequence[str]) -> Tokenizer:
    return CharTokenizer.fit(texts) if kind == "char" else ByteTokenizer()


def from_json(spec: dict) -> Tokenizer:
    return CharTokenizer(spec["chars"]) if spec["type"] == "char" else ByteTokenizer()


def save(tokenizer: Tokenizer, path: Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_json(), ensure_ascii=False))


def load(path: Path) -> Tokenizer:
    return from_json(json.loads(Path(path).read_text()))
