"""Data preparation, measured: MB/s of text to token shards beside `datasets.map`, the loader's
batches/s on those shards, and peak memory on corpora of two sizes.

    python scripts/data_benchmark.py --mode=speed --megabytes=64 --workdir=/tmp/data_benchmark
    python scripts/data_benchmark.py --mode=memory --gigabytes=1,4 --workdir=/tmp/data_benchmark

speed: one generated jsonl corpus, and a byte-level BPE (HuggingFace `tokenizers`) and a
sentencepiece BPE model trained on a sample of it. Rows, each timed whole (reading, tokenizing,
writing): `lm.prepare` with the HF tokenizer; the path most people take, `datasets.load_dataset`
then `.map(batched=True, num_proc=<cores>)` with the same tokenizer, its ids written to one flat file as
nanoGPT's openwebtext/prepare.py writes them (and checked equal to lm's); `lm.prepare` with the
sentencepiece model. Then the loader's batches/s at GPT-2 small's shapes over lm's shards.

memory: jsonl.gz files of generated documents (64 files per GB of text, made once and reused);
`python -m lm.prepare` at the default settings (configs/default.py: the `char` tokenizer, fitted in
a streaming pass, one worker per core) on the first `--gigabytes` of them, its peak resident memory
sampled over the whole process tree (it and its workers, summed), and the largest single process's
peak (getrusage).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

_MODE = flags.DEFINE_enum("mode", "speed", ["speed", "memory"], "What to measure.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/data_benchmark", "Corpora and outputs go here.")
_MEGABYTES = flags.DEFINE_integer("megabytes", 64, "speed: text in the corpus.")
_GIGABYTES = flags.DEFINE_list("gigabytes", ["1", "4"], "memory: corpus sizes to prepare.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "speed: pieces of both BPE tokenizers.")
_BATCHES = flags.DEFINE_integer("batches", 200, "speed: loader batches to time.")

FILE_BYTES = 16 << 20  # text per generated file


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def documents(seed: int, size: int):
    """Documents of varied length (a few words to ~20k) from a Zipf vocabulary of made-up words,
    with punctuation and paragraphs, about `size` bytes of text in all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, rng.integers(1, 12), p=None)) for _ in range(30_000)]
    vocab += [w.capitalize() + "." for w in vocab[:3000]] + ["\n\n", "ünï", "—"]
    vocab = np.array(vocab)
    produced = 0
    while produced < size:
        count = int(min(rng.lognormal(5.5, 1.2), 20_000)) + 1
        words = np.minimum(rng.zipf(1.2, count) - 1, len(vocab) - 1)
        doc = " ".join(vocab[words].tolist())
        produced += len(doc.encode())
        yield doc


def _make_file(path: Path, index: int, size: int) -> None:
    if path.exists():
        return
    lines = "".join(json.dumps({"text": d}) + "\n" for d in documents(index, size))
    data = gzip.compress(lines.encode(), compresslevel=1) if path.suffix == ".gz" else lines.encode()
    path.with_suffix(".partial").write_bytes(data)
    path.with_suffix(".partial").rename(path)


