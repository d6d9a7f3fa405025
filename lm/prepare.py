"""Tokenize a corpus once, in bounded memory, on every core and host, into token shards that
training memory-maps; a killed preparation resumes.

    python -m lm.prepare --config=configs/quickstart.py --out=data/python_docs
    python -m lm.prepare ... --task_shard=3/8     # one of 8 independent preparers (SLURM array)

The inputs are cut into tasks (about `TASKS` of them, of 1 MiB to `TASK_BYTES` of input: files,
line-aligned ranges of a large plain file, row groups of a parquet file). Each task streams its
documents through a bounded buffer, tokenizes them in a worker process and writes shard files of
its own, then its done marker;
a rerun skips the tasks whose markers are there. When every task is done, one process writes the
manifest, `meta.json`, which names the shards in order; no token data is copied. A prepared
directory holds:

    meta.json         what was prepared from what, and the shards of each split in order; written
                      last and at once, so a directory with one is complete
    shards-<id>/      one preparation's work directory (<id>: its data config and tokenizer):
      plan.json         the tasks
      tokenizer.json    the tokenizer (lm/tokenizer.py's format)
      done/NNNNN.json   each task's done marker
      train-NNNNN-<spec>-000.bin   a task's token ids, uint16 when the vocabulary fits (<= 65536
                        ids) else uint32; each document is followed by the end-of-document id
      train-NNNNN-<spec>-000.mask  prompt/completion and chat data only: uint8 per token, bit 0
                        (`shards.SCORED`) set where the token is scored as a target (completion
                        and end-of-document; an assistant's turn and its end of turn), clear on
                        prompts; chat data set bit 1 (`shards.DOCUMENT_START`) on the
                        end-of-document id before each conversation
      train-head.bin    the end-of-document id that starts the split's stream, so every document
                        comes after one (as `tokenizer.document_ids` starts a document)
      counts-<hash>.npy [2, vocab] int64: frequencies of the scored tokens of train and val

A split's stream is its shards in the manifest's order. meta.json's `key` (the inputs' sizes and
modification times or object generations, the data config that shapes the shards, the seed of the
split) with the tokenizer decides reuse: a rerun with the same key and tokenizer reads nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags
from tqdm import tqdm

from lm import chat, corpus, fs, shards, sources
from lm import tokenizer as tokenizers
from lm.config import ConfigError, load_config_flag, parse_flags, validate_data

VERSION = 2
TASK_BYTES = 64 << 20   # input per task, at most: the unit of parallel work and of resumption
TASKS = 64              # a smaller corpus is cut into about this many tasks (of 1 MiB at least),
                        # so that every core has work; never by the number of cores, which would
                        # change the shards
SHARD_TOKENS = 1 << 27  # tokens per shard file, at most
FITTED = ("char", "train:")  # tokenizers fitted on the corpus itself


@dataclasses.dataclass
class Prepared:
    directory: fs.Path
    meta: dict
    tokenizer: tokenizers.Tokenizer
    train: "TokenStream"  # noqa: F821 (lm.data's, imported on load)
    val: "TokenStream"  # noqa: F821
    counts: np.ndarray  # [2, tokenizer vocab]: train and val frequencies of the scored tokens


def tokenizer_hash(tokenizer: tokenizers.Tokenizer) -> str:
    return hashlib.sha256(json.dumps(tokenizer.to_json(), sort_keys=True).encode()).hexdigest()


def _tokenizer_source(spec: str) -> str:
    """What fixes the tokenizer before it is built: the spec, and a tokenizer file's bytes."""
    if spec.endswith((".model", ".json")) and fs.is_file(spec):
        kind = "sentencepiece" if spec.endswith(".model") else "tokenizer.json"
        return f"{kind} sha256:" + hashlib.sha256(fs.read_bytes(spec)).hexdigest()
    return spec


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _key(data: ConfigDict, seed: int, inputs: list[sources.Input]) -> dict:
    """What shapes the shards: the inputs (path, size, version: no bytes are read), the split,
    the data format (a chat's config.data.chat_template too: a tokenizer's own template is part of
    the tokenizer), and the constants that cut the work."""
    fields = sources.FORMATS[data.format][0](data)
    template = {"chat_template": chat.config_hash(data)} if data.format == "chat" else {}
    return {"version": VERSION,
            "inputs": _digest([[i.path, i.size, i.version] for i in inputs]),
            "seed": seed, "format": data.format, "val_fraction": data.val_fraction,
            "fields": fields, "task_bytes": [TASK_BYTES, TASKS], "piece_bytes": sources.PIECE_BYTES,
            **template}


