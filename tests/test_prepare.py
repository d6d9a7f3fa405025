"""Preparing data at scale: every input format, large files cut into tasks, the per-document split,
resumption after SIGKILL and after a failed task, independent preparers, and bucket inputs and
outputs (tests/test_data.py has the shards' contents, reuse and the loader)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_data import ROOT, data_config, shard_bytes, streams

from lm import corpus, fs, prepare, sources
from lm import tokenizer as tokenizers
from lm.config import ConfigError

pa = pytest.importorskip("pyarrow", reason='the data formats need pip install -e ".[data]"')
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")


def make_docs(count: int, seed: int = 0) -> list[str]:
    """Documents of varied length and script; a few repeat (they must land in one split)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "bravo", "ünïcode", "日本語", "δέλτα", "echo\n", "foxtrot.", "🦑"]
    docs = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(count)]
    return docs + docs[:3]


def write_jsonl(path, docs, field="text", compress=None) -> str:
    text = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    path.write_bytes({None: lambda b: b, "gz": gzip.compress,
                      "zst": zstandard.ZstdCompressor().compress}[compress](text))
    return str(path)


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same documents in every format a corpus may come in."""
    import datasets

    docs, root = make_docs(60), tmp_path_factory.mktemp("formats")
    table = pa.table({"text": docs, "id": list(range(len(docs)))})
    paths = {
        "jsonl": write_jsonl(root / "docs.jsonl", docs),
        "jsonl.gz": write_jsonl(root / "docs.jsonl.gz", docs, compress="gz"),
        "jsonl.zst": write_jsonl(root / "docs.jsonl.zst", docs, compress="zst"),
        "parquet": str(root / "docs.parquet"),
        "save_to_disk": str(root / "saved"),
        "hub": f"hf:json?data_files={root / 'docs.jsonl'}",
    }
    pq.write_table(table, paths["parquet"], row_group_size=7)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(paths["save_to_disk"], num_shards=2)
    return docs, paths


def test_every_format_reads_the_same_documents(formats):
    docs, paths = formats
    for name, path in paths.items():
        assert corpus.read_documents(data_config(path)) == docs, name


def test_parquet_cut_by_row_groups_prepares_the_stream_of_jsonl_read_whole(formats, tmp_path,
                                                                           monkeypatch):
    """Tasks of a few row groups, documents split by their hash: the stream does not depend on
    the format or on how the input is cut."""
    docs, paths = formats
    prepare.prepare(data_config(paths["jsonl"]), 0, tmp_path / "jsonl", workers=1)
    monkeypatch.setattr(prepare, "TASK_BYTES", 600)
    prepare.prepare(data_config(paths["parquet"]), 0, tmp_path / "parquet", workers=1)
    assert prepare.load(tmp_path / "parquet").meta["tasks"] > 3
    assert streams(tmp_path / "parquet") == streams(tmp_path / "jsonl")
    train, val = corpus.split_documents(docs, 0.1, 0)
    byte = tokenizers.ByteTokenizer()
    expected = [[byte.eos_id] + [i for d in split for i in [*byte.encode(d), byte.eos_id]]
                for split in (train, val)]
    assert streams(tmp_path / "parquet") == expected


def test_the_split_is_a_seeded_hash_of_each_document():
    docs = make_docs(2000)
    train, val = corpus.split_documents(docs, 0.1, 0)
    assert 0.08 < len(val) / len(docs) < 0.12
    assert {d in val for d in docs[:3]} == {d in val for d in docs[-3:]}  # duplicates together
    assert corpus.split_documents(docs, 0.1, 1)[1] != val
    assert corpus.split_documents(docs[::-1], 0.1, 0)[1] == val[::-1]  # order does not matter


def test_a_large_text_file_in_many_tasks_splits_like_nanogpt_and_streams_as_one(tmp_path,
                                                                                monkeypatch):
    lines = [" ".join(["word", "ünï", "🦑"][i % 3] for _ in range(i % 17)) for i in range(3000)]
    lines[1234] = "x" * 9000  # a line longer than a piece: cut at a character boundary
    text = "\n".join(lines) + "\n"
    (tmp_path / "big.txt").write_text(text)
    config = data_config(tmp_path / "big.txt")
    prepare.prepare(config, 0, tmp_path / "one", workers=1)
    monkeypatch.setattr(sources, "PIECE_BYTES", 1000)
    monkeypatch.setattr(prepare, "TASK_BYTES", 5000)
    prepare.prepare(config, 0, tmp_path / "many", workers=1)
    meta = prepare.load(tmp_path / "many").meta
    assert meta["tasks"] > 10 and meta["splits"]["val"]["documents"] == 1
    assert streams(tmp_path / "many") == streams(tmp_path / "one")
    raw = text.encode()
    cut = int(len(raw) * 0.9)  # the last 10% of the bytes (here at a character boundary)
    while raw[cut] & 0xC0 == 0x80:
        cut += 1
    train, val = streams(tmp_path / "many")
    assert bytes(train[1:-1]) == raw[:cut] and bytes(val[1:-1]) == raw[cut:]


def test_a_sigkilled_prepare_reruns_only_its_unfinished_tasks_into_identical_shards(tmp_path,
                                                                                   monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        write_jsonl(inputs / f"{i}.jsonl", make_docs(20, seed=i))
    monkeypatch.setattr(prepare, "TASK_BYTES", 1500)
    prepare.prepare(data_config(inputs), 0, tmp_path / "uninterrupted", workers=1)
    tasks = prepare.load(tmp_path / "uninterrupted").meta["tasks"]
    assert tasks >= 6
    out = tmp_path / "killed"
    code = f"""
