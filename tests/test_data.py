"""The data path: inputs, the prepare step's shards and their reuse, the grain loader's sharding,
determinism and resumption, prompt/completion masks, document packing, and bad input."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from test_checkpoint import losses
from test_train import run_train

from lm import corpus, data, perplexity, prepare, sharding, step
from lm import tokenizer as tokenizers
from lm.config import ConfigError, default_config
from lm.model import ModelConfig, Transformer, token_losses

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 8


def data_config(path, **overrides):
    config = default_config().data
    config.update({"path": str(path), "tokenizer": "byte", **overrides})
    return config


def write_docs(directory, count=12, words=40):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lexicon = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    for i in range(count):
        (directory / f"{i:02}.txt").write_text(" ".join(rng.choice(lexicon, words)) + "\n")
    return directory


def numbered_stream(num_windows, shards=3):
    """Tokens 0, 1, 2, ...: a window is known by its first token. Split unevenly into shards, so
    that windows cross shard boundaries."""
    tokens = np.arange(num_windows * LENGTH + LENGTH, dtype=np.uint32)
    return data.TokenStream(np.array_split(tokens, [5, 5 + 3 * LENGTH + 2][:shards - 1]))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# The loader: sharding over processes, determinism, resumption.

@pytest.mark.parametrize("processes", [1, 2, 4])
def test_one_epoch_reads_every_window_once_and_no_window_in_two_processes(processes):
    per_epoch, global_batch = 16, 8
    stream = numbered_stream(per_epoch)
    steps = per_epoch // global_batch
    batches = [take(data.train_batches(stream, LENGTH, global_batch, seed=0, process_index=p,
                                       process_count=processes), steps)
               for p in range(processes)]
    starts = [int(s) for process in batches for b in process for s in b["inputs"][:, 0]]
    assert len(starts) == len(set(starts)) == per_epoch
    offset = starts[0] % LENGTH
    assert sorted(starts) == [offset + i * LENGTH for i in range(per_epoch)]
    for batch in (b for process in batches for b in process):
        windows = batch["inputs"][:, :1] + np.arange(LENGTH + 1)
        np.testing.assert_array_equal(batch["inputs"], windows[:, :-1])
        np.testing.assert_array_equal(batch["targets"], windows[:, 1:])
        assert batch["inputs"].shape == (global_batch // processes, LENGTH)
    # Global batch k is the same windows whatever the number of processes.
    one = take(data.train_batches(stream, LENGTH, global_batch, seed=0, process_index=0,
                                  process_count=1), steps)
    for k in range(steps):
        assert (sorted(one[k]["inputs"][:, 0].tolist())
                == sorted(s for process in batches for s in process[k]["inputs"][:, 0].tolist()))


def test_the_same_seed_gives_the_same_batches_and_another_seed_another_order():
    stream = numbered_stream(16)

    def first_tokens(seed):
        batches = take(data.train_batches(stream, LENGTH, 4, seed=seed), 8)
        return [b["inputs"][:, 0].tolist() for b in batches]

    assert first_tokens(0) == first_tokens(0)
    assert first_tokens(0) != first_tokens(1)


def test_a_restored_iterator_state_continues_with_exactly_the_next_batches():
    stream = numbered_stream(16)
    uninterrupted = take(data.train_batches(stream, LENGTH, 4, seed=3), 12)
    first = data.train_batches(stream, LENGTH, 4, seed=3)
    take(first, 5)
    state = first.get_state()
    assert len(json.dumps(state)) < 200  # positions only, no arrays: checkpoints stay small
    resumed = data.train_batches(stream, LENGTH, 4, seed=3)
    resumed.set_state(state)
    for expected, batch in zip(uninterrupted[5:], take(resumed, 7)):  # across three epochs
        assert expected.keys() == batch.keys()
        for key in expected:
            np.testing.assert_array_equal(expected[key], batch[key])


def test_a_split_shorter_than_one_window_is_a_one_line_error():
    stream = data.TokenStream([np.arange(LENGTH + 3, dtype=np.uint16)])
    with pytest.raises(ConfigError, match=r"^the train split has 11 tokens, too few for one window "
                                          r"of context_length\+1=9[^\n]*$"):
        data.train_batches(stream, LENGTH, 4, seed=0)


# The prepare step: shards, reuse, atomicity.

def shard_bytes(directory):
    """Every file of a prepared directory, by its path inside it."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def streams(directory):
    prepared = prepare.load(directory)
    return [s.window(0, len(s))["tokens"].tolist() for s in (prepared.train, prepared.val)]


