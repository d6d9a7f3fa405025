"""Tokenize a corpus once, in parallel, into binary token shards that training memory-maps.

    python -m lm.prepare --config=configs/quickstart.py --out=data/python_docs

A prepared directory holds:
    meta.json         what was prepared from what (below); written last, inside a temporary
                      directory that is renamed into place, so a directory with one is complete
    tokenizer.json    the tokenizer (lm/tokenizer.py's format)
    counts.npy        [2, tokenizer vocab] int64: frequencies of the scored tokens of train and val
    train-00000.bin   raw token ids, uint16 when the vocabulary fits (<= 65536 ids) else uint32;
                      a split's shards concatenate to its token stream, which starts with the
                      end-of-document id and has one after each document: every document comes
                      after one, as `tokenizer.document_ids` starts a document
    train-00000.mask  prompt/completion data only: uint8 per token, 1 where the token is scored as
                      a target (completion and end-of-document), 0 on prompt tokens
    val-00000.bin ...

meta.json's `key` (content hash of the inputs, the data config that shapes the shards, the seed of
the split) with the tokenizer decides reuse: a rerun with the same key and tokenizer does nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterator, Sequence

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags
from tqdm import tqdm

from lm import corpus, fs
from lm import tokenizer as tokenizers
from lm.config import ConfigError, load_config_flag, parse_flags, validate_data
from lm.data import TokenStream
from lm.metrics import console

VERSION = 1
CHUNK_BYTES = 4 << 20   # text per tokenization task; more than one task starts worker processes
SHARD_TOKENS = 1 << 27  # tokens per shard file


@dataclasses.dataclass
class Prepared:
    directory: fs.Path
    meta: dict
    tokenizer: tokenizers.Tokenizer
    train: TokenStream
    val: TokenStream
    counts: np.ndarray  # [2, tokenizer vocab]: train and val frequencies of the scored tokens


def tokenizer_hash(tokenizer: tokenizers.Tokenizer) -> str:
    return hashlib.sha256(json.dumps(tokenizer.to_json(), sort_keys=True).encode()).hexdigest()


def _tokenizer_source(spec: str) -> str:
    """What fixes the tokenizer before it is built: the spec, and a tokenizer file's bytes."""
    if spec.endswith((".model", ".json")) and fs.is_file(spec):
        kind = "sentencepiece" if spec.endswith(".model") else "tokenizer.json"
        return f"{kind} sha256:" + hashlib.sha256(fs.read_bytes(spec)).hexdigest()
    return spec


def _key(data: ConfigDict, seed: int) -> dict:
    fields = ("text_field",) if data.format == "text" else ("prompt_field", "completion_field")
    return {"version": VERSION, "inputs": corpus.input_hash(data), "seed": seed,
            "format": data.format, "val_fraction": data.val_fraction,
            **{name: data[name] for name in fields}}


def is_prepared(path: str | os.PathLike) -> bool:
    """A directory `prepare` completed (not a list of inputs, a glob or a built-in corpus)."""
    text = os.fspath(path)
    if text.startswith(corpus.BUILTIN) or any(c in text for c in ",*?["):
        return False
    return fs.is_file(fs.path(text) / "meta.json")


def _up_to_date(out: fs.Path, key: dict, source: str, tokenizer: tokenizers.Tokenizer | None
                ) -> bool:
    if not is_prepared(out):
        return False
    meta = json.loads(fs.read_text(out / "meta.json"))
    if meta.get("key") != key:
        return False
    if tokenizer is not None:
        return meta["tokenizer_hash"] == tokenizer_hash(tokenizer)
    return meta["tokenizer_source"] == source