import time
from lm import prepare, shards
prepare.TASK_BYTES = 1500
run_task = shards.run_task
def slow(*args):
    time.sleep(0.3)
    return run_task(*args)
shards.run_task = slow
prepare.run(["lm.prepare", "--config=configs/tiny.py", "--config.data.tokenizer=byte",
             "--config.data.prepare_workers=1", "--config.data.path={inputs}", "--out={out}"])
"""
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (list(out.glob("shards-*/done/*.json"))):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(out.glob("shards-*/done/*.json")))
    assert 1 <= done < tasks and not prepare.is_prepared(out)
    rerun = subprocess.run([sys.executable, "-c", code.replace("time.sleep(0.3)", "pass")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} of {tasks} tasks already done" in rerun.stdout
    assert shard_bytes(out) == shard_bytes(tmp_path / "uninterrupted")


def test_two_task_shard_preparers_write_exactly_the_shards_of_one(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        write_jsonl(inputs / f"{i}.jsonl.gz", make_docs(15, seed=i), compress="gz")
    monkeypatch.setattr(prepare, "TASK_BYTES", 700)
    config = data_config(inputs, tokenizer="char")  # fitted by each preparer: the same one
    prepare.prepare(config, 0, tmp_path / "one", workers=1)
    assert prepare.prepare(config, 0, tmp_path / "two", task_shard=(1, 2), workers=1)
    assert not prepare.is_prepared(tmp_path / "two")  # the other preparer's tasks are missing
    prepare.prepare(config, 0, tmp_path / "two", task_shard=(0, 2), workers=1)
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    with pytest.raises(ConfigError, match=r"--task_shard='2/2' must be I/N with 0 <= I < N"):
        prepare._task_shard("2/2")


def test_a_task_failing_in_a_worker_names_its_file_and_the_rerun_keeps_the_done_tasks(
        tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    docs = [make_docs(12, seed=i) for i in range(3)]
    for i in range(2):
        write_jsonl(inputs / f"{i}.jsonl.gz", docs[i], compress="gz")
    bad = docs[2] + ["fine", 3]  # the 17th line has a number for its text
    write_jsonl(inputs / "2.jsonl.gz", bad, compress="gz")
    monkeypatch.setattr(prepare, "TASK_BYTES", 100)  # a task per (compressed) file
    with pytest.raises(ConfigError) as error:
        prepare.prepare(data_config(inputs), 0, tmp_path / "out", workers=2)
    assert str(error.value) == (f"{inputs}/2.jsonl.gz:17: no string field 'text'; fix the record "
                                f"or set config.data.text_field to the field that holds the text")
    assert len(list((tmp_path / "out").glob("shards-*/done/*.json"))) == 2
    write_jsonl(inputs / "2.jsonl.gz", docs[2] + ["fine", "3"], compress="gz")
    capsys.readouterr()
    prepare.prepare(data_config(inputs), 0, tmp_path / "out", workers=1)
    assert "2 of 3 tasks already done" in capsys.readouterr().out
    prepare.prepare(data_config(inputs), 0, tmp_path / "fresh", workers=1)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "fresh")


def bad_formats(directory):
    table = pa.table({"body": ["some text"] * 50})
    pq.write_table(table, directory / "columnless.parquet", row_group_size=10)
    good = directory / "good.parquet"
    pq.write_table(pa.table({"text": ["some text"] * 50}), good, row_group_size=10)
    (directory / "truncated.parquet").write_bytes(good.read_bytes()[:-100])
    compressed = zstandard.ZstdCompressor().compress(b'{"text": "x"}\n' * 2000)
    (directory / "truncated.jsonl.zst").write_bytes(compressed[:len(compressed) // 2])
    (directory / "garbage.txt.zst").write_bytes(b"not zstd at all")
    with pa.OSFile(str(directory / "columnless.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)


@pytest.mark.parametrize("name, message", [
    ("columnless.parquet", r"columnless.parquet: no column 'text' \(it has body\); set "
                           r"config.data.text_field"),
    ("truncated.parquet", r"truncated.parquet: not a readable parquet file \(.*\); rewrite it"),
    ("truncated.jsonl.zst", r"truncated.jsonl.zst: not a readable zstd file \(it ends inside a "
                            r"frame: truncated\)"),
    ("garbage.txt.zst", r"garbage.txt.zst: not a readable zstd file \(.*\)"),
    ("columnless.arrow", r"columnless.arrow: no column 'text' \(it has body\)"),
])
def test_bad_files_of_every_format_are_one_line_errors_naming_them(tmp_path, name, message):
    bad_formats(tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        prepare.prepare(data_config(tmp_path / name), 0, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_a_missing_extra_or_an_unreachable_hub_dataset_is_a_one_line_error(tmp_path, monkeypatch):
    bad_formats(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ConfigError, match=r'needs the `pyarrow.parquet` package: pip install -e '
                                          r'"\.\[data\]"'):
        corpus.read_documents(data_config(tmp_path / "good.parquet"))
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ConfigError, match=r"^config.data.path='hf:nobody/nothing': cannot stream "
                                          r"this dataset from the HuggingFace hub \(.*\); check "
                                          r"the name and the network[^\n]*$"):
        prepare.prepare(data_config("hf:nobody/nothing"), 0, tmp_path / "out")


def test_a_bucket_corpus_prepared_into_the_bucket_by_workers_is_the_local_one(
        gcs_server, formats, tmp_path, monkeypatch):
    docs, paths = formats
    for name in ("jsonl.zst", "parquet"):
        fs.upload(paths[name], f"gs://bucket/corpus/docs.{name}")
    monkeypatch.setattr(prepare, "TASK_BYTES", 2000)
    config = data_config("gs://bucket/corpus", tokenizer="char")
    local = data_config(f"{paths['jsonl.zst']},{paths['parquet']}", tokenizer="char")
    prepare.prepare(local, 0, tmp_path / "local", workers=1)
    assert prepare.prepare(config, 0, "gs://bucket/prepared", workers=2)
    assert not prepare.prepare(config, 0, "gs://bucket/prepared")  # reused from a listing
    remote = prepare.load("gs://bucket/prepared")
    assert remote.meta["tasks"] > 2
    assert [s.window(0, len(s))["tokens"].tolist() for s in (remote.train, remote.val)] == \
        streams(tmp_path / "local")
    assert remote.tokenizer.to_json() == prepare.load(tmp_path / "local").tokenizer.to_json()


def test_two_jax_processes_each_tokenize_a_share_into_exactly_the_shards_of_one(tmp_path,
                                                                                monkeypatch):
    from test_multihost import env, free_port

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        write_jsonl(inputs / f"{i}.jsonl.gz", make_docs(15, seed=i), compress="gz")
    monkeypatch.setattr(prepare, "TASK_BYTES", 100)  # a task per file
    config = data_config(inputs, tokenizer="char", prepare_workers=1)
    prepare.prepare(config, 0, tmp_path / "one")
    port, out = free_port(), tmp_path / "two"
    code = f"""
import sys
import jax
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                           process_id=int(sys.argv[1]))
from lm import prepare
from lm.config import default_config
prepare.TASK_BYTES = 100
config = default_config().data
config.update(path="{inputs}", tokenizer="char", prepare_workers=1)
config.prepared_dir = "{out}"
prepare.prepared_data(config, 0, "unused")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "data: process 1 tokenized" in outputs[1] and "(2 of 4 tasks)" in outputs[1]
    assert shard_bytes(out) == shard_bytes(tmp_path / "one")