def test_a_rerun_reuses_the_shards_and_a_changed_input_or_tokenizer_is_tokenized_again(tmp_path):
    inputs, out = write_docs(tmp_path / "in"), tmp_path / "out"
    assert prepare.prepare(data_config(inputs), 0, out)
    before, tokens = shard_bytes(out), streams(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert not prepare.prepare(data_config(inputs), 0, out)
    assert not prepare.prepare(data_config(inputs), 0, out, tokenizers.ByteTokenizer())  # resume
    assert shard_bytes(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes

    assert prepare.prepare(data_config(inputs, tokenizer="char"), 0, out)
    assert streams(out) != tokens
    assert prepare.prepare(data_config(inputs), 0, out)
    assert shard_bytes(out) == before  # the same inputs give byte-identical shards

    (inputs / "03.txt").write_text("a changed document\n")
    assert prepare.prepare(data_config(inputs), 0, out)
    assert streams(out) != tokens


def test_shards_hold_each_document_between_end_of_document_ids(tmp_path):
    inputs = write_docs(tmp_path / "in", count=3)
    prepare.prepare(data_config(inputs, val_fraction=0.0), 0, tmp_path / "out")
    prepared = prepare.load(tmp_path / "out")
    assert prepared.meta["dtype"] == "uint16" and prepared.meta["splits"]["train"]["documents"] == 3
    byte = tokenizers.ByteTokenizer()
    expected = np.concatenate([[byte.eos_id]] + [np.r_[byte.encode(p.read_text()), byte.eos_id]
                                                 for p in sorted(inputs.iterdir())])
    np.testing.assert_array_equal(prepared.train.window(0, len(prepared.train))["tokens"], expected)
    # The first id is never a target: the counts (the unigram baseline's) are of the targets.
    np.testing.assert_array_equal(prepared.counts[0], np.bincount(expected[1:], minlength=257))


def test_worker_processes_write_the_same_shards_as_one_process(tmp_path, monkeypatch):
    inputs = write_docs(tmp_path / "in", count=40, words=200)
    monkeypatch.setattr(prepare, "SHARD_TOKENS", 3000)  # several shards per task
    monkeypatch.setattr(prepare, "TASK_BYTES", 8000)  # several tasks of several files
    prepare.prepare(data_config(inputs), 0, tmp_path / "serial", workers=1)
    pools = []

    class RecordedPool(prepare.ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(prepare, "ProcessPoolExecutor", RecordedPool)
    prepare.prepare(data_config(inputs), 0, tmp_path / "parallel", workers=2)
    assert pools == [2]
    serial = shard_bytes(tmp_path / "serial")
    assert len([n for n in serial if "/train-" in n]) > 6
    assert shard_bytes(tmp_path / "parallel") == serial


def test_an_interrupted_prepare_leaves_the_previous_output_trusted_and_a_rerun_finishes(
        tmp_path, monkeypatch):
    inputs, out = write_docs(tmp_path / "in"), tmp_path / "out"
    prepare.prepare(data_config(inputs), 0, out)
    good, good_tokens = shard_bytes(out), streams(out)
    (inputs / "00.txt").write_text("changed\n")
    real_write = prepare.shards.ShardWriter.write

    def interrupted(self, ids, weights):
        real_write(self, ids[:10], None)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare.shards.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(data_config(inputs), 0, out)
    # The old, complete data is still what meta.json names: stale for the new input, never torn.
    named = {n for n in good if not n.endswith("plan.json") and "/done/" not in n}
    assert {n: b for n, b in shard_bytes(out).items() if n in named} == {n: good[n] for n in named}
    assert streams(out) == good_tokens
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(data_config(inputs), 0, tmp_path / "new")
    assert not prepare.is_prepared(tmp_path / "new")

    monkeypatch.undo()
    assert prepare.prepare(data_config(inputs), 0, out)
    assert prepare.prepare(data_config(inputs), 0, tmp_path / "new")
    assert streams(out) == streams(tmp_path / "new") != good_tokens
    assert shard_bytes(out) == shard_bytes(tmp_path / "new")  # leftovers removed


def test_inputs_may_be_jsonl_and_gzip_of_text_or_jsonl(tmp_path):
    texts = ["first document\n", "second, with ünïcode\n", "third\n", "fourth\n"]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": texts[1], "id": 1}) + "\n\n")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(texts[2].encode()))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(json.dumps({"body": texts[3]}).encode()))
    assert corpus.read_documents(data_config(tmp_path, text_field="body")) == texts


# Prompt/completion examples.

EXAMPLES = [{"prompt": f"Q: {a}+{b}?\nA:", "completion": f" {a + b}"}
            for a in range(8) for b in range(8)]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("examples") / "sums.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = path.parent / "prepared"
    prepare.prepare(data_config(path, format="prompt_completion", tokenizer="char",
                                val_fraction=0.0), 0, out)
    return prepare.load(out)


def test_the_mask_is_zero_exactly_where_the_target_is_a_prompt_token(examples):
    char = examples.tokenizer
    is_prompt = np.concatenate([[1]] + [np.r_[np.ones(len(e["prompt"])),
                                              np.zeros(len(e["completion"]) + 1)]
                                        for e in EXAMPLES])
    count = (len(examples.train) - 1) // LENGTH
    (batch,) = data.eval_batches(examples.train, LENGTH, count, 1)  # every window, in order
    targets = np.arange(count)[:, None] * LENGTH + 1 + np.arange(LENGTH)
    np.testing.assert_array_equal(batch["mask"], 1 - is_prompt[targets])
    assert examples.counts[0].sum() == (1 - is_prompt).sum()  # the baseline counts scored tokens
    assert char.decode(batch["targets"][batch["mask"] == 1]).replace("\n", "") != ""
    assert set(char.decode(batch["targets"][batch["mask"] == 0])) <= set("Q: +?\nA0123456789")


def test_the_loss_ignores_the_logits_of_prompt_targets_and_uses_the_completions(examples):
    class Logits:  # a stand-in model whose parameters are its logits, scored as the model scores
        def apply(self, variables, inputs, targets, **_):
            return token_losses(variables["params"], targets)

    batch = next(data.train_batches(examples.train, LENGTH, 8, seed=0))
    logits = np.random.default_rng(0).normal(size=batch["inputs"].shape + (64,)).astype(np.float32)
    grads = jax.grad(lambda p: step.loss_sums(p, Logits(), batch, 0.0, None)[0])(logits)
    per_position = np.abs(np.asarray(grads)).sum(-1)
    assert 0 < batch["mask"].sum() < batch["mask"].size
    assert (per_position[batch["mask"] == 0] == 0).all()
    assert (per_position[batch["mask"] == 1] > 0).all()


# Document packing.

def test_segment_ids_and_positions_restart_at_each_end_of_document():
    eos = 9
    packed = data.segments(np.array([[5, 6, eos, 7, eos, eos, 8, 8], [eos, 1, 2, 3, 4, 5, 6, 7]]),
                           eos)
    np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 2, 2, 3, 4, 4, 4], [1] * 8])
    np.testing.assert_array_equal(packed["positions"], [[0, 1, 0, 1, 0, 0, 1, 2], range(8)])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Short documents prepared with the byte tokenizer, and a small random model for them."""
    path = tmp_path_factory.mktemp("packed") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}: " + "ab" * (i % 5)}) + "\n"
                            for i in range(40)))
    prepare.prepare(data_config(path), 0, path.parent / "out")
    prepared = prepare.load(path.parent / "out")
    model_fields = default_config().model
    model_fields.update(num_layers=2, d_model=32, num_heads=4, context_length=48)
    model = Transformer(ModelConfig.from_config(model_fields, 384))
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 48), np.int32))["params"]
    return prepared, model, params


def whole_documents(inputs, eos):
    """(start, stop) of each document of a row that starts at an end-of-document id and ends
    before the next one: [eos, text...]."""
    ends = np.flatnonzero(inputs == eos)
    return list(zip(ends[:-1], ends[1:]))


def test_a_packed_document_has_the_logits_it_has_alone(packed):
    prepared, model, params = packed
    eos, length = prepared.tokenizer.eos_id, model.cfg.context_length
    batch = next(data.train_batches(prepared.train, length, 4, seed=0, segment_eos=eos))
    row = batch["inputs"][0]
    start, stop = whole_documents(row, eos)[0]
    # The document's own end-of-document id before it is its position 0, as it is alone.
    np.testing.assert_array_equal(row[start:stop], tokenizers.document_ids(
        prepared.tokenizer, prepared.tokenizer.decode(row[start + 1:stop])))
    assert batch["positions"][0, start] == 0 and batch["positions"][0, stop - 1] == stop - 1 - start
    assert len(set(batch["segment_ids"][0, start:stop])) == 1
    assert batch["segment_ids"][0, start - 1] != batch["segment_ids"][0, start]
    apply = jax.jit(model.apply)  # compiled calls, not op-by-op dispatch
    packed_logits = apply({"params": params}, batch["inputs"][:1],
                          positions=batch["positions"][:1], segment_ids=batch["segment_ids"][:1])
    alone = apply({"params": params}, row[None, start:stop])
    np.testing.assert_allclose(packed_logits[0, start:stop], alone[0], atol=1e-5, rtol=0)


def test_packed_training_scores_each_document_as_perplexity_does(packed):
    """The training loss of a packed run on its documents' text is their perplexity's nats: the
    same positions and the same first-token context, in a train window and in a split's first
    window (which starts the stream)."""
    prepared, model, params = packed
    tokenizer, length = prepared.tokenizer, model.cfg.context_length
    eos = tokenizer.eos_id
    train = next(data.train_batches(prepared.train, length, 4, seed=0, segment_eos=eos))
    first = data.eval_batches(prepared.train, length, 4, 1, segment_eos=eos)[0]
    # The stream starts as every document does: its first document is whole from position 0.
    assert whole_documents(first["inputs"][0], eos)[0][0] == 0
    rows = [(train, 0), (first, 0)]
    loss_of = jax.jit(lambda batch: step.loss_sums(params, model, batch, 0.0, None)[1])
    texts, nats, tokens = [], 0.0, 0
    for batch, row in rows:
        for start, stop in whole_documents(batch["inputs"][row], eos):
            texts.append(tokenizer.decode(batch["inputs"][row, start + 1:stop]))
            mask = np.zeros_like(batch["mask"])
            mask[row, start:stop - 1] = 1.0  # the text's tokens as targets, not its end
            nll, count = loss_of({**batch, "mask": mask})
            nats, tokens = nats + float(nll), tokens + int(count)
    assert len(texts) >= 4
    mesh = sharding.make_mesh(default_config(), jax.devices()[:1])
    score = perplexity.score_documents(model, params, tokenizer, texts, mesh, progress=False)
    assert score.tokens == tokens
    assert score.nats == pytest.approx(nats, rel=1e-5)


# Bad input: one line naming the problem, and nothing written.

def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode() + "naïve".encode("latin-1"))
    (tmp_path / "latin1.txt.gz").write_bytes(gzip.compress("ok\nnaïve".encode("latin-1")))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "no closing brace"\n')
    (tmp_path / "fieldless.jsonl").write_text('{"text": "fine"}\n\n{"body": "elsewhere"}\n')
    (tmp_path / "plain.txt").write_text("not an example\n")
    (tmp_path / "not.gz").write_text("not gzip")


@pytest.mark.parametrize("path, overrides, message", [
    ("nothing/*.txt", {}, r"config.data.path='.*nothing/\*.txt' matches no files"),
    ("empty.txt", {}, r"the corpus is empty"),
    ("latin1.txt", {}, r"latin1.txt: not UTF-8 text \(byte offset 15\)"),
    ("latin1.txt.gz", {}, r"latin1.txt.gz: not UTF-8 text \(byte offset 5 of the decompressed"),
    ("broken.jsonl", {}, r"broken.jsonl:2: not JSON"),
    ("fieldless.jsonl", {}, r"fieldless.jsonl:3: no string field 'text'.*config.data.text_field"),
    ("broken.jsonl", {"text_field": "body"}, r"broken.jsonl:1: no string field 'body'"),
    ("plain.txt", {"format": "prompt_completion"}, r"plain.txt: prompt_completion records must "
                                                   r"come from .jsonl, .parquet or .arrow files"),
    ("not.gz", {}, r"not.gz: not a readable gzip file"),
    ("builtin:nope", {}, r"unknown built-in corpus"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, path, overrides, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad_inputs(inputs)
    path = path if path.startswith("builtin:") else str(inputs / path)
    with pytest.raises(ConfigError, match=message) as error:
        prepare.prepare(data_config(path, **overrides), 0, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_prepare_refuses_to_overwrite_a_directory_it_did_not_write(tmp_path):
    inputs = write_docs(tmp_path / "in")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="mine exists and is not a prepared data directory"):
        prepare.prepare(data_config(inputs), 0, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def run_prepare(*args):
    return subprocess.run([sys.executable, "-m", "lm.prepare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_prepare_binary_writes_shards_and_reports_bad_input_in_one_line(tmp_path):
    inputs = write_docs(tmp_path / "in")
    result = run_prepare("--config=configs/tiny.py", f"--config.data.path={inputs}",
                         f"--out={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "MB/s" in result.stdout and f"--config.data.path={tmp_path / 'out'}" in result.stdout
    held_out = corpus.split_documents(corpus.read_documents(data_config(inputs)), 0.1, 0)[1]
    assert prepare.load(tmp_path / "out").meta["splits"]["val"]["documents"] == len(held_out) > 0

    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    result = run_prepare("--config=configs/tiny.py", f"--config.data.path={tmp_path}/bad.jsonl",
                         f"--out={tmp_path / 'bad'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/bad.jsonl:1: no string field 'text'; fix the record or set "
        f"config.data.text_field to the field that holds the text"]
    assert not (tmp_path / "bad").exists()


def test_the_prepare_tokenizer_and_hf_binaries_run_from_python(tmp_path):
    """Each binary's `run(argv)` defines its flags and runs it (as `python -m` does), so all three
    run in one Python process, each with its own flags."""
    inputs = write_docs(tmp_path / "in", count=3)
    code = f"""
