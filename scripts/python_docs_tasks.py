"""Writes eval_tasks/: two lm-evaluation-harness tasks over local files, from the validation split
of the quickstart's corpus (Python's own documentation, which ships with Python), so that
`--mode=harness` has something real to run without a download:

  python_docs_choice   which of four 6-word endings follows the 16 words of a docstring's start
                       (the true one, and three from other documents: SWAG/HellaSwag's recipe);
  python_docs_rolling  log-likelihood of whole documents (bits per byte, word perplexity).

    python scripts/python_docs_tasks.py [--out=eval_tasks]

The split is the quickstart run's own (its config's seed and val_fraction), so these documents
are held out from its training. The data files are named relative to the repository root: run the
harness from there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_OUT = flags.DEFINE_string("out", "eval_tasks", "Folder to write, relative to the repository "
                           "root.")

CONTEXT_WORDS, ENDING_WORDS = 16, 6


def held_out_documents() -> list[str]:
    from configs.quickstart import get_config
    from lm import corpus
    config = get_config()
    docs = corpus.split_documents(corpus.read_documents(config.data), config.data.val_fraction,
                                  config.seed)[1]
    return [" ".join(d.split()) for d in corpus.texts(docs)]


def choice_docs(texts: list[str], count: int = 200) -> list[dict]:
    rng = np.random.default_rng(0)
    usable = [t.split() for t in texts if len(t.split()) >= CONTEXT_WORDS + ENDING_WORDS]
    usable = [usable[i] for i in rng.permutation(len(usable))[:count]]
    endings = [" " + " ".join(w[CONTEXT_WORDS:CONTEXT_WORDS + ENDING_WORDS]) for w in usable]
    docs = []
    for i, words in enumerate(usable):
        others = rng.choice([j for j in range(len(usable)) if j != i], 3, replace=False)
        choices = [endings[j] for j in others]
        label = int(rng.integers(4))
        choices.insert(label, endings[i])
        docs.append({"ctx": " ".join(words[:CONTEXT_WORDS]), "endings": choices, "label": label})
    return docs


def write(out: Path, name: str, docs: list[dict], spec: str) -> None:
    (ROOT / out / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (ROOT / out / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {out / name}.jsonl\ntest_split: test\n{spec}")


def _metrics(**aggregations: str) -> str:
    """metric_list entries; accuracies are better high, perplexities and bits low."""
    return "".join(f"  - metric: {name}\n    aggregation: {how}\n    higher_is_better: "
                   f"{'true' if name.startswith('acc') else 'false'}\n"
                   for name, how in aggregations.items())


def main(argv: list[str]) -> None:
    out = Path(_OUT.value)
    (ROOT / out).mkdir(parents=True, exist_ok=True)
    texts = held_out_documents()
    write(out, "python_docs_choice", choice_docs(texts),
          "output_type: multiple_choice\ndoc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\n"
          "doc_to_target: '{{label}}'\nmetric_list:\n" + _metrics(acc="mean", acc_norm="mean"))
    rng = np.random.default_rng(1)
    rolling = [{"text": texts[i][:2000]} for i in rng.permutation(len(texts))[:50]]
    write(out, "python_docs_rolling", rolling,
          "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
          "metric_list:\n" + _metrics(word_perplexity="weighted_perplexity",
                                      byte_perplexity="weighted_perplexity",
                                      bits_per_byte="bits_per_byte"))
    print(f"wrote {out}/python_docs_choice and {out}/python_docs_rolling")


if __name__ == "__main__":
    app.run(main)
