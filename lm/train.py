"""Train a language model: `python -m lm.train --config=configs/quickstart.py --workdir=runs/qs`.

`train_and_evaluate(config, workdir)` is the whole job and can be called from a notebook; `main` only
parses flags and turns user errors into one-line messages.
"""

from __future__ import annotations

from lm import allocator

if __name__ == "__main__":  # before the imports below, which a restart would pay twice
    allocator.restart_with_retained_memory()

import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from lm import agreement, chat, checkpoint, compilation_cache, data, distributed, flops, fs
from lm import lora_base, prepare, sampling, sharding, step
from lm import tokenizer as tokenizers
from lm.config import ConfigError, load_config_flag, parse_flags, validate
from lm.metrics import Reporter, console
from lm.preflight import preflight
from lm.model import ModelConfig, Transformer

_DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.")
_PREFLIGHT = flags.DEFINE_bool("preflight", False, "Only compile the train step for the mesh and "
                               "report parameters, FLOPs and memory per device (no data is read).")
_BUDGET = flags.DEFINE_float("memory_budget_gib", 0.0, "With --preflight: fail above this much "
                             "memory per device (default: the device's own limit, if known).")


def evaluate(steps: step.CompiledSteps, params, batches, mesh, global_rows: int
             ) -> tuple[float, int]:
    """(mean loss per token, tokens scored) over `batches`. A batch's sums are fetched once the
    next batch is dispatched, so the device is not left waiting while the host prepares a batch."""
    sums = []
    for batch in batches:
        sums.append(steps.eval(params, sharding.global_batch(mesh, batch, global_rows)))
        if len(sums) > 1:
            sums[-2] = jax.device_get(sums[-2])
    sums = jax.device_get(sums)
    tokens = sum(float(s["tokens"]) for s in sums)
    return sum(float(s["nll"]) for s in sums) / tokens, int(tokens)


class Preempted(Exception):
    """SIGTERM arrived; the current step was saved."""


# Fields that fix what a checkpoint means or the structure of its state: resuming with other values
# would load nonsense, or fail to load. (A function of the value, why) stands where only that
# function matters. tests/test_faults.py checks that every optim field that changes the optimizer
# state's structure is here. (A LoRA run's base, train.init_from, is checked by lm/lora_base.py.)
_Rule = tuple[Callable[[object], object], str]
_FROZEN: dict[str, _Rule | None] = {
    "model": None, "data.tokenizer": None, "data.path": None, "data.chat_template": None,
    "lora": None,
    "optim.grad_clip": (lambda clip: clip is not None and clip > 0,
                        " (clipping on vs off changes the optimizer state)")}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _what_must_stay(key: str) -> _Rule | None:
    """(the function of `key`'s value that a resumed run must keep, why), or None: a free field."""
    for prefix, rule in _FROZEN.items():
        if key == prefix or key.startswith(prefix + "."):
            return rule or (lambda value: value, "")
    return None


def _check_resumable(config: ConfigDict, workdir: fs.PathLike) -> None:
    """Refuse, before anything is restored, a config that changes what the workdir's checkpoints
    mean or the structure of their state; log harmless changes."""
    if not fs.exists(fs.path(workdir) / "config.json"):
        return
    old = _flatten(json.loads(checkpoint.load_run_config(workdir).to_json()))
    new = _flatten(json.loads(config.to_json()))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    frozen = [(k, rule[1]) for k in changed
              if (rule := _what_must_stay(k)) and rule[0](old.get(k)) != rule[0](new.get(k))]
    if frozen:
        key, why = frozen[0]
        # An adapter run's checkpoints hold adapters alone: no base to fine-tune from.
        start_from = "" if old.get("lora.rank") else (
            f", or --config.train.init_from={workdir} to fine-tune from it")
        raise ConfigError(f"{workdir} was created with {key}={old.get(key)!r}, not "
                          f"{new.get(key)!r}{why} ({len(frozen)} such fields differ); use a new "
                          f"--workdir{start_from}")
    _check_decay_length(old, new)
    for key in changed:
        console(f"config change since this workdir was created: {key} {old.get(key)!r} -> "
                f"{new.get(key)!r}")


def _check_decay_length(old: dict, new: dict) -> None:
    """Refuse a resume whose learning-rate decay would change length mid-run only because
    `optim.decay_steps=0` follows `train.steps`: the rest of the run would follow another schedule
    than its first part. Setting decay_steps says which one the user wants."""
    def length(flat: dict) -> int:
        return flat["optim.decay_steps"] or flat["train.steps"]
    if new["optim.schedule"] != "constant" and not new["optim.decay_steps"] \
            and length(old) != length(new):
        raise ConfigError(
            f"resuming with config.train.steps={new['train.steps']} would move the end of the "
            f"learning-rate decay from step {length(old)} to {length(new)} mid-run "
            f"(config.optim.decay_steps=0 follows train.steps); pass "
            f"--config.optim.decay_steps={length(old)} to keep this run's schedule, or "
            f"={length(new)} to stretch the rest of it")


