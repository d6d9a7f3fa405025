"""Text corpora -> token streams -> shuffled, process-sharded batches of next-token windows.

A corpus is a list of documents: the files matched by `config.data.path` (one document per file), or
the built-in `builtin:python_docs` (CPython's own reference documentation and stdlib docstrings,
present wherever Python is, so the quickstart needs no download).
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import grain
import jax
import numpy as np
from ml_collections import ConfigDict

from lm import tokenizer as tokenizers
from lm.config import ConfigError

BUILTIN = "builtin:"


def python_docs() -> list[str]:
    """The pydoc topics (language reference) and the docstrings of the stdlib's top-level modules."""
    import pydoc_data.topics

    docs = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a stdlib file this parser cannot read contributes nothing
        docs += [doc for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                      ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node))]
    return docs


_BUILTINS = {"python_docs": python_docs}


def _expand(path: str) -> list[str]:
    files: list[str] = []
    for part in filter(None, (p.strip() for p in path.split(","))):
        if os.path.isdir(part):
            matches = [str(p) for p in sorted(Path(part).rglob("*")) if p.is_file()]
        else:
            matches = sorted(glob.glob(part, recursive=True))
        if not matches:
            raise ConfigError(f"config.data.path={part!r} matches no files (cwd {os.getcwd()}); "
                              f"pass an existing file, directory or glob with --config.data.path")
        files += matches
    return files


def read_documents(path: str) -> list[str]:
    if path.startswith(BUILTIN):
        name = path[len(BUILTIN):]
        if name not in _BUILTINS:
            raise ConfigError(f"config.data.path={path!r}: unknown built-in corpus; "
                              f"available: {', '.join(BUILTIN + n for n in _BUILTINS)}")
        return _BUILTINS[name]()
    docs = []
    for file in _expand(path):
        try:
            docs.append(Path(file).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{file}: not UTF-8 text (byte offset {e.start}); convert it or "
                              f"leave it out of config.data.path") from None
    if not any(docs):
        raise ConfigError(f"config.data.path={path!r}: the corpus is empty")
    return docs


def split_documents(docs: list[str], val_fraction: float, seed: int
                    ) -> tuple[list[str], list[str]]:
    """Hold out whole documents; a corpus of fewer than 10 documents holds out each one's tail.

    The tail rule makes a single file split like nanoGPT's (the last 10% of Tiny Shakespeare).
    """
    if val_fraction == 0:
        return docs, []
    if len(docs) < 10:
        cuts = [int(len(d) * (1 - val_fraction)) for d in docs]
        return [d[:c] for d, c in zip(docs, cuts)], [d[c:] for d, c in zip(docs, cuts) if d[c:]]
    order = np.random.default_rng(seed).permutation(len(docs))
    held_out = set(order[:max(1, round(len(docs) * val_fraction))].tolist())
    return ([d for i, d in enumerate(docs) if i not in held_out],
            [d for i, d in enumerate(docs) if i in held_out])


def token_stream(docs: list[str], tokenizer: tokenizers.Tokenizer) -> np.ndarray:
    """All documents' tokens, each document followed by the end-of-document id."""
    eos = np.array([tokenizer.eos_id], np.int32)
    parts = [p for doc in docs for p in (tokenizer.encode(doc), eos)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


@dataclasses.dataclass
class Corpus:
    tokenizer: tokenizers.Tokenizer
    train: np.ndarray
    val: np.ndarray


def load_corpus(data: ConfigDict, seed: int, tokenizer: tokenizers.Tokenizer | None = None
                ) -> Corpus:
    """The corpus split and tokenized, with `tokenizer` or one fitted to the corpus."""
    docs = read_documents(data.path)
    train_docs, val_docs = split_documents(docs, data.val_fraction, seed)
    # A trained vocabulary sees only the training split; a character vocabulary must cover every
    # character the validation split holds as well.
    fit_on = docs if data.tokenizer == "char" else train_docs
    tokenizer = tokenizer or tokenizers.fit_tokenizer(data.tokenizer, fit_on)
    return Corpus(tokenizer, token_stream(train_docs, tokenizer), token_stream(val_docs, tokenizer))


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Nats per token of val under train's add-one-smoothed token frequencies: the bar to beat."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val].mean())


class Windows:
    """Non-overlapping windows of `length + 1` tokens: inputs and their next-token targets."""

    def __init__(self, tokens: np.ndarray, length: int):
        self.tokens, self.length = tokens, length

    def __len__(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.length

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.length
        return self.tokens[start:start + self.length + 1]


def _to_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": windows[:, :-1].astype(np.int32), "targets": windows[:, 1:].astype(np.int32),
            "mask": np.ones(windows[:, 1:].shape, np.float32)}


def _check_windows(count: int, num_tokens: int, split: str, length: int) -> None:
    if not count:
        raise ConfigError(f"the {split} split has {num_tokens} tokens, too few for one window of "
                          f"context_length+1={length + 1}; use a bigger corpus, a larger "
                          f"config.data.val_fraction, or a smaller config.model.context_length")


def train_batches(tokens: np.ndarray, length: int, global_batch: int, seed: int
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of this process's rows: each epoch is a fresh permutation of the windows,
    which start at a fresh random offset so that every epoch cuts the text at different places."""
    per_epoch = max(len(tokens) - length, 0) // length  # room for any offset below `length`
    _check_windows(per_epoch, len(tokens), "train", length)

    def window(index: int, position: int) -> np.ndarray:
        offset = np.random.default_rng([seed, index // per_epoch]).integers(length)
        start = offset + position * length
        return tokens[start:start + length + 1]

    rows = global_batch // jax.process_count()
    dataset = (grain.MapDataset.range(per_epoch).shuffle(seed=seed).repeat(None)
               .map_with_index(window)[jax.process_index()::jax.process_count()]
               .batch(rows, drop_remainder=True).map(_to_batch))
    return iter(dataset.to_iter_dataset())


def eval_batches(tokens: np.ndarray, length: int, global_batch: int, num_batches: int
                 ) -> list[dict[str, np.ndarray]]:
    """The same validation batches at every evaluation: windows spread evenly over the split.

    A split with fewer windows than `num_batches` batches need gives fewer batches (at least one).
    """
    windows = Windows(tokens, length)
    _check_windows(len(windows), len(tokens), "validation", length)
    num_batches = min(num_batches, max(1, len(windows) // global_batch))
    picks = np.linspace(0, len(windows) - 1, num_batches * global_batch).round().astype(int)
    rows = picks.reshape(num_batches, global_batch)[:, jax.process_index()::jax.process_count()]
    return [_to_batch(np.stack([windows[i] for i in batch])) for batch in rows]
