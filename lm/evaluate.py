"""Evaluate a checkpoint: perplexity and bits per byte, or samples. Runs beside training or later.

    python -m lm.evaluate --workdir=runs/quickstart --mode=perplexity [--data=FILES] [--stride=N]
    python -m lm.evaluate --workdir=runs/quickstart --mode=sample --prompt="def " \
        --max_length=100 --temperature=0.7 --num_return_sequences=3 --seed=0
    python -m lm.evaluate --hf=gpt2 --mode=sample --prompt="Once upon a time" --max_length=100 \
        --temperature=0.7 --num_return_sequences=3     # a HuggingFace hub model, imported once
    python -m lm.evaluate --workdir=runs/chat --mode=sample --chat --prompt="Hi, who are you?"

    python -m lm.evaluate --workdir=runs/quickstart --mode=harness \
        --tasks=hellaswag,lambada_openai --num_fewshot=0 --limit=100 [--include_path=DIR]

Sampling flags follow HuggingFace's `generate` (max_length counts the prompt's tokens; max_new_tokens
does not and wins when both are given).
"""

from __future__ import annotations

from lm import allocator

if __name__ == "__main__":  # before the imports below, which a restart would pay twice
    allocator.restart_with_retained_memory()

import json
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict

from lm import compilation_cache, fs
from lm import tokenizer as tokenizers
from lm.config import ConfigError, parse_flags
from lm.metrics import console
from lm.sampling import SamplingOptions

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir, or a checkpoint step "
                               "directory (workdir/checkpoints/N).")
_HF = flags.DEFINE_string("hf", None, "Instead of --workdir: a HuggingFace hub model (gpt2, "
                          "org/name@revision), imported once into the lm cache directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MODE = flags.DEFINE_enum("mode", "perplexity", ["perplexity", "sample", "harness"],
                          "What to compute: perplexity, samples, or lm-evaluation-harness tasks.")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Mesh fsdp size (the rest of the devices: data).")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Mesh tensor size.")
# perplexity
_DATA = flags.DEFINE_string("data", None, "Files, directories or globs to score (comma-separated); "
                            "default: the run's validation split.")
_STRIDE = flags.DEFINE_integer("stride", None, "Sliding-window step for long documents (default: "
                               "half the context, so every token has at least half a context).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows (harness: rows, or prompts) per "
                              "evaluation batch.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Also write the results to this file.")