def _check_finite(metrics, step_number: int, skip: bool) -> None:
    if float(jax.device_get(metrics["nonfinite"])):
        if not skip:
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step_number}; nothing from this step is "
                f"saved. Lower config.optim.learning_rate, or set config.train.skip_nonfinite=True")
        console(f"step {step_number}: non-finite loss or gradient, update skipped")


def _restore_or_init(steps: step.CompiledSteps, checkpointer: checkpoint.Checkpointer,
                     train_iter, init_from: str, workdir: fs.Path) -> step.TrainState:
    """The latest checkpoint's state; else a fresh one, with `init_from`'s parameters if given.
    A LoRA run's state gets its frozen base (`init_from`'s, as recorded at its start)."""
    state = checkpointer.restore_latest(steps.abstract_state, train_iter)
    adapters = steps.abstract_state.frozen is not None
    if state is not None:
        console(f"resumed from step {int(state.step)} ({checkpointer.directory})")
    else:
        state = steps.init()
        if init_from and not adapters:
            state = state.replace(params=checkpoint.restore_params(init_from,
                                                                   steps.abstract_state.params))
            console(f"parameters initialised from {init_from}")
        elif adapters and checkpointer.steps():  # adapters alone: a PEFT adapter's import
            state = state.replace(params=checkpoint.restore_params(
                checkpointer.directory, steps.abstract_state.params))
            console(f"adapters initialised from {checkpointer.directory}")
    if adapters:
        state = state.replace(frozen=lora_base.restore_base(
            workdir, init_from, steps.abstract_state.frozen, record=True))
        console(f"adapters train on the frozen base {lora_base.base_directory(workdir, init_from)}")
    return state


def _close_all(closers: tuple[Callable[[], None], ...], report_errors: bool = True) -> None:
    """Call every closer, even after one fails, then raise the first error, unless the run is
    already failing: its own error is the one to report (a bucket that refused a checkpoint
    refuses the metrics' last upload too, which would hide the cause behind a consequence)."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 (raised below)
            first = first or e
    if first is not None and report_errors:
        raise first


def train_and_evaluate(config: ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Train `config` into `workdir`, resuming from its latest checkpoint if it has one.

    Returns the final train loss (None if no step ran), val loss and the unigram baseline.
    """
    validate(config)
    checkpoint.check_directory(workdir)
    workdir = fs.makedirs(workdir)
    _check_resumable(config, workdir)
    saved_tokenizer = workdir / "tokenizer.json"
    prepared = prepare.prepared_data(config.data, config.seed, workdir, tokenizers.load(
        saved_tokenizer) if fs.exists(saved_tokenizer) else None)
    mesh = sharding.make_mesh(config)
    cfg = ModelConfig.for_run(config, prepared.tokenizer.vocab_size, mesh.shape["tensor"])
    t = config.train
    segment_eos = prepared.tokenizer.eos_id if config.data.segment_documents else None
    train_iter = data.train_batches(prepared.train, cfg.context_length, t.batch_size, config.seed,
                                    segment_eos=segment_eos,
                                    read_threads=config.data.read_threads)

    def val_batches(final: bool) -> list[data.Batch]:
        count = t.final_eval_batches if final and t.final_eval_batches else t.eval_batches
        return data.eval_batches(prepared.val, cfg.context_length, t.batch_size, count,
                                 segment_eos=segment_eos)
    periodic_val = val_batches(final=False)

    if jax.process_index() == 0:
        if not fs.exists(workdir / "config.json"):
            fs.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
        tokenizers.save(prepared.tokenizer, saved_tokenizer)

    model = Transformer(cfg)
    steps = step.compile_run(config, model, mesh)
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", t)
    state = _restore_or_init(steps, checkpointer, train_iter, t.init_from, workdir)
    start = int(state.step)

    unigram = data.unigram_cross_entropy(*prepared.counts, cfg.vocab_size)
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    total = sum(x.size for x in jax.tree.leaves(state.model_params()))
    adapters = f" ({trained:,} in LoRA adapters)" if cfg.lora_rank else ""
    console(f"model: {total:,} parameters{adapters}, {cfg.num_layers} layers, d_model "
            f"{cfg.d_model}, vocab {cfg.vocab_size} (tokenizer {prepared.tokenizer.vocab_size})")
    console(f"data: {len(prepared.train):,} train / {len(prepared.val):,} val tokens "
            f"({prepared.meta['dtype']} shards in {prepared.directory}); "
            f"unigram baseline {unigram:.3f} nats/token")
    console(f"mesh: {dict(mesh.shape)} on {mesh.devices.flat[0].platform}; step compiled in "
            f"{steps.compile_seconds:.1f}s, ~{(steps.memory_bytes_per_device or 0) / 2**20:,.0f} "
            f"MiB/device")
    report = Reporter(workdir, start, t.steps, t.batch_size * cfg.context_length,
                      flops.train_flops_per_token(cfg),
                      flops.peak_flops(list(mesh.devices.flat), t.peak_flops_per_device))
    val_loss, metrics, pending = math.nan, {}, None
    decisions = agreement.StepDecisions(t.checkpoint_every_minutes * 60)
    closers = (decisions.close, report.close, checkpointer.close)
    try:
        for i in range(start + 1, t.steps + 1):
            batch = sharding.global_batch(mesh, next(train_iter), t.batch_size)
            state, metrics = steps.train(state, batch)
            if pending is not None:  # check the previous step while this one runs
                _check_finite(pending, i - 1, t.skip_nonfinite)
            pending = metrics
            report.step()
            if i % t.log_every == 0 or i == t.steps:
                metrics = report.train(i, metrics)
            if i % t.eval_every == 0 or i == t.steps:
                val_loss, val_tokens = evaluate(
                    steps, state.model_params(),
                    val_batches(final=True) if i == t.steps else periodic_val, mesh, t.batch_size)
                report.eval(i, val_loss, val_tokens, unigram)
            stop, save_due = decisions.stop(i), decisions.save_due(i)  # the same on every process
            if checkpointer.should_save(i) or i == t.steps or stop or save_due:
                _check_finite(pending, i, t.skip_nonfinite)
                checkpointer.save(i, state, train_iter)
                decisions.saved()
            if stop:
                checkpointer.wait()
                raise Preempted(f"SIGTERM at step {i}: saved {checkpointer.directory / str(i)}; "
                                f"rerun the same command to resume")
        checkpointer.wait()
    except BaseException as e:
        _close_all(closers, report_errors=isinstance(e, Preempted))
        raise
    _close_all(closers)

    if start == t.steps:
        console(f"{workdir} is already at step {start} of {t.steps}: nothing to train")
        val_loss, _ = evaluate(steps, state.model_params(), val_batches(final=True), mesh,
                               t.batch_size)
    if t.sample_length > 0:
        _sample(config, model, state.model_params(), prepared.tokenizer, mesh)
    return {"train_loss": metrics.get("loss"), "val_loss": val_loss, "unigram_baseline": unigram,
            "steps": t.steps}