def _encode(tokenizer: tokenizers.Tokenizer, docs: Sequence[corpus.Document], dtype: str
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(ids, loss weight of each id as a target or None for plain text, counts of scored ids).

    Each document is followed by the end-of-document id; an example is its prompt's ids then its
    completion's, encoded apart so that the prompt/completion boundary is a token boundary.
    """
    eos = np.array([tokenizer.eos_id], np.int32)
    if docs and isinstance(docs[0], str):
        ids = np.concatenate([p for doc in docs for p in (tokenizer.encode(doc), eos)])
        weights = None
    else:
        parts = [(tokenizer.encode(prompt), tokenizer.encode(completion))
                 for prompt, completion in docs]
        ids = np.concatenate([p for prompt, completion in parts for p in (prompt, completion, eos)])
        weights = np.concatenate([w for prompt, completion in parts for w in (
            np.zeros(len(prompt), np.uint8), np.ones(len(completion) + 1, np.uint8))])
    scored = ids if weights is None else ids[weights == 1]
    return ids.astype(dtype), weights, np.bincount(scored, minlength=tokenizer.vocab_size)


def _after_end_of_document(ids: np.ndarray, weights: np.ndarray | None, eos_id: int
                           ) -> tuple[np.ndarray, np.ndarray | None]:
    ids = np.concatenate([np.array([eos_id], ids.dtype), ids])
    return ids, None if weights is None else np.concatenate([np.zeros(1, weights.dtype), weights])


_worker_tokenizer: tokenizers.Tokenizer | None = None  # one per worker process, built once


def _init_worker(spec: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizers.from_json(spec)


def _encode_in_worker(task: tuple[Sequence[corpus.Document], str]):
    return _encode(_worker_tokenizer, *task)


def _in_order(pool: ProcessPoolExecutor, tasks: list, ahead: int) -> Iterator:
    """The workers' results in task order, with at most `ahead` tasks' text in flight."""
    pending: collections.deque[Future] = collections.deque()
    for task in tasks:
        pending.append(pool.submit(_encode_in_worker, task))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunks(docs: list[corpus.Document]) -> Iterator[tuple[list[corpus.Document], int]]:
    """Consecutive documents of about CHUNK_BYTES of UTF-8, with their size in bytes."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += sum(len(t.encode("utf-8")) for t in corpus.texts([doc]))
        if size >= CHUNK_BYTES:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


class _ShardWriter:
    """Appends a split's ids (and weights) to shard files of SHARD_TOKENS tokens each."""

    def __init__(self, directory: str, split: str):
        self.directory, self.split = directory, split
        self.shards: list[str] = []
        self.masks: list[str] = []
        self._room = 0

    def write(self, ids: np.ndarray, weights: np.ndarray | None) -> None:
        while len(ids):
            if not self._room:
                self.shards.append(f"{self.split}-{len(self.shards):05d}.bin")
                if weights is not None:
                    self.masks.append(f"{self.split}-{len(self.masks):05d}.mask")
                self._room = SHARD_TOKENS
            take = min(self._room, len(ids))
            with open(os.path.join(self.directory, self.shards[-1]), "ab") as f:
                f.write(ids[:take].tobytes())
            if weights is not None:
                with open(os.path.join(self.directory, self.masks[-1]), "ab") as f:
                    f.write(weights[:take].tobytes())
                weights = weights[take:]
            ids, self._room = ids[take:], self._room - take


def _tokenize_splits(directory: str, splits: dict[str, list[corpus.Document]],
                     tokenizer: tokenizers.Tokenizer, dtype: str, progress: bool
                     ) -> tuple[dict, np.ndarray]:
    """Write each split's shards into `directory`; (per-split meta, [splits, vocab] counts)."""
    tasks = {name: list(_chunks(docs)) for name, docs in splits.items()}
    # Starting workers costs a second or two: worth it from two full chunks of text on.
    full_chunks = sum(size for t in tasks.values() for _, size in t) // CHUNK_BYTES
    workers = min(os.cpu_count() or 1, full_chunks)
    pool = None
    if workers > 1:  # spawn, not fork: the parent may hold JAX's threads
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(tokenizer.to_json(),))
    meta, counts = {}, np.zeros((len(splits), tokenizer.vocab_size), np.int64)
    bar = tqdm(total=sum(size for t in tasks.values() for _, size in t), unit="B", unit_scale=True,
               desc="tokenize", dynamic_ncols=True, disable=None if progress else True)
    try:
        for row, (name, split_tasks) in enumerate(tasks.items()):
            inputs = [(docs, dtype) for docs, _ in split_tasks]
            results = (_in_order(pool, inputs, 2 * workers) if pool else
                       (_encode(tokenizer, *task) for task in inputs))
            writer, tokens = _ShardWriter(directory, name), 0
            for (ids, weights, chunk_counts), (_, size) in zip(results, split_tasks):
                if not tokens and tokenizer.eos_id >= 0:  # the first document comes after one too
                    ids, weights = _after_end_of_document(ids, weights, tokenizer.eos_id)
                writer.write(ids, weights)
                counts[row] += chunk_counts
                tokens += len(ids)
                bar.update(size)
            meta[name] = {"tokens": tokens, "documents": len(splits[name]),
                          "shards": writer.shards, "masks": writer.masks or None}
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    return meta, counts