def is_prepared(path: str | os.PathLike) -> bool:
    """A directory `prepare` completed (not a list of inputs, a glob or a built-in corpus)."""
    text = os.fspath(path)
    if text.startswith((sources.BUILTIN, sources.HUB)) or any(c in text for c in ",*?["):
        return False
    return fs.is_file(fs.path(text) / "meta.json")


def _write_at_once(path: fs.Path, text: str) -> None:
    """A file that is whole or absent, whenever the writer dies: a local file is renamed into
    place; a bucket object appears whole when its upload completes."""
    if fs.is_remote(path):
        fs.write_text(path, text)
        return
    partial = f"{path}.partial-{os.getpid()}"
    fs.write_text(partial, text)
    with fs.errors(path):
        os.replace(partial, path)


def _check_out(out: fs.Path) -> None:
    if fs.is_file(out):
        raise ConfigError(f"{out} exists and is a file; pass a new or empty directory to write "
                          f"the prepared data into")
    entries = fs.listdir(out)
    ours = is_prepared(out) or any(e.name.startswith("shards-") and fs.is_file(e / "plan.json")
                                   for e in entries)
    if entries and not ours:
        raise ConfigError(f"{out} exists and is not a prepared data directory; pass a new or "
                          f"empty directory to write the prepared data into")


