"""lm's lm-evaluation-harness backend beside the harness's own HuggingFace backend (`hf`), in one
run: requests per second on a multiple-choice task shaped like HellaSwag (4 endings of ~25 tokens
after contexts of ~70), GPT-2 small (124M parameters, random weights: the shapes are what costs),
float32, on the CPU (or both on the GPU, where JAX finds one).

    python scripts/harness_benchmark.py [--docs=48] [--batch_size=8] [--repeats=2] \
        [--output_json=harness_bench.json]

Both backends answer the same requests of the same local task (`lm_eval.simple_evaluate`, one
evaluation each, alternated, `hf` first); a row reports the median seconds of the repeats, lm's
first evaluation (which compiles) apart, and checks that the two agree on every loglikelihood. Both
run in one process, with the allocator lm's binaries choose (lm/allocator.py). The text is
Shakespeare where /work/shared/data has it, else generated words; the byte-level BPE is
trained here (4k tokens; the model keeps GPT-2's 50,257-token head).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lm import allocator  # noqa: E402  (stdlib only)

if __name__ == "__main__":  # both backends share the process, so they share lm's allocator
    allocator.restart_with_retained_memory()

_DOCS = flags.DEFINE_integer("docs", 48, "Documents (4 requests each).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Both backends' batch size (hf: requests; lm: "
                              "rows of packed requests).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed evaluations per backend (lm: after its "
                                "first, which compiles).")
_OUTPUT = flags.DEFINE_string("output_json", "", "Also write the row here.")

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
CONTEXT_CHARS, ENDING_CHARS = 280, 100  # ~70 and ~25 tokens of the BPE below


def _text() -> str:
    if SHAKESPEARE.is_file():
        return " ".join(SHAKESPEARE.read_text(encoding="utf-8").split())
    import numpy as np
    words = "the of and to a in that is was he for it with as his on be at by had".split()
    return " ".join(np.random.default_rng(0).choice(words, 200_000))


def save_gpt2_small(folder: Path, text: str) -> None:
    import tokenizers
    import transformers
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([text[:500_000]], tokenizers.trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                         eos_token="<|endoftext|>").save_pretrained(folder)


def write_task(folder: Path, text: str, docs: int) -> None:
    """HellaSwag's shape: a context, four endings (the true one and three from elsewhere)."""
    import numpy as np
    rng = np.random.default_rng(0)
    span = CONTEXT_CHARS + ENDING_CHARS
    rows = []
    for _ in range(docs):
        starts = rng.integers(0, len(text) - span, 4)
        label = int(rng.integers(4))
        endings = [text[s + CONTEXT_CHARS:s + span] for s in starts]
        context = text[starts[label]:starts[label] + CONTEXT_CHARS]
        rows.append({"ctx": context, "endings": endings, "label": label})
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(
        f"task: shaped_like_hellaswag\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        f"doc_to_text: '{{{{ctx}}}}'\ndoc_to_choice: '{{{{endings}}}}'\n"
        f"doc_to_target: '{{{{label}}}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def evaluate(model, manager) -> tuple[float, dict]:
    import lm_eval
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, tasks=["shaped_like_hellaswag"], num_fewshot=0,
                                      task_manager=manager, bootstrap_iters=0, log_samples=True)
    return time.perf_counter() - start, results


def loglikelihoods(results: dict) -> list[float]:
    samples = sorted(results["samples"]["shaped_like_hellaswag"], key=lambda s: s["doc_id"])
    return [r[0][0] for s in samples for r in s["resps"]]


def main(argv: list[str]) -> None:
    import lm
    from lm import hf
    from lm.harness import LmHarness
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = _text()
        save_gpt2_small(tmp / "gpt2", text)
        hf.import_checkpoint(tmp / "gpt2", tmp / "run")
        (tmp / "tasks").mkdir()
        write_task(tmp / "tasks", text, _DOCS.value)
        manager = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
        import jax
        device = "cuda" if jax.default_backend() == "gpu" else "cpu"
        theirs = HFLM(pretrained=str(tmp / "gpt2"), device=device, batch_size=_BATCH.value)
        ours = LmHarness(run=lm.load(tmp / "run"), batch_size=_BATCH.value)
        first, lm_results = evaluate(ours, manager)
        hf_times, lm_times = [], []
        for _ in range(_REPEATS.value):
            seconds, hf_results = evaluate(theirs, manager)
            hf_times.append(seconds)
            seconds, lm_results = evaluate(ours, manager)
            lm_times.append(seconds)
    requests = 4 * _DOCS.value
    hf_rate = requests / statistics.median(hf_times)
    lm_rate = requests / statistics.median(lm_times)
    diff = max(abs(a - b) for a, b in zip(loglikelihoods(lm_results), loglikelihoods(hf_results)))
    row = {"task": "4-way choice, ~70-token contexts, ~25-token endings", "model": "GPT-2 small",
           "device": device,
           "docs": _DOCS.value, "requests": requests, "batch_size": _BATCH.value,
           "hf_requests_per_sec": round(hf_rate, 2), "lm_requests_per_sec": round(lm_rate, 2),
           "lm_vs_hf": round(lm_rate / hf_rate, 2), "lm_first_run_sec": round(first, 1),
           "hf_sec": [round(t, 1) for t in hf_times], "lm_sec": [round(t, 1) for t in lm_times],
           "acc": [r["results"]["shaped_like_hellaswag"]["acc,none"]
                   for r in (lm_results, hf_results)],
           "max_abs_loglikelihood_diff": diff,
           "load_average": [round(x, 2) for x in load_before + os.getloadavg()],
           "cpus": os.cpu_count()}
    print(json.dumps(row, indent=2))
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    app.run(main)
