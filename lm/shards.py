"""One task's work, in a worker process or the calling one: its parts' documents, split, tokenized
a batch at a time, written to shard files of its own, then its token counts and, last, its done
marker. A task depends on nothing but its parts, so the shards are the same whichever worker, host
or rerun makes them, and a marker means the task's files are complete.

This module imports no JAX: a worker process starts in a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np
from ml_collections import ConfigDict

from lm import chat, corpus, fs, sources
from lm import tokenizer as tokenizers
from lm.config import ConfigError

SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # text tokenized in one call
# Bits of a .mask byte: the token is scored as a target; a document starts at the token (chat data
# mark the end-of-document id before each conversation: their end of turn may be the same id).
SCORED, DOCUMENT_START = 1, 2


@dataclasses.dataclass(frozen=True)
class Task:
    index: int
    parts: tuple[sources.Part, ...]
    size: int  # bytes of input, about (for progress)

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    @property
    def prefix(self) -> str:
        """Names the task's files: its index and what it reads, so a task redone for changed
        inputs never overwrites files a previous manifest names."""
        return f"{self.name}-{self.spec()[:8]}"

    def spec(self) -> str:
        """What the task reads, versions of its files included: a done marker is for this."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def files(self) -> str:
        names = list(dict.fromkeys(p.input.path for p in self.parts))
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    def to_json(self) -> dict:
        return {"index": self.index, "size": self.size,
                "parts": [dataclasses.asdict(p) for p in self.parts]}

    @classmethod
    def from_json(cls, spec: dict) -> Task:
        parts = tuple(sources.Part(**{**p, "input": sources.Input(**p["input"])})
                      for p in spec["parts"])
        return cls(spec["index"], parts, spec["size"])


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every task of a preparation shares."""
    data: dict          # config.data, as a dict (it crosses to worker processes)
    seed: int
    tails: bool         # the split holds out each text's tail (corpus.uses_tails)
    directory: str      # the work directory: local, or a bucket path
    dtype: str
    shard_tokens: int   # tokens per shard file, at most

    def config(self) -> ConfigDict:
        return ConfigDict(self.data)


def _join(directory: str, *names: str) -> str:
    """A path in the work directory, local or in a bucket."""
    return os.fspath(fs.path(directory).joinpath(*names))


def marker_path(directory: str, task: Task) -> str:
    return _join(directory, "done", f"{task.name}.json")


def read_marker(directory: str, task: Task) -> dict | None:
    """The task's done marker, if it is done (for these very parts)."""
    path = marker_path(directory, task)
    if not fs.exists(path):
        return None
    try:
        marker = json.loads(fs.read_text(path))
    except ValueError:
        return None
    return marker if marker.get("spec") == task.spec() else None


class ShardWriter:
    """Appends one split's ids (and loss weights) to `<prefix>-000.bin`, `-001.bin`, ... of at
    most `shard_tokens` tokens each."""

    def __init__(self, directory: str, prefix: str, shard_tokens: int):
        self.directory, self.prefix, self.shard_tokens = directory, prefix, shard_tokens
        self.shards: list[str] = []
        self.masks: list[str] = []
        self.tokens = 0
        self._room = 0

    def write(self, ids: np.ndarray, weights: np.ndarray | None) -> None:
        while len(ids):
            if not self._room:
                name = f"{self.prefix}-{len(self.shards):03d}"
                self.shards.append(f"{name}.bin")
                if weights is not None:
                    self.masks.append(f"{name}.mask")
                self._room = self.shard_tokens
            take = min(self._room, len(ids))
            _append(os.path.join(self.directory, self.shards[-1]), ids[:take])
            if weights is not None:
                _append(os.path.join(self.directory, self.masks[-1]), weights[:take])
                weights = weights[take:]
            ids, self._room, self.tokens = ids[take:], self._room - take, self.tokens + take


def _append(path: str, array: np.ndarray) -> None:
    with fs.errors(path), open(path, "ab") as f:
        f.write(array.tobytes())


def encode(tokenizer: tokenizers.Tokenizer, pieces: Sequence[sources.Piece],
           template: chat.ChatTemplate | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, loss weight of each id as a target or None for plain text) of consecutive pieces:
    each document's ids, then the end-of-document id after its last piece. An example is its
    prompt's ids then its completion's, encoded apart so that their boundary is a token boundary.
    A conversation is its `template`'s ids and weights (lm/chat.py); the end-of-document id after
    it is marked as the next one's start (`DOCUMENT_START`)."""
    eos = np.array([tokenizer.eos_id], np.int32)
    if isinstance(pieces[0].content, chat.Chat):
        encoded = [template.encode(p.content) for p in pieces]
        start = np.array([DOCUMENT_START], np.uint8)
        return (np.concatenate([x for ids, _ in encoded for x in (ids, eos)]),
                np.concatenate([x for _, weights in encoded for x in (weights, start)]))
    if not isinstance(pieces[0].content, tuple):
        encoded = tokenizer.encode_batch([p.content for p in pieces])
        return np.concatenate([x for p, ids in zip(pieces, encoded)
                               for x in ((ids, eos) if p.end else (ids,))]), None
    prompts = tokenizer.encode_batch([p.content[0] for p in pieces])
    completions = tokenizer.encode_batch([p.content[1] for p in pieces])
    ids = np.concatenate([x for p, c in zip(prompts, completions) for x in (p, c, eos)])
    weights = np.concatenate([w for p, c in zip(prompts, completions) for w in (
        np.zeros(len(p), np.uint8), np.ones(len(c) + 1, np.uint8))])
    return ids, weights