class Preparation:
    """One preparation of `data` into `out`: plan, tokenizer, tasks, manifest. `prepare` runs the
    steps in one process; `prepared_data` spreads them over a job's hosts."""

    def __init__(self, data: ConfigDict, seed: int, out: str | os.PathLike,
                 tokenizer: tokenizers.Tokenizer | None = None):
        self.data, self.seed, self.out = data, seed, fs.path(out)
        self.inputs = sources.inputs(data)
        self.key = _key(data, seed, self.inputs)
        self.tokenizer = tokenizer
        self.source = (f"tokenizer sha256:{tokenizer_hash(tokenizer)}" if tokenizer is not None
                       else _tokenizer_source(data.tokenizer))
        # A tokenizer fitted on the corpus changes with it: so does the work directory then.
        fitted = tokenizer is None and data.tokenizer.startswith(FITTED)
        work = {**self.key, "inputs": self.key["inputs"] if fitted else None,
                "tokenizer": self.source}
        self.work = self.out / f"shards-{_digest(work)[:12]}"
        self.tasks: list[shards.Task] = []
        self.tails = False

    # Reuse.

    def up_to_date(self) -> bool:
        if not is_prepared(self.out):
            return False
        meta = json.loads(fs.read_text(self.out / "meta.json"))
        if meta.get("key") != self.key:
            return False
        if self.tokenizer is not None:
            return meta["tokenizer_hash"] == tokenizer_hash(self.tokenizer)
        return meta["tokenizer_source"] == self.source

    # Plan and tokenizer: by one process (or, for independent preparers, each the same).

    def plan(self) -> None:
        """Cut the inputs into tasks and write plan.json (a listing and a few small reads)."""
        _check_out(self.out)
        self.tails = corpus.uses_tails(self.inputs, self.data)
        target = min(TASK_BYTES, max(1 << 20, sum(i.size for i in self.inputs) // TASKS))
        parts = []
        for input in self.inputs:
            if self.tails and input.kind == "text":
                size = sources.decompressed_size(input)
                cut = sources.char_boundary(input, int(size * (1 - self.data.val_fraction)), size)
                parts += sources.split_text_at(input, cut, size, target)
            else:
                parts += sources.split_input(input, target)
        self.tasks = _group(parts, target)
        fs.makedirs(self.work)
        plan = {"key": self.key, "tails": self.tails, "tasks": [t.to_json() for t in self.tasks]}
        _write_at_once(self.work / "plan.json", json.dumps(plan))

    def read_plan(self) -> None:
        plan = json.loads(fs.read_text(self.work / "plan.json"))
        self.tails = plan["tails"]
        self.tasks = [shards.Task.from_json(t) for t in plan["tasks"]]

    def fit_tokenizer(self) -> tokenizers.Tokenizer:
        """The run's tokenizer, else the one this preparation already fitted (a resumed or
        another host's), else fitted now in one streaming pass and saved for them."""
        saved = self.work / "tokenizer.json"
        if self.tokenizer is None and fs.is_file(saved):
            self.tokenizer = tokenizers.load(saved)
        if self.tokenizer is None:
            kind = self.data.tokenizer
            # A character vocabulary covers the validation split too; a trained one sees training
            # text only.
            split = None if kind == "char" else "train"
            fit_on = self._texts(split) if kind.startswith(FITTED) else iter(())
            self.tokenizer = tokenizers.fit_tokenizer(kind, fit_on)
        if not fs.is_file(saved):
            _write_at_once(saved, json.dumps(self.tokenizer.to_json(), ensure_ascii=False))
        return self.tokenizer

    def _texts(self, split: str | None) -> Iterator[str]:
        """What a fitted tokenizer sees: the documents' texts; conversations as their template
        renders them (its own text, e.g. `<|im_start|>`, is tokenized too)."""
        template = (chat.ChatTemplate(chat.template_source(self.data))
                    if self.data.format == "chat" else None)
        for task in self.tasks:
            for part in task.parts:
                for name, piece in corpus.split_pieces(part, self.data, self.seed, self.tails):
                    if split not in (None, name):
                        continue
                    if template is None:
                        yield from corpus.texts([piece.content])
                    else:
                        yield template.render(piece.content.as_dicts())

    # Tasks: every process its share.

    def settings(self, dtype: str) -> shards.Settings:
        return shards.Settings(self.data.to_dict(), self.seed, self.tails, os.fspath(self.work),
                               dtype, SHARD_TOKENS)

    @property
    def dtype(self) -> str:
        return "uint16" if self.tokenizer.vocab_size <= 1 << 16 else "uint32"

    def pending(self, shard: tuple[int, int] = (0, 1)) -> list[shards.Task]:
        index, count = shard
        return [t for t in self.tasks[index::count]
                if shards.read_marker(os.fspath(self.work), t) is None]

    def run(self, shard: tuple[int, int] = (0, 1), workers: int = 0, progress: bool = True
            ) -> tuple[int, float]:
        """Tokenize this shard's unfinished tasks; (input bytes tokenized, seconds)."""
        mine = self.tasks[shard[0]::shard[1]]
        todo = self.pending(shard)
        if len(todo) < len(mine):
            print(f"data: {len(mine) - len(todo)} of {len(mine)} tasks already done in "
                  f"{self.work}; tokenizing the other {len(todo)}", flush=True)
        start = time.perf_counter()
        done = _run_tasks(todo, self.settings(self.dtype), self.tokenizer,
                          workers or os.cpu_count() or 1, progress)
        return done, time.perf_counter() - start

    def discard_if_idle(self, created: bool) -> None:
        """Remove the work directory if no task of it is done (and `out`, if this made it)."""
        if fs.listdir(self.work / "done"):
            return
        fs.remove_tree(self.work)
        if created and not fs.listdir(self.out):
            fs.remove_tree(self.out)

    # The manifest: once, when every task is done.

    def finish(self) -> dict:
        """Write the manifest (meta.json, last) over the done tasks' shards, and remove what no
        manifest names any more (older preparations, tasks of changed inputs)."""
        work = os.fspath(self.work)
        markers = [shards.read_marker(work, t) for t in self.tasks]
        missing = [t for t, m in zip(self.tasks, markers) if m is None]
        if missing:
            raise ConfigError(f"{self.out}: {len(missing)} tasks are not done (e.g. "
                              f"{missing[0].files()}); rerun the preparers that failed")
        counts = sum(shards.read_counts(work, t) for t in self.tasks)
        counts_name = f"counts-{_digest([m['digest'] for m in markers])[:12]}.npy"
        buffer = io.BytesIO()
        np.save(buffer, counts)
        fs.write_bytes(self.work / counts_name, buffer.getvalue())
        splits = {s: self._split(s, markers) for s in shards.SPLITS}
        meta = {"key": self.key, "tokenizer_source": self.source,
                "tokenizer_hash": tokenizer_hash(self.tokenizer),
                "vocab_size": self.tokenizer.vocab_size, "eos_id": self.tokenizer.eos_id,
                "dtype": self.dtype, "format": self.data.format,
                "tokenizer": f"{self.work.name}/tokenizer.json",
                "counts": f"{self.work.name}/{counts_name}",
                "input_bytes": sum(m["input_bytes"] for m in markers),
                "content_sha256": _digest([m["digest"] for m in markers]),
                "tasks": len(self.tasks), "splits": splits}
        _write_at_once(self.out / "meta.json", json.dumps(meta, indent=2))
        self._remove_unnamed(meta)
        return meta

    def _split(self, split: str, markers: list[dict]) -> dict:
        """A split's manifest entry: its head shard (the end-of-document id that starts the
        stream) and the tasks' shards, in task order."""
        entries = [m["splits"][split] for m in markers]
        tokens = sum(e["tokens"] for e in entries)
        head, masked = [], self.data.format != "text"
        if tokens and self.tokenizer.eos_id >= 0:  # an imported tokenizer may lack one
            eos = np.array([self.tokenizer.eos_id], self.dtype)
            fs.write_bytes(self.work / f"{split}-head.bin", eos.tobytes())
            head = [f"{split}-head.bin"]
            if masked:  # never a target: it starts the stream (and, in chat data, a document)
                start = shards.DOCUMENT_START if self.data.format == "chat" else 0
                fs.write_bytes(self.work / f"{split}-head.mask", bytes([start]))
        names = head + [f for e in entries for f in e["shards"]]
        masks = [n.replace(".bin", ".mask") for n in head] + [f for e in entries
                                                              for f in e["masks"]]
        return {"tokens": tokens + len(head), "documents": sum(e["documents"] for e in entries),
                "shards": [f"{self.work.name}/{n}" for n in names],
                "masks": [f"{self.work.name}/{n}" for n in masks] if masked else None}

    def _remove_unnamed(self, meta: dict) -> None:
        named = {Path(f).name for s in meta["splits"].values()
                 for f in s["shards"] + (s["masks"] or [])}
        named |= {"plan.json", "tokenizer.json", "done", Path(meta["counts"]).name}
        named |= {f"{t.prefix}.counts.npy" for t in self.tasks}
        for entry in fs.listdir(self.out):
            if entry.name not in ("meta.json", self.work.name):
                fs.remove_tree(entry)
        for entry in fs.listdir(self.work):
            if entry.name not in named:
                fs.remove_tree(entry)
        current = {f"{t.name}.json" for t in self.tasks}
        for entry in fs.listdir(self.work / "done"):
            if entry.name not in current:
                fs.remove_tree(entry)


def _group(parts: list[tuple[sources.Part, int]], target: int) -> list[shards.Task]:
    """Consecutive parts in tasks of about `target` bytes of input."""
    groups: list[tuple[list[sources.Part], int]] = []
    for part, size in parts:
        if not groups or groups[-1][1] + size > target:
            groups.append(([], 0))
        groups[-1] = (groups[-1][0] + [part], groups[-1][1] + size)
    return [shards.Task(i, tuple(group), size) for i, (group, size) in enumerate(groups)]


def _run_tasks(tasks: list[shards.Task], settings: shards.Settings,
               tokenizer: tokenizers.Tokenizer, workers: int, progress: bool) -> int:
    """Run `tasks`, in worker processes when there are several; input bytes tokenized."""
    workers = min(workers, len(tasks))
    bar = tqdm(total=sum(t.size for t in tasks), unit="B", unit_scale=True, desc="tokenize",
               dynamic_ncols=True, disable=None if progress else True)
    done = 0
    try:
        if workers <= 1:
            for task in tasks:
                done += shards.run_task(task, settings, tokenizer)["input_bytes"]
                bar.update(task.size)
            return done
        # spawn, not fork: the parent may hold JAX's threads
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=shards.init_worker, initargs=(tokenizer.to_json(),))
        try:
            futures = {pool.submit(shards.run_in_worker, t, settings): t for t in tasks}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    done += _result(future, futures[future])["input_bytes"]
                    bar.update(futures[future].size)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return done
    finally:
        bar.close()


def _result(future, task: shards.Task) -> dict:
    try:
        return future.result()
    except BrokenProcessPool:
        raise ConfigError(f"{task.files()}: a worker process died tokenizing it (out of memory? "
                          f"lower config.data.prepare_workers); rerun to continue from the "
                          f"finished tasks") from None


def prepare(data: ConfigDict, seed: int, out: str | os.PathLike,
            tokenizer: tokenizers.Tokenizer | None = None, task_shard: tuple[int, int] = (0, 1),
            workers: int | None = None) -> bool:
    """Make `out` the prepared form of `data`'s corpus, unless it already is; True if it worked.

    `tokenizer` (a resumed run's) is used as is; otherwise `data.tokenizer` is built as a run builds
    it: a trained vocabulary sees only the training split, a character vocabulary the whole corpus
    (it must cover the validation split's characters too). `task_shard=(i, n)`: this preparer does
    tasks i, i+n, ...; whichever preparer finds every task done writes the manifest.
    """
    job = Preparation(data, seed, out, tokenizer)
    if job.up_to_date():
        _console(f"data: reusing {job.out} (same inputs, tokenizer and data config)")
        return False
    created = not fs.exists(job.out)
    try:
        job.plan()
        job.fit_tokenizer()
        tokenized, seconds = job.run(task_shard, data.prepare_workers if workers is None
                                     else workers, progress=task_shard[0] == 0)
    except BaseException:
        if task_shard == (0, 1):  # alone in `out`: a failure before any task is done leaves nothing
            job.discard_if_idle(created)
        raise
    if job.pending():
        _console(f"data: this preparer's tasks are done; {len(job.pending())} of {len(job.tasks)} "
                 f"are not (other preparers'): the last to finish writes {job.out}/meta.json")
        return True
    meta = job.finish()
    _summary(job.out, meta, tokenized, seconds)
    return True


def _console(message: str) -> None:
    tqdm.write(message)


def _summary(out: fs.Path, meta: dict, tokenized: int, seconds: float) -> None:
    splits, megabytes = meta["splits"], tokenized / 1e6
    rate = f" ({megabytes / seconds:.1f} MB/s)" if seconds > 0 else ""
    _console(f"data: prepared {out}: {splits['train']['tokens']:,} train / "
             f"{splits['val']['tokens']:,} val tokens from "
             f"{splits['train']['documents'] + splits['val']['documents']:,} documents, "
             f"{megabytes:.1f} MB tokenized in {seconds:.1f}s{rate}, vocab {meta['vocab_size']} "
             f"as {meta['dtype']}")


def load(directory: str | os.PathLike, cache_dir: str = "") -> Prepared:
    """A prepared directory, its shards memory-mapped as one stream per split; shards in a bucket
    are memory-mapped from local copies in `cache_dir`, or without one read by ranged requests
    (`fs.token_array`)."""
    from lm.data import TokenStream

    directory = fs.path(directory)
    meta = json.loads(fs.read_text(directory / "meta.json"))
    _allow_open_files(sum(len(s["shards"]) + len(s["masks"] or [])
                          for s in meta["splits"].values()))

    def stream(split: str) -> TokenStream:
        info = meta["splits"][split]
        shards_ = [fs.token_array(directory / f, meta["dtype"], cache_dir) for f in info["shards"]]
        masks = info["masks"] and [fs.token_array(directory / f, np.uint8, cache_dir)
                                   for f in info["masks"]]
        tokens = TokenStream(shards_, masks, marks_documents=meta["format"] == "chat")
        if len(tokens) != info["tokens"] or (masks and sum(map(len, masks)) != info["tokens"]):
            raise ConfigError(f"{directory}: the {split} shards hold {len(tokens)} tokens, not the "
                              f"{info['tokens']} of meta.json; delete the directory and prepare "
                              f"again")
        return tokens

    counts = np.load(io.BytesIO(fs.read_bytes(directory / meta.get("counts", "counts.npy"))),
                     allow_pickle=False)
    return Prepared(directory, meta, tokenizers.load(directory / meta.get("tokenizer",
                                                                          "tokenizer.json")),
                    stream("train"), stream("val"), counts)


def _allow_open_files(count: int) -> None:
    """Each memory-mapped shard holds a file descriptor: raise the soft limit toward the hard one
    when a corpus has more shards than it allows."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY
                                                    else min(wanted, hard), hard))


def prepared_data(data: ConfigDict, seed: int, workdir: str | os.PathLike,
                  tokenizer: tokenizers.Tokenizer | None = None) -> Prepared:
    """A run's data: the prepared directory `data.path` names, or the corpus prepared into
    `data.prepared_dir` (default `<workdir>/data`) now, by every process of the job, if it is
    missing or stale.

    `tokenizer` is the run's own (when resuming); data tokenized with another is refused.
    """
    if is_prepared(data.path):
        prepared = load(data.path, data.shard_cache_dir)
        if tokenizer is not None and tokenizer_hash(tokenizer) != prepared.meta["tokenizer_hash"]:
            raise ConfigError(f"{data.path} was tokenized with another tokenizer than this run's "
                              f"{fs.path(workdir) / 'tokenizer.json'}; use a new --workdir, or "
                              f"prepare the data with this run's tokenizer")
        _console(f"data: {data.path} as prepared (its meta.json, not config.data, says which "
                 f"tokenizer, format and split)")
        return prepared
    out = fs.path(data.prepared_dir or fs.path(workdir) / "data")
    import jax

    if jax.process_count() == 1:
        prepare(data, seed, out, tokenizer)
    else:
        _prepare_on_every_host(data, seed, out, tokenizer)
    return load(out, data.shard_cache_dir)


def _prepare_on_every_host(data: ConfigDict, seed: int, out: fs.Path,
                           tokenizer: tokenizers.Tokenizer | None) -> None:
    """Process 0 decides reuse, plans and fits the tokenizer; every process tokenizes its share
    of the tasks into the shared `out`; process 0 writes the manifest once all are done."""
    import jax
    from jax.experimental import multihost_utils

    index, count = jax.process_index(), jax.process_count()
    job = Preparation(data, seed, out, tokenizer)
    fresh = multihost_utils.broadcast_one_to_all(np.int32(index == 0 and job.up_to_date()))
    if int(fresh):
        if index == 0:
            _console(f"data: reusing {out} (same inputs, tokenizer and data config)")
        return
    if index == 0:
        job.plan()
        job.fit_tokenizer()
    multihost_utils.sync_global_devices("lm.prepare: plan")
    if index != 0:
        job.read_plan()
        job.fit_tokenizer()  # process 0's, from the work directory
    tokenized, seconds = job.run((index, count), data.prepare_workers, progress=index == 0)
    share = len(job.tasks[index::count])
    print(f"data: process {index} tokenized {tokenized / 1e6:.1f} MB ({share} of {len(job.tasks)} "
          f"tasks) in {seconds:.1f}s", flush=True)
    multihost_utils.sync_global_devices("lm.prepare: tasks")
    if index == 0:
        _summary(out, job.finish(), tokenized, seconds)
    multihost_utils.sync_global_devices("lm.prepare: manifest")


def _task_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index = count = -1
    if not 0 <= index < count:
        raise ConfigError(f"--task_shard={text!r} must be I/N with 0 <= I < N, e.g. 0/4")
    return index, count


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
        shard = _task_shard(flags.FLAGS.task_shard)
        prepare(config.data, config.seed, out, task_shard=shard)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if is_prepared(out):
        _console(f"train on it with --config.data.path={out}")


def run(argv: list[str] | None = None) -> None:
    """The binary, from Python too: `run(["lm.prepare", "--config=...", "--out=DIR"])` (default:
    sys.argv). Its flags are defined here, not on import: lm.train imports this module and has a
    --config of its own."""
    config_flags.DEFINE_config_file(
        "config", str(Path(__file__).resolve().parents[1] / "configs" / "default.py"),
        "Run config file: its `data` section and `seed` say what to prepare.", lock_config=True,
        sys_argv=argv)  # where its --config.* overrides are
    flags.DEFINE_string("out", None, "Directory to write the prepared data into (local, gs://, "
                        "s3://).")
    flags.DEFINE_string("task_shard", "0/1", "I/N: do tasks I, I+N, I+2N, ... of the "
                        "preparation, for N independent preparers (a SLURM array, say) over the "
                        "same --out; the one that finishes last writes the manifest.")
    logging.set_verbosity(logging.WARNING)
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