def _replace(partial: str, out: str) -> None:
    """Move the finished local `partial` to `out`; any moment's interruption leaves no trusted
    `out`."""
    if os.path.exists(out):
        stale = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(out, stale)
        os.rename(partial, out)
        shutil.rmtree(stale)
    else:
        os.rename(partial, out)


def _publish(local: str, out: fs.Path) -> None:
    """Upload the finished local directory `local` to the bucket path `out`. Objects cannot be
    renamed at once, so the order keeps the rule that a directory with meta.json is complete: an
    old meta.json is deleted first, then the old files, and the new meta.json is uploaded last."""
    names = sorted(os.listdir(local))
    if fs.exists(out / "meta.json"):
        fs.remove_tree(out / "meta.json")
    for old in fs.listdir(out):
        if old.name not in names:
            fs.remove_tree(old)
    for name in sorted(names, key=lambda n: n == "meta.json"):
        fs.upload(os.path.join(local, name), out / name)


def _check_out(out: fs.Path) -> None:
    if fs.is_file(out) or (fs.listdir(out) and not is_prepared(out)):
        raise ConfigError(f"{out} exists and is not a prepared data directory; pass a new or "
                          f"empty directory to write the prepared data into")


def prepare(data: ConfigDict, seed: int, out: str | os.PathLike,
            tokenizer: tokenizers.Tokenizer | None = None) -> bool:
    """Make `out` the prepared form of `data`'s corpus, unless it already is; True if it tokenized.

    `tokenizer` (a resumed run's) is used as is; otherwise `data.tokenizer` is built as a run builds
    it: a trained vocabulary sees only the training split, a character vocabulary the whole corpus
    (it must cover the validation split's characters too).
    """
    out = fs.path(out)
    key, source = _key(data, seed), _tokenizer_source(data.tokenizer)
    if _up_to_date(out, key, source, tokenizer):
        console(f"data: reusing {out} (same inputs, tokenizer and data config)")
        return False
    _check_out(out)
    docs = corpus.read_documents(data)
    train_docs, val_docs = corpus.split_documents(docs, data.val_fraction, seed)
    if tokenizer is None:
        fit_on = docs if data.tokenizer == "char" else train_docs
        tokenizer = tokenizers.fit_tokenizer(data.tokenizer, corpus.texts(fit_on))
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    progress = jax.process_index() == 0  # (the first call starts JAX's backend: not timed below)
    start = time.perf_counter()

    # Shards are written locally: beside `out` (a killed run's leftover is started afresh), or,
    # for a bucket, in a temporary directory that is uploaded when complete.
    partial = (tempfile.mkdtemp(prefix="lm-prepare-") if fs.is_remote(out) else
               os.path.join(os.path.dirname(os.path.abspath(out)), f".{out.name}.partial"))
    try:
        with fs.errors(partial):
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            splits, counts = _tokenize_splits(partial, {"train": train_docs, "val": val_docs},
                                              tokenizer, dtype, progress)
            tokenizers.save(tokenizer, os.path.join(partial, "tokenizer.json"))
            np.save(os.path.join(partial, "counts.npy"), counts)
        seconds = time.perf_counter() - start  # tokenizing and writing, not fitting the tokenizer
        input_bytes = sum(len(t.encode("utf-8")) for t in corpus.texts(docs))
        meta = {"key": key, "tokenizer_source": source, "tokenizer_hash": tokenizer_hash(tokenizer),
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": dtype,
                "format": data.format, "input_bytes": input_bytes, "splits": splits}
        fs.write_text(os.path.join(partial, "meta.json"), json.dumps(meta, indent=2))
        if fs.is_remote(out):
            _publish(partial, out)
        else:
            with fs.errors(out):
                _replace(partial, os.fspath(out))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    megabytes = input_bytes / 1e6
    console(f"data: prepared {out}: {splits['train']['tokens']:,} train / "
            f"{splits['val']['tokens']:,} val tokens from {len(docs):,} documents, "
            f"{megabytes:.1f} MB tokenized in {seconds:.1f}s ({megabytes / seconds:.1f} MB/s), "
            f"vocab {tokenizer.vocab_size} as {dtype}")
    return True


