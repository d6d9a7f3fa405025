"""EleutherAI's lm-evaluation-harness (`lm_eval`) on an lm run: any harness task, any checkpoint.

    results = lm.load("runs/quickstart").harness(["hellaswag"], limit=100)
    python -m lm.evaluate --mode=harness --workdir=RUN --tasks=hellaswag,lambada_openai

`LmHarness` is an `lm_eval.api.model.LM`, registered as "lm" (`model_args="workdir=RUN"`). It
answers the harness's three request types as its HuggingFace backend (`hf`) does, so that the
numbers compare with published ones:
  loglikelihood: context and continuation tokenized by the harness's own rule (the context's
    trailing spaces move onto the continuation; an empty context becomes the prefix token), cut
    from the left to the model's window, scored by lm/scoring.py, continuations that share a
    context in one row;
  loglikelihood_rolling: the harness's disjoint windows (`get_rolling_token_windows`, each token
    scored once, the last window with a full context), scored the same way;
  generate_until: lm's KV-cache sampler, greedy unless the task asks to sample, up to the task's
    max_gen_toks, cut at its `until` strings and at the end-of-text token.

The prefix token (what an empty context and a rolling document's first window start from) is the
HF backend's for a HuggingFace tokenizer, its beginning-of-text id or else its end-of-text id, and
for a tokenizer lm trained, the end-of-document id that starts every training document.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Sequence

from lm.config import ConfigError

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise ConfigError("the harness needs EleutherAI's lm-evaluation-harness: pip install "
                      "lm-eval (or pip install -e '.[eval]')") from None

from tqdm import tqdm

from lm import scoring
from lm import tokenizer as tokenizers
from lm.sampling import SamplingOptions

DEFAULT_MAX_GEN_TOKS = 256  # the HF backend's


@register_model("lm")
class LmHarness(TemplateLM):
    """An lm run as a harness model: `LmHarness(run=lm.load(RUN))`, or by name,
    `simple_evaluate(model="lm", model_args="workdir=RUN,step=1000")`.

    `batch_size`: rows per scoring batch and prompts per generation batch (rounded up to fill the
    mesh's batch axes).
    """

    def __init__(self, workdir: str | None = None, step: int | None = None, batch_size: int = 8,
                 run: Any = None, prefix_token_id: int | None = None, seed: int = 0,
                 **unused: Any):
        super().__init__()
        if run is None:
            if workdir is None:
                raise ConfigError("the lm harness model needs a run: model_args='workdir=RUN'")
            import lm
            run = lm.load(workdir, step=None if step is None else int(step))
        # The harness passes its own --batch_size on, "auto" included: lm's batches are rows.
        batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.run, self.batch_size, self.seed = run, max(1, batch_size), int(seed)
        self.window = run.model.cfg.context_length
        self._prefix = _prefix_token(run.tokenizer) if prefix_token_id is None else int(
            prefix_token_id)

    @property
    def eot_token_id(self) -> int:
        return self.run.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return f"lm:{Path(str(self.run.config.data.tokenizer)).name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any
                   ) -> list[int]:
        """Ids without special tokens, as the HF backend encodes for a GPT-2 tokenizer."""
        try:
            return self.run.tokenizer.encode(string).tolist()
        except ConfigError as e:
            raise ConfigError(f"this run's tokenizer cannot encode the tasks' text: {e}") from None

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        bar = tqdm(total=len(requests), desc="lm loglikelihood", disable=disable_tqdm or None)
        results = scoring.score(self.run.model, self.run.params, self.run.mesh,
                                [(context, continuation) for _, context, continuation in requests],
                                rows_per_batch=self.batch_size,
                                valid_vocab=self.run.tokenizer.vocab_size, progress=bar.update)
        bar.close()
        for (pair, _, _), answer in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over the harness's disjoint windows of the model's context."""
        windows, owners = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.window, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context; requests with the same generation settings share
        batches, longest context first (as the HF backend orders them)."""
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        bar = tqdm(total=len(requests), desc="lm generate_until", disable=disable_tqdm or None)
        for indices in groups.values():
            for batch, texts in self._generate_group([requests[i].args for i in indices]):
                for i, text in zip(batch, texts):
                    results[indices[i]] = text
                    self.cache_hook.add_partial("generate_until", requests[indices[i]].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def _generate_group(self, args: list[tuple[str, dict]]):
        """(indices into `args`, their texts) a batch at a time, for contexts that share one
        dict of generation settings."""
        settings = _Generation.of(args[0][1], self.window,
                                  self.run.tokenizer.decode([self.eot_token_id]))
        self._check_decoding(args[0][0])
        prompts = [self._prompt(context, settings.max_context) for context, _ in args]
        ordered = sorted(range(len(args)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start:start + self.batch_size]
            yield batch, self._generate([prompts[i] for i in batch], settings)

    def _check_decoding(self, text: str) -> None:
        """Generations are read as text: a tokenizer whose decoding garbles what it encoded (one
        saved without its decoder, say) would turn every answer wrong without a word."""
        back = self.run.tokenizer.decode(self.tok_encode(text))
        if back.split() != text.split():
            raise ConfigError(f"this run's tokenizer cannot decode what it encodes ({text[:30]!r} "
                              f"comes back as {back[:30]!r}), so its generations cannot be read; "
                              f"give the run a tokenizer.json with its decoder")

    def _prompt(self, context: str, max_context: int) -> list[int]:
        """The context's ids, cut from the left to leave room for the new tokens; an empty context
        is the prefix token (a prompt needs one)."""
        ids = self.tok_encode(context)[-max_context:]
        return ids or [self.prefix_token_id]

    def _generate(self, prompts: list[list[int]], settings: _Generation) -> list[str]:
        width = scoring.bucket(max(map(len, prompts)), settings.max_context)
        tokens = self.run.generate_tokens(prompts, settings.max_new, options=settings.options,
                                          seed=self.seed, pad_to=width)
        # Special tokens' text left out, as the HF backend decodes (skip_special_tokens=True).
        return [postprocess_generated_text(self.run.tokenizer.decode(t, skip_special_tokens=True),
                                           settings.until, None) for t in tokens]

    def get_model_info(self) -> dict:
        return {"lm_step": self.run.step, "lm_context_length": self.window}


@dataclasses.dataclass(frozen=True)
class _Generation:
    until: list[str]
    max_new: int
    max_context: int
    options: SamplingOptions

    @classmethod
    def of(cls, gen_kwargs: dict, window: int, eos_text: str) -> _Generation:
        """A request's generation settings, read as the HF backend reads them: greedy unless
        `do_sample`, `until` plus the end-of-text token."""
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_new = int(kwargs.pop("max_gen_toks"))
        if max_new >= window:
            raise ConfigError(f"the task asks for max_gen_toks={max_new} new tokens, which leaves "
                              f"no room for a prompt in the model's context of {window} tokens")
        options = SamplingOptions(temperature=0.0)
        if kwargs.get("do_sample"):
            options = SamplingOptions(float(kwargs.get("temperature", 1.0)),
                                      int(kwargs.get("top_k") or 0),
                                      float(kwargs.get("top_p") or 1.0))
        return cls(until, max_new, window - max_new, options)


def _prefix_token(tokenizer: tokenizers.Tokenizer) -> int:
    if isinstance(tokenizer, tokenizers.HuggingFaceTokenizer) and tokenizer.bos_id >= 0:
        return tokenizer.bos_id
    if tokenizer.eos_id < 0:
        raise ConfigError("this run's tokenizer has no end-of-text token, which the harness "
                          "needs to start empty contexts and documents; pass "
                          "prefix_token_id=ID in the model's arguments")
    return tokenizer.eos_id


# ---------------------------------------------------------------------------------------------
# Tasks.

def task_manager(tasks: Sequence[str], include_path: str | None = None) -> TaskManager:
    """A TaskManager that knows every task named: the local folder's alone when it has them all
    (indexing the harness's thousands of built-in tasks takes seconds), else the built-in tasks
    too."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include_path={include_path} is not a directory of task YAMLs")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(_known(local, name) for name in tasks):
            return local
    return TaskManager(include_path=include_path)


def check_names(manager: TaskManager, tasks: Sequence[str]) -> None:
    """An unknown name fails with the closest known ones."""
    for name in tasks:
        if not _known(manager, name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ConfigError(f"unknown harness task {name!r}{hint} (`lm-eval ls tasks` lists "
                              f"them all; local YAML tasks need --include_path)")


def _known(manager: TaskManager, name: str) -> bool:
    return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


@dataclasses.dataclass(frozen=True)
class Tasks:
    """Tasks and groups built, their data read, and the TaskManager that knows them."""
    manager: TaskManager
    built: list


def load_tasks(tasks: str | Sequence[str], include_path: str | None = None,
               manager: TaskManager | None = None) -> Tasks:
    """Named tasks, built: an unknown name or data that cannot be had fails here, before a model
    loads (`manager`: one already indexed, else `task_manager(tasks, include_path)`)."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ConfigError("name at least one harness task, e.g. --tasks=hellaswag")
    manager = manager or task_manager(tasks, include_path)
    check_names(manager, tasks)
    return Tasks(manager, _build(manager, tasks))


def _build(manager: TaskManager, tasks: Sequence[str]) -> list:
    built = []
    for name in tasks:
        try:
            loaded = manager.load([name])
        except OSError as e:  # FileNotFoundError, the datasets hub's ConnectionError
            raise ConfigError(f"task {name!r} needs data that cannot be loaded here "
                              f"({str(e).splitlines()[0]}); run once where its data set can be "
                              f"downloaded into the datasets cache, or evaluate local tasks over "
                              f"local files (--include_path)") from None
        built += [loaded["groups"][name]] if name in loaded["groups"] else loaded["tasks"].values()
    return built


def run_harness(run: Any, tasks: str | Sequence[str] | Tasks, *, num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8, include_path: str | None = None,
                log_samples: bool = False, seed: int = 0, **simple_evaluate_args: Any) -> dict:
    """The harness's results dict (results, groups, configs, ...; `samples` with log_samples) for
    `run` (a LoadedModel) on `tasks`: names of built-in tasks, or of YAML tasks in `include_path`,
    or `load_tasks`' result.

    `limit`: at most this many examples per task; `seed`: the sampler's, for tasks that sample.
    Other keyword arguments go to `lm_eval.simple_evaluate` (e.g. bootstrap_iters, gen_kwargs,
    task_manager; its seeds keep the harness's defaults, so few-shot examples are the ones any
    other backend is shown).
    """
    check_limit(limit)
    if not isinstance(tasks, Tasks):
        tasks = load_tasks(tasks, include_path, simple_evaluate_args.pop("task_manager", None))
    model = LmHarness(run=run, batch_size=batch_size, seed=seed)
    simple_evaluate_args.setdefault("torch_random_seed", None)  # lm has no use for torch
    return lm_eval.simple_evaluate(
        model=model, tasks=tasks.built, num_fewshot=num_fewshot, limit=limit,
        task_manager=tasks.manager, log_samples=log_samples, **simple_evaluate_args)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit={limit} must be at least 1 (examples per task), or left out "
                          f"for every example")


def results_table(results: dict) -> str:
    """The harness's markdown table of the results (and of the groups, when there are any)."""
    table = lm_eval.utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_eval.utils.make_table(results, "groups")
    return table