def make_corpus(directory: Path, total: int, compressed: bool) -> list[Path]:
    """jsonl(.gz) files of FILE_BYTES of text each, made once (files already there are kept), one
    process per core."""
    from concurrent.futures import ProcessPoolExecutor

    directory.mkdir(parents=True, exist_ok=True)
    size = min(FILE_BYTES, total)
    files = [directory / f"part-{i:04d}-{size}.jsonl{'.gz' if compressed else ''}"
             for i in range((total + size - 1) // size)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_make_file, files, range(len(files)), [size] * len(files)))
    return files


# ---------------------------------------------------------------------------------------------
# Speed.

def train_tokenizers(corpus: Path, directory: Path) -> tuple[str, str]:
    """A byte-level BPE tokenizer.json (HF) and a sentencepiece BPE model, on the first 8 MB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lm import tokenizer as tokenizers

    sample = []
    with open(corpus) as f:
        size = 0
        for line in f:
            sample.append(json.loads(line)["text"])
            size += len(line)
            if size > 8 << 20:
                break
    hf_path, spm_path = directory / "bpe.json", directory / "spm.model"
    if not hf_path.exists():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=_VOCAB.value, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(sample, trainer)
        bpe.save(str(hf_path))
    if not spm_path.exists():
        spm_path.write_bytes(tokenizers.train_sentencepiece(sample, _VOCAB.value).model_proto)
    return str(hf_path), str(spm_path)


def lm_prepare(corpus: Path, tokenizer: str, out: Path) -> float:
    from lm import prepare
    from lm.config import default_config

    data = default_config().data
    data.update(path=str(corpus), tokenizer=tokenizer, val_fraction=0.0)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    prepare.prepare(data, 0, out)
    return time.perf_counter() - start


def datasets_map(corpus: Path, tokenizer: str, out: Path) -> tuple[float, float]:
    """nanoGPT's openwebtext/prepare.py path with this tokenizer: (seconds in all, of them in
    `map`)."""
    import datasets
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    eos = tok.token_to_id("<|endoftext|>")
    cache = out.parent / "datasets_cache"
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(corpus), split="train",
                                    cache_dir=str(cache))

    def encode(batch):
        ids = [e.ids + [eos] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]
        return {"ids": ids, "len": [len(x) for x in ids]}

    mapped_at = time.perf_counter()
    tokenized = dataset.map(encode, batched=True, remove_columns=["text"],
                            num_proc=os.cpu_count())
    map_seconds = time.perf_counter() - mapped_at
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    array = np.memmap(out, dtype=np.uint16, mode="w+", shape=(total,))
    index, shards = 0, 64
    for i in range(shards):
        batch = tokenized.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
        chunk = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, np.uint16)
        array[index:index + len(chunk)] = chunk
        index += len(chunk)
    array.flush()
    return time.perf_counter() - start, map_seconds


def loader_rate(directory: Path) -> list[str]:
    from lm import data, prepare

    stream = prepare.load(directory).train
    rows = []
    for batch_size in (32, 512):
        batches = data.train_batches(stream, 1024, batch_size, 0, process_index=0,
                                     process_count=1)
        next(batches)
        count = _BATCHES.value if batch_size == 32 else max(_BATCHES.value // 8, 10)
        start = time.perf_counter()
        for _ in range(count):
            next(batches)
        rate = count / (time.perf_counter() - start)
        rows.append(f"| loader, {batch_size} x 1024 tokens (GPT-2 small), "
                    f"{len(prepare.load(directory).meta['splits']['train']['shards'])} shards | "
                    f"{rate:,.0f} batches/s ({rate * batch_size * 1024 / 1e6:,.1f}M tokens/s) | "
                    f"{load_average()} |")
    return rows


def speed() -> None:
    import numpy as np

    from lm import prepare

    work = Path(_WORKDIR.value) / "speed"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    if not corpus.exists() or corpus.stat().st_size < _MEGABYTES.value << 20:
        files = make_corpus(work / "parts", _MEGABYTES.value << 20, compressed=False)
        with open(corpus, "wb") as f:
            for file in files:
                f.write(file.read_bytes())
    text_mb = sum(len(json.loads(line)["text"].encode()) for line in open(corpus)) / 1e6
    hf, spm = train_tokenizers(corpus, work)
    print(f"corpus: {text_mb:.1f} MB of text in {corpus} ({os.cpu_count()} cores, "
          f"{load_average()})", flush=True)
    rows = []
    seconds = lm_prepare(corpus, hf, work / "lm_hf")
    rows.append(("lm.prepare, HF byte-level BPE", seconds))
    print(f"lm.prepare (HF): {seconds:.1f}s, {load_average()}", flush=True)
    total, mapped = datasets_map(corpus, hf, work / "datasets_hf.bin")
    rows.append((f"datasets load_dataset + map(batched, num_proc={os.cpu_count()}) + write, same "
                 f"tokenizer (map alone {mapped:.1f}s)", total))
    print(f"datasets: {total:.1f}s (map {mapped:.1f}s), {load_average()}", flush=True)
    ours = prepare.load(work / "lm_hf").train
    theirs = np.memmap(work / "datasets_hf.bin", dtype=np.uint16, mode="r")
    same = np.array_equal(ours.window(1, len(ours) - 1)["tokens"], theirs)
    seconds = lm_prepare(corpus, spm, work / "lm_spm")
    rows.append(("lm.prepare, sentencepiece BPE", seconds))
    print(f"| what ({text_mb:.0f} MB of jsonl text, vocab {_VOCAB.value}) | seconds | MB/s |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {text_mb / seconds:.2f} |")
    print(f"lm's ids equal datasets.map's: {same}; lm / datasets.map: "
          f"{rows[1][1] / rows[0][1]:.2f}x the speed")
    for row in loader_rate(work / "lm_hf"):
        print(row)


# ---------------------------------------------------------------------------------------------
# Memory.

def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def peak_memory(gigabytes: float, files: list[Path]) -> None:
    import resource

    count = int(gigabytes * (1 << 30) // FILE_BYTES)
    inputs = Path(_WORKDIR.value) / f"corpus_{gigabytes:g}gb"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir()
    for file in files[:count]:
        (inputs / file.name).symlink_to(file)
    out = Path(_WORKDIR.value) / f"out_{gigabytes:g}gb"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "lm.prepare", "--config=configs/default.py",
               f"--config.data.path={inputs}", f"--out={out}"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    peak, loads = 0, []

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, tree_rss(process.pid))
            loads.append(os.getloadavg()[0])
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = process.communicate()[0]
    sampler.join()
    seconds = time.perf_counter() - start
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    summary = [line for line in output.splitlines() if line.startswith("data: prepared")]
    print(f"| {gigabytes:g} GB ({count} jsonl.gz files) | {peak / 2**20:,.0f} MiB | "
          f"{largest / 2**20:,.0f} MiB | {seconds:.0f} s | load {min(loads):.1f}-{max(loads):.1f} |",
          flush=True)
    print("   " + (summary[0] if summary else output[-2000:]), flush=True)
    shutil.rmtree(out, ignore_errors=True)


def memory() -> None:
    sizes = [float(g) for g in _GIGABYTES.value]
    files = make_corpus(Path(_WORKDIR.value) / "files", int(max(sizes) * (1 << 30)),
                        compressed=True)
    print(f"{len(files)} files of {FILE_BYTES >> 20} MB of text; {load_average()}", flush=True)
    print("| corpus | peak RSS, process tree (sum) | largest process | wall | load average |")
    print("|---|---|---|---|---|")
    for gigabytes in sizes:
        peak_memory(gigabytes, files)


def main(argv: list[str]) -> None:
    del argv
    speed() if _MODE.value == "speed" else memory()


if __name__ == "__main__":
    app.run(main)