def _sample(config: ConfigDict, model: Transformer, params: Any,
            tokenizer: tokenizers.Tokenizer, mesh: jax.sharding.Mesh) -> None:
    """The end-of-run sample after train.sample_prompt; a chat run's answers it as a user's turn,
    up to the end of turn."""
    t, cfg, stop = config.train, model.cfg, None
    if config.data.format == "chat":
        template = chat.ChatTemplate.for_run(config.data, tokenizer)
        prompt, stop = template.prompt_ids(t.sample_prompt), template.end_of_turn
    else:
        prompt = tokenizers.document_ids(tokenizer, t.sample_prompt)
    length = min(t.sample_length, cfg.context_length - 1)
    options = sampling.SamplingOptions(temperature=t.sample_temperature, top_k=t.sample_top_k)
    [tokens] = sampling.generate(model, params, [prompt[-(cfg.context_length - length):]], length,
                                 options=options, seed=config.seed, mesh=mesh, eos_id=stop,
                                 valid_vocab=tokenizer.vocab_size)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    reply = "\n" if stop is not None else ""  # a chat's reply on a line of its own
    console(f"sample ({length} tokens after {t.sample_prompt!r}):\n{t.sample_prompt}{reply}{text}")


def _exit(message: str) -> NoReturn:
    """Print `message` as the last line and end the process with status 1, at once. Nothing is
    left to write by then (train_and_evaluate closed the run's files), but after a failed save the
    interpreter's shutdown could wait on, or report again after the line, what that save left
    behind: orbax's and TensorStore's background writes, asyncio's abandoned futures, exit hooks
    that upload to the same refusing storage. The binary's error path only: a notebook calls
    train_and_evaluate, which raises."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # JAX's backend probing is noise to a user
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value and not _PREFLIGHT.value:
        sys.exit("error: --workdir is required (the directory for checkpoints, metrics and logs)")
    try:
        compilation_cache.enable()
        distributed.initialize()
        if _PREFLIGHT.value:
            preflight(load_config_flag(_CONFIG), _BUDGET.value)
        else:
            train_and_evaluate(load_config_flag(_CONFIG), _WORKDIR.value)
    except (ConfigError, FloatingPointError, checkpoint.RestoreFailed) as e:
        _exit(f"error: {e}")
    except OSError as e:  # filesystem trouble outside the paths lm checks itself
        _exit(f"error: {fs.explain(e, e.filename or _WORKDIR.value)}")
    except Preempted as e:
        console(str(e))
        sys.exit(128 + signal.SIGTERM)


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