# sampling
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Prompt plus new tokens, at most.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "New tokens, at most (default 100).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this mass (1: all).")
_NUM = flags.DEFINE_integer("num_return_sequences", 1, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Cut a sample before this string; repeatable.")
_CHAT = flags.DEFINE_bool("chat", False, "Each prompt is a user's turn in the run's chat template "
                          "(lm/chat.py); the reply stops at the end-of-turn token.")
# lm-evaluation-harness
_TASKS = flags.DEFINE_list("tasks", [], "Harness tasks, groups or tags (comma-separated).")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: each task's).")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many examples per task.")
_INCLUDE = flags.DEFINE_string("include_path", None, "A directory of task YAMLs (local tasks).")
_TRUNCATE = flags.DEFINE_bool("truncate_prompt", False, "Keep a too-long prompt's last tokens "
                              "instead of failing.")
_SKIP_SPECIAL = flags.DEFINE_bool("skip_special_tokens", True, "Leave special tokens (e.g. "
                                  "<|endoftext|>) out of the printed samples, as HuggingFace's "
                                  "decode does; --noskip_special_tokens shows them.")


def _documents(run) -> tuple[list[str], str]:
    """(texts, where they came from): --data's files, else the run's validation split. An example
    of prompt/completion data is scored as the one text it makes, a chat as its template renders
    it."""
    from lm import corpus, prepare
    data = ConfigDict(run.config.data.to_dict())
    if _DATA.value:
        data.update(path=_DATA.value, format="text")
        return corpus.read_documents(data), _DATA.value
    if prepare.is_prepared(data.path):
        raise ConfigError(f"the run trained on prepared shards ({data.path}), which keep no "
                          f"document text; pass the text to score with --data")
    held_out = corpus.split_documents(corpus.read_documents(data), data.val_fraction,
                                      run.config.seed)[1]
    texts = [run.chat_template.render(d.as_dicts()) if isinstance(d, corpus.Chat) else
             "".join(d) if isinstance(d, tuple) else d for d in held_out]
    return texts, f"the validation split of {data.path}"


def perplexity(run) -> dict:
    docs, source = _documents(run)
    if not any(docs):
        raise ConfigError(f"{source} has no text to score; pass files with text in --data")
    stride = _STRIDE.value or max(1, run.model.cfg.context_length // 2)
    score = run.perplexity(docs, stride=stride, batch_size=_BATCH.value, progress=True)
    console(f"{score.tokens:,} tokens ({score.bytes:,} bytes) in {len(docs)} documents from "
            f"{source}, step {run.step}, stride {stride}")
    console(f"cross-entropy {score.cross_entropy:.4f} nats/token  perplexity "
            f"{score.perplexity:.3f}  bits per byte {score.bits_per_byte:.4f}")
    return {**score.to_json(), "documents": len(docs), "step": run.step, "stride": stride}


def _prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        try:
            prompts += fs.read_text(_PROMPTS_FILE.value).splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts_file={_PROMPTS_FILE.value}: not UTF-8 text ({e})")
    return prompts or [""]


def _fit(run, prompt: str) -> tuple[np.ndarray, int]:
    """(prompt ids, new tokens) within the context. The prompt starts as `tokenizer.prompt_ids`
    starts it; a too-long one fails unless truncated, which keeps its last ids as they are (token
    ids, never re-encoded text: decoding a cut can change the tokens), with no document start
    before them."""
    context = run.model.cfg.context_length
    # For a model imported from HuggingFace, the prompt's tokens as transformers counts them.
    ids = (run.prompt_ids(prompt, chat=True) if _CHAT.value else
           tokenizers.prompt_ids(run.tokenizer, prompt)
           if getattr(run.tokenizer, "hf_template", False) else run.tokenizer.encode(prompt))
    if _MAX_NEW.value is not None:
        new = _MAX_NEW.value
    elif _MAX_LENGTH.value is not None:
        new = _MAX_LENGTH.value - len(ids)
    else:
        new = 100
    new = max(new, 1)
    if new >= context:
        raise ConfigError(f"{new} new tokens leave no room for a prompt in the model's context of "
                          f"{context}; ask for at most {context - 1} with --max_new_tokens")
    whole = run.prompt_ids(prompt, _CHAT.value)  # as generate starts a text prompt
    if len(whole) <= context - new:
        return whole, new
    if _CHAT.value:
        raise ConfigError(f"the chat prompt ({len(ids)} tokens with its template) plus {new} "
                          f"new tokens exceeds the context of {context} tokens; shorten it or "
                          f"ask for fewer tokens")
    if not _TRUNCATE.value:
        raise ConfigError(f"the prompt ({len(ids)} tokens) plus {new} new tokens exceeds the "
                          f"context of {context} tokens; shorten it, ask for fewer tokens, or "
                          f"pass --truncate_prompt to keep its end")
    return ids[len(ids) - (context - new):], new


def _check_sampling_flags() -> None:
    if _NUM.value < 1:
        raise ConfigError(f"--num_return_sequences={_NUM.value} must be >= 1")
    try:
        SamplingOptions(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value).check()
    except ValueError as e:
        raise ConfigError(f"--{e}") from None


def sample(run) -> dict:
    fitted = [_fit(run, p) for p in _prompts()]
    prompts = [ids for ids, _ in fitted for _ in range(_NUM.value)]
    shown = [run.tokenizer.decode(ids, _SKIP_SPECIAL.value) for ids in prompts]
    new = min(n for _, n in fitted)
    stream = len(prompts) == 1 and not _STOP.value and sys.stdout.isatty()
    if stream:
        print(shown[0], end="", flush=True)
    texts = run.generate(prompts, new, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                         top_p=_TOP_P.value, seed=_SEED.value, stop=_STOP.value,
                         on_text=(lambda t: print(t, end="", flush=True)) if stream else None,
                         skip_special_tokens=_SKIP_SPECIAL.value, chat=_CHAT.value)
    if stream:
        print()
    else:
        for i, (prompt, text) in enumerate(zip(shown, texts)):
            console(f"--- sample {i + 1} ---\n{prompt}{text}")
    return {"step": run.step, "samples": [{"prompt": p, "text": t} for p, t in zip(shown, texts)]}


def harness(run, tasks) -> dict:
    from lm.harness import results_table, run_harness
    results = run_harness(run, tasks, num_fewshot=_FEWSHOT.value, limit=_LIMIT.value,
                          batch_size=_BATCH.value)
    console(results_table(results))
    return results


def _harness_tasks():
    """The tasks, built before the model loads: a bad name or missing data fails at once."""
    if not _TASKS.value:
        raise ConfigError("--mode=harness needs --tasks (e.g. --tasks=hellaswag,lambada_openai)")
    from lm.harness import check_limit, load_tasks  # without lm_eval: its one-line error
    check_limit(_LIMIT.value)
    return load_tasks(_TASKS.value, _INCLUDE.value)


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if bool(_WORKDIR.value) == bool(_HF.value):
        sys.exit("error: pass --workdir (a training run's workdir or checkpoint directory) or --hf "
                 "(a HuggingFace hub model such as gpt2), one of them")
    import lm
    compilation_cache.enable()
    try:
        if _MODE.value == "sample":
            _check_sampling_flags()  # before the model loads, which can take a while
        tasks = _harness_tasks() if _MODE.value == "harness" else None
        source = f"hf:{_HF.value}" if _HF.value else _WORKDIR.value
        run = lm.load(source, step=_STEP.value, fsdp=_FSDP.value, tensor=_TENSOR.value)
        if tasks is not None:
            result = harness(run, tasks)
        else:
            result = perplexity(run) if _MODE.value == "perplexity" else sample(run)
        if _OUTPUT.value:
            fs.write_text(_OUTPUT.value, json.dumps(result, indent=2, default=str))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # filesystem trouble outside the paths lm checks itself
        sys.exit(f"error: {fs.explain(e, e.filename or _WORKDIR.value)}")


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