from lm import hf, prepare, tokenizer
for binary, argv in (
        (prepare, ["lm.prepare", "--config=configs/tiny.py", "--config.data.path={inputs}",
                   "--out={tmp_path / 'out'}"]),
        (tokenizer, ["lm.tokenizer", "--input={inputs}/*.txt", "--vocab_size=300",
                     "--model_prefix={tmp_path / 'spm'}"]),
        (hf, ["lm.hf", "export", "--workdir={tmp_path / 'nowhere'}", "--hf_dir={tmp_path / 'hf'}"])):
    try:
        binary.run(argv)
    except SystemExit as e:
        print(binary.__name__, "exit", e.code)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert prepare.load(tmp_path / "out").meta["splits"]["train"]["documents"] == 3
    assert tokenizers.SentencePieceTokenizer.from_file(tmp_path / "spm.model").vocab_size == 300
    assert result.stdout.splitlines()[-1] == (f"lm.hf exit error: {tmp_path}/nowhere/config.json "
                                              f"does not exist; pass a workdir that lm.train or "
                                              f"lm.hf import wrote")


# End to end.

def test_fine_tuning_on_prompt_completion_jsonl_resumes_exactly_through_the_train_binary(tmp_path):
    from configs import tiny
    from lm.train import train_and_evaluate

    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES * 4))
    flags = dict(path=str(path), format="prompt_completion", segment_documents=True)
    overrides = [f"--config.data.{k}={v}" for k, v in flags.items()] + [
        "--config.optim.decay_steps=8", "--config.train.log_every=1",
        "--config.train.checkpoint_every=4"]
    config = tiny.get_config()
    config.data.update(flags)
    config.optim.decay_steps = 8
    config.train.update(steps=8, log_every=1, checkpoint_every=4)
    train_and_evaluate(config, tmp_path / "uninterrupted")
    config.train.steps = 4
    train_and_evaluate(config, tmp_path / "resumed")

    result = run_train(tmp_path / "resumed", *overrides, "--config.train.steps=8")
    assert result.returncode == 0, result.stderr
    assert "resumed from step 4" in result.stdout and "data: reusing" in result.stdout
    expected, resumed = losses(tmp_path / "uninterrupted"), losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]