def _batches(task: Task, settings: Settings) -> Iterator[list[tuple[str, sources.Piece]]]:
    """The task's (split, piece) pairs in batches of about BATCH_CHARS of text."""
    data, batch, chars = settings.config(), [], 0
    for part in task.parts:
        for split, piece in corpus.split_pieces(part, data, settings.seed, settings.tails):
            batch.append((split, piece))
            chars += sum(map(len, corpus.texts([piece.content])))
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(task: Task, settings: Settings, tokenizer: tokenizers.Tokenizer, directory: str
              ) -> dict:
    """Write the task's shards into the local `directory`; what its marker records."""
    writers = {s: ShardWriter(directory, f"{s}-{task.prefix}", settings.shard_tokens)
               for s in SPLITS}
    data = settings.config()
    template = chat.ChatTemplate.for_run(data, tokenizer) if data.format == "chat" else None
    counts = np.zeros((len(SPLITS), tokenizer.vocab_size), np.int64)
    documents, input_bytes, digest = dict.fromkeys(SPLITS, 0), 0, hashlib.sha256()
    for batch in _batches(task, settings):
        for row, split in enumerate(SPLITS):
            pieces = [p for s, p in batch if s == split]
            if not pieces:
                continue
            ids, weights = encode(tokenizer, pieces, template)
            writers[split].write(ids.astype(settings.dtype), weights)
            counts[row] += np.bincount(ids if weights is None else ids[(weights & SCORED) > 0],
                                       minlength=tokenizer.vocab_size)
            documents[split] += sum(p.end for p in pieces)
        for split, piece in batch:
            text = "\0".join(corpus.texts([piece.content])).encode("utf-8")
            input_bytes += len(text)
            digest.update(f"{split} {piece.end} {len(text)} ".encode() + text)
    np.save(os.path.join(directory, f"{task.prefix}.counts.npy"), counts)
    return {"spec": task.spec(), "input_bytes": input_bytes, "digest": digest.hexdigest(),
            "splits": {s: {"tokens": w.tokens, "documents": documents[s], "shards": w.shards,
                           "masks": w.masks} for s, w in writers.items()}}


def run_task(task: Task, settings: Settings, tokenizer: tokenizers.Tokenizer) -> dict:
    """Tokenize `task` into the work directory, marker last; its marker. A killed run's leftovers
    of the task are overwritten."""
    directory = settings.directory
    local = directory if not fs.is_remote(directory) else tempfile.mkdtemp(prefix="lm-task-")
    try:
        with fs.errors(local):
            os.makedirs(os.path.join(local, "done"), exist_ok=True)
            for name in os.listdir(local):  # a killed run's files of this very task
                if f"-{task.prefix}-" in name or name.startswith(f"{task.prefix}."):
                    os.remove(os.path.join(local, name))
        marker = _tokenize(task, settings, tokenizer, local)
        if fs.is_remote(directory):
            names = [f for s in marker["splits"].values() for f in s["shards"] + s["masks"]]
            for name in names + [f"{task.prefix}.counts.npy"]:
                fs.upload(os.path.join(local, name), _join(directory, name))
        fs.write_text(marker_path(directory, task), json.dumps(marker))
        return marker
    finally:
        if local != directory:
            shutil.rmtree(local, ignore_errors=True)


def read_counts(directory: str, task: Task) -> np.ndarray:
    path = _join(directory, f"{task.prefix}.counts.npy")
    return np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Worker processes.

_worker_tokenizer: tokenizers.Tokenizer | None = None  # one per worker process, built once


def _die_with_parent() -> None:
    """A worker ends when the preparing process does, even by SIGKILL (Linux): an orphan still
    writing a task would race the rerun that redoes it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def init_worker(spec: dict) -> None:
    global _worker_tokenizer
    _die_with_parent()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core per worker, for HF tokenizers too
    _worker_tokenizer = tokenizers.from_json(spec)


def run_in_worker(task: Task, settings: Settings) -> dict:
    try:
        return run_task(task, settings, _worker_tokenizer)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (a bug or a library's error: name the input)
        raise ConfigError(f"{task.files()}: tokenizing failed ({type(e).__name__}: "
                          f"{fs.first_line(e)})") from None