def load(directory: str | os.PathLike, cache_dir: str = "") -> Prepared:
    """A prepared directory, its shards memory-mapped; shards in a bucket are memory-mapped from
    local copies in `cache_dir`, or without one read by ranged requests (`fs.token_array`)."""
    directory = fs.path(directory)
    meta = json.loads(fs.read_text(directory / "meta.json"))

    def stream(split: str) -> TokenStream:
        info = meta["splits"][split]
        shards = [fs.token_array(directory / f, meta["dtype"], cache_dir) for f in info["shards"]]
        masks = info["masks"] and [fs.token_array(directory / f, np.uint8, cache_dir)
                                   for f in info["masks"]]
        tokens = TokenStream(shards, masks)
        if len(tokens) != info["tokens"] or (masks and sum(map(len, masks)) != info["tokens"]):
            raise ConfigError(f"{directory}: the {split} shards hold {len(tokens)} tokens, not the "
                              f"{info['tokens']} of meta.json; delete the directory and prepare "
                              f"again")
        return tokens

    counts = np.load(io.BytesIO(fs.read_bytes(directory / "counts.npy")), allow_pickle=False)
    return Prepared(directory, meta, tokenizers.load(directory / "tokenizer.json"),
                    stream("train"), stream("val"), counts)


def prepared_data(data: ConfigDict, seed: int, workdir: str | os.PathLike,
                  tokenizer: tokenizers.Tokenizer | None = None) -> Prepared:
    """A run's data: the prepared directory `data.path` names, or the corpus prepared into
    `data.prepared_dir` (default `<workdir>/data`) now if it is missing or stale.

    `tokenizer` is the run's own (when resuming); data tokenized with another is refused.
    """
    if is_prepared(data.path):
        prepared = load(data.path, data.shard_cache_dir)
        if tokenizer is not None and tokenizer_hash(tokenizer) != prepared.meta["tokenizer_hash"]:
            raise ConfigError(f"{data.path} was tokenized with another tokenizer than this run's "
                              f"{fs.path(workdir) / 'tokenizer.json'}; use a new --workdir, or "
                              f"prepare the data with this run's tokenizer")
        console(f"data: {data.path} as prepared (its meta.json, not config.data, says which "
                f"tokenizer, format and split)")
        return prepared
    out = fs.path(data.prepared_dir or fs.path(workdir) / "data")
    if jax.process_index() == 0:
        prepare(data, seed, out, tokenizer)
    if jax.process_count() > 1:  # the others read what process 0 wrote (a bucket, a shared disk)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("lm.prepare")
    return load(out, data.shard_cache_dir)


def main(argv: list[str]) -> None:
    """`python -m lm.prepare`: the flags `run` defines, to `prepare`; errors as one line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    out = flags.FLAGS.out
    if not out:
        sys.exit("error: --out is required (the directory to write the prepared data into)")
    config = load_config_flag(flags.FLAGS["config"])
    try:
        validate_data(config.data)
        prepare(config.data, config.seed, out)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    console(f"train on it with --config.data.path={out}")


def run(argv: list[str] | None = None) -> None:
    """The binary, from Python too: `run(["lm.prepare", "--config=...", "--out=DIR"])` (default:
    sys.argv). Its flags are defined here, not on import: lm.train imports this module and has a
    --config of its own."""
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "default.py"),
        "Run config file: its `data` section and `seed` say what to prepare.", lock_config=True,
        sys_argv=argv)  # where its --config.* overrides are
    flags.DEFINE_string("out", None, "Directory to write the prepared data into.")
    logging.set_verbosity(logging.WARNING)
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
