"""lm-evaluation-harness on lm against the harness's own HuggingFace backend (`hf`), on the same
GPT-2: three local tasks (multiple choice by loglikelihood, rolling perplexity, generation with stop
strings) give the same accuracies, per-request loglikelihoods within 1e-4 and the same texts; the
eval binary prints the harness's table; bad input gets one-line errors.

Nothing is downloaded: the GPT-2 is small and random (trained a little, so that its choices are not
ties), its byte-level BPE is trained here, and the tasks are YAML files over jsonl written here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")
from lm_eval.tasks import TaskManager  # noqa: E402

from test_hf import perturb, train_briefly  # noqa: E402

import lm  # noqa: E402
from lm import hf, scoring  # noqa: E402
from lm import tokenizer as tokenizers  # noqa: E402
from lm.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
CONTEXT = 64
TASKS = ["words_choice", "words_rolling", "words_generate"]


def run_of_words(rng, n, start=None):
    """n words in WORDS' cyclic order from a random (or given) one: text a model learns fast."""
    start = rng.integers(len(WORDS)) if start is None else start
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def corpus(rng, sentences):
    return " ".join(run_of_words(rng, rng.integers(3, 12)) + "." for _ in range(sentences))


def write_task(folder: Path, name: str, docs: list[dict], spec: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{spec}")


def write_tasks(folder: Path) -> Path:
    """Contexts that end in a space, an empty context, contexts longer than the window (cut from
    the left), choices with and without a leading space, documents of several windows, and stop
    strings."""
    rng = np.random.default_rng(1)
    folder.mkdir()
    choice = []
    for _ in range(8):
        start, label = rng.integers(len(WORDS)), rng.integers(4)
        choices = [run_of_words(rng, k) for k in (1, 2, 3, 2)]
        choices[label] = run_of_words(rng, 1 + label % 3, start + 5)
        choice.append({"query": run_of_words(rng, 5, start), "choices": choices,
                       "label": int(label)})
    choice[1]["query"] += " "
    choice[2]["query"] = ""
    choice[3]["query"] = corpus(rng, 10) + " " + choice[3]["query"]
    choice[4]["choices"] = [" " + c for c in choice[4]["choices"]]
    write_task(folder, "words_choice", choice,
               "output_type: multiple_choice\ndoc_to_text: '{{query}}'\n"
               "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
               "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    rolling = [{"text": corpus(rng, n)} for n in (1, 5, 20)]
    write_task(folder, "words_rolling", rolling,
               "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
               "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
               "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    generate = [{"prompt": run_of_words(rng, n), "answer": ""} for n in (3, 4, 5, 6)]
    generate.append({"prompt": corpus(rng, 12) + " alpha bravo", "answer": "charlie delta echo"})
    write_task(folder, "words_generate", generate,
               "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
               "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: [' golf', '.']\n"
               "  max_gen_toks: 10\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return folder


def save_gpt2(folder: Path) -> None:
    """A GPT-2 with a byte-level BPE, trained a little on random words, saved as transformers
    saves it (the tokenizer's files name <|endoftext|> as its bos and eos, as GPT-2's do)."""
    rng = np.random.default_rng(0)
    text = corpus(rng, 3000)
    bpe = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    bpe.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = hf_tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([text], hf_tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    config = transformers.GPT2Config(vocab_size=300, n_positions=CONTEXT, n_embd=64, n_layer=2,
                                     n_head=4, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    perturb(model, 0)
    train_briefly(model, np.array(bpe.encode(text).ids), steps=20)
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                         eos_token="<|endoftext|>").save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    save_gpt2(root / "gpt2")
    hf.import_checkpoint(root / "gpt2", root / "run")
    return root, write_tasks(root / "tasks")


@pytest.fixture(scope="module")
def results(setup):
    """(lm's results, the hf backend's results, lm's run, the scoring programs it compiled): all
    three tasks, one evaluation each."""
    root, tasks = setup
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    common = dict(tasks=TASKS, num_fewshot=0, log_samples=True, bootstrap_iters=0,
                  task_manager=manager)
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(root / "gpt2")},
                                     device="cpu", batch_size=4, **common)
    run = lm.load(root / "run")
    ours = run.harness(batch_size=8, **common)  # all the generation prompts: one compilation
    compiled = scoring.compiled_scorer(run.model, run.tokenizer.vocab_size, run.mesh)._cache_size()
    return ours, theirs, run, compiled


def responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_matches_the_hf_backend_per_choice_and_in_accuracy(results):
    ours, theirs, *_ = results
    mine, hfs = responses(ours, "words_choice"), responses(theirs, "words_choice")
    assert len(mine) == len(hfs) == 8
    for doc_ours, doc_hf in zip(mine, hfs):
        for (ll, greedy), (ll_hf, greedy_hf) in zip((r[0] for r in doc_ours),
                                                    (r[0] for r in doc_hf)):
            assert ll == pytest.approx(ll_hf, abs=1e-4) and ll < 0
            assert greedy == greedy_hf
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["words_choice"][metric] == theirs["results"]["words_choice"][metric]


def test_rolling_loglikelihoods_match_the_hf_backend_over_several_windows(results):
    ours, theirs, run, _ = results
    mine, hfs = responses(ours, "words_rolling"), responses(theirs, "words_rolling")
    lengths = sorted(len(run.tokenizer.encode(s["target"]))
                     for s in ours["samples"]["words_rolling"])
    assert lengths[0] < CONTEXT and lengths[-1] > 2 * CONTEXT  # one window, and three
    for (ll,), (ll_hf,) in zip((r[0] for r in mine), (r[0] for r in hfs)):
        assert ll == pytest.approx(ll_hf, abs=1e-4)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["words_rolling"][metric] == pytest.approx(
            theirs["results"]["words_rolling"][metric], rel=1e-5)


def test_generations_match_the_hf_backend_cut_at_the_stop_strings(results):
    ours, theirs, *_ = results
    mine, hfs = responses(ours, "words_generate"), responses(theirs, "words_generate")
    assert [r[0] for r in mine] == [r[0] for r in hfs]
    texts = [r[0][0] for r in mine]
    assert any(texts) and not any(" golf" in t or "." in t for t in texts)
    assert (ours["results"]["words_generate"]["exact_match,none"]
            == theirs["results"]["words_generate"]["exact_match,none"])


def test_the_harness_finds_lm_by_name(results, setup):
    """`simple_evaluate(model="lm", model_args="workdir=RUN")`, as the harness's own tools name a
    backend, answers as run.harness() did."""
    ours, *_ = results
    root, tasks = setup
    by_name = lm_eval.simple_evaluate(
        model="lm", model_args=f"workdir={root / 'run'},batch_size=8", tasks=["words_choice"],
        limit=3, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    mine = [r[0] for doc in responses(ours, "words_choice")[:3] for r in doc]
    theirs = [r[0] for doc in responses(by_name, "words_choice") for r in doc]
    assert [g for _, g in theirs] == [g for _, g in mine]
    np.testing.assert_allclose([ll for ll, _ in theirs], [ll for ll, _ in mine], atol=1e-5)


def test_requests_of_many_lengths_compile_one_scoring_program_and_share_contexts(results):
    """The choice and rolling tasks' requests (2 to 65 tokens) ran in rows of one length, so one
    program; continuations that share a context share its positions."""
    assert results[3] == 1
    requests = [([1, 2, 3, 4], [5]), ([1, 2, 3, 4], [6, 7]), ([9], [5])]
    units = scoring._units(requests, CONTEXT, 16)
    assert sorted(u.size for u in units) == [1, 6]  # the prefix [1, 2, 3] is laid out once


def test_eval_binary_prints_the_harness_table_and_writes_json(setup, tmp_path):
    root, tasks = setup
    out = tmp_path / "results.json"
    result = run_evaluate("--mode=harness", f"--workdir={root / 'run'}",
                          "--tasks=words_choice", "--limit=3", "--batch_size=8",
                          f"--include_path={tasks}", f"--output_json={out}")
    assert result.returncode == 0, result.stderr
    assert "|words_choice" in result.stdout and "|acc" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["n-samples"]["words_choice"]["effective"] == 3
    assert 0 <= saved["results"]["words_choice"]["acc,none"] <= 1


def run_evaluate(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lm.evaluate", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def test_limit_below_one_is_refused(results, setup):
    with pytest.raises(ConfigError, match="--limit=0 must be at least 1"):
        results[2].harness("words_choice", include_path=str(setup[1]), limit=0)


def test_hub_task_without_its_data_fails_in_one_line(setup, tmp_path):
    """A built-in task offline, with an empty datasets cache: the eval binary names the task and
    what to do, in one line."""
    root, _ = setup
    result = run_evaluate("--mode=harness", f"--workdir={root / 'run'}",
                          "--tasks=lambada_openai", "--limit=2",
                          env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: task 'lambada_openai' needs data that cannot be loaded here")


def test_unknown_task_lists_close_names(results, setup):
    _, tasks = setup
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    with pytest.raises(ConfigError, match="unknown harness task 'words_choise'; close names: "
                                          "words_choice"):
        results[2].harness(["words_choise"], task_manager=manager)


def test_task_whose_data_is_missing_fails_naming_it(results, tmp_path):
    write_task(tmp_path, "words_gone", [], "output_type: multiple_choice\n"
               "doc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: 0\n")
    (tmp_path / "words_gone.jsonl").unlink()
    with pytest.raises(ConfigError, match="task 'words_gone' needs data that cannot be loaded"):
        results[2].harness("words_gone", include_path=str(tmp_path))


def with_tokenizer(run, tokenizer):
    return lm.LoadedModel(run.config, run.model, run.params, tokenizer, run.mesh, run.step)


def test_tokenizer_that_cannot_encode_the_task_says_so(results, tmp_path):
    """A character-level run meets a character outside its vocabulary."""
    chars = tokenizers.CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ")))
    write_task(tmp_path, "words_upper", [{"query": "Alpha", "choices": ["b", "c"], "label": 0}],
               "output_type: multiple_choice\ndoc_to_text: '{{query}}'\n"
               "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n")
    with pytest.raises(ConfigError, match="this run's tokenizer cannot encode the tasks' text: "
                                          "character 'A'"):
        with_tokenizer(results[2], chars).harness("words_upper", include_path=str(tmp_path))


def test_tokenizer_that_cannot_decode_refuses_to_generate(results, setup):
    """A byte-level BPE saved without its decoder decodes ' alpha' as 'Ġalpha'."""
    _, tasks = setup
    run = results[2]
    spec = json.loads(run.tokenizer.spec)
    spec["decoder"] = None
    garbling = tokenizers.HuggingFaceTokenizer(json.dumps(spec), run.tokenizer.bos_id,
                                               run.tokenizer.eos_id, run.tokenizer.pad_id)
    with pytest.raises(ConfigError, match="this run's tokenizer cannot decode what it encodes"):
        with_tokenizer(run, garbling).harness("words_generate", include_path=str(tasks),
                                              limit=1)
