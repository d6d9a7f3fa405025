"""Checkpoints: asynchronous orbax saves of the train state and the data iterator's position.

A checkpoint is `workdir/checkpoints/<step>/` with four items: `params`, `opt_state`, `data` (the
grain iterator's state, so a resumed run reads exactly the next batch) and `fingerprint` (a checksum
of every array, computed on the devices: orbax stores chunks without one, so a flipped byte would
otherwise restore as wrong numbers). The step is the directory's name and the state's own `step`.
Orbax writes into a temporary directory and renames it when complete, so a killed save leaves
nothing that looks finished. Restoring against abstract arrays that carry shardings reshards onto
any mesh, each device reading only its own shard.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from ml_collections import ConfigDict

from lm import agreement, fs, orbax_s3
from lm.config import ConfigError, over_defaults
from lm.metrics import console
from lm.step import TrainState

policies = ocp.checkpoint_managers


# How one process's attempt to read a checkpoint ended. The processes' reports are gathered and the
# highest decides for all: a structure that does not match is refused; an error that may pass is
# retried; a checkpoint that some process found damaged is passed over by every process.
_READ, _DAMAGED, _FAILED, _MISMATCH = range(4)
_NO_STEP, _UNLISTED = -1, -2  # process 0 found no checkpoint; could not list them
# The first word of a TensorStore error (an absl status code) when stored bytes cannot be what was
# written: truncated, garbled or missing from a checkpoint that orbax had finalized.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


class Damaged(Exception):
    """A checkpoint that is incomplete or corrupt: reading it again cannot help."""


class RestoreFailed(Exception):
    """A checkpoint could not be read, for a reason that is not proven damage; it is left alone."""


def is_damage(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) proves the checkpoint itself damaged, as
    opposed to a read that failed (network, permissions, too many open files, a bug)."""
    while error is not None:
        if isinstance(error, (Damaged, FileNotFoundError, json.JSONDecodeError,
                              UnicodeDecodeError)):
            return True
        if isinstance(error, ValueError) and str(error).startswith(_DAMAGE_CODES):
            return True
        error = error.__cause__ or error.__context__
    return False


# A step's folder: its final name, or orbax's temporary name while a save writes it locally.
_STEP_FOLDER = re.compile(r"(\d+)(\.orbax-checkpoint-tmp.*)?$")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class Checkpointer:
    """Periodic saves with a retention policy, and the restore of the latest intact checkpoint.

    `attempts` and `backoff_seconds`: a read that fails without proving the checkpoint damaged is
    tried this many times, waiting backoff_seconds, then twice that, ..., before the run fails.
    """

    def __init__(self, directory: str | os.PathLike, train: ConfigDict, attempts: int = 5,
                 backoff_seconds: float = 2.0):
        keep = [policies.LatestN(train.keep_checkpoints)]
        if train.keep_every:
            keep.append(policies.EveryNSteps(train.keep_every))
        check_directory(directory)
        self.directory = fs.absolute(directory)
        self._every = train.checkpoint_every
        self._saving = self.directory  # the step directory of the latest save, for its errors
        self._attempts, self._backoff = attempts, backoff_seconds
        self._handler = ocp.StandardCheckpointHandler()
        # Saves are decided here and in agreement.StepDecisions, not by orbax's policies.
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True,
            # The step's directories are made before save() returns: made in the background, a
            # refused one (no permission) left the next save waiting for them (orbax 0.12.8).
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `step` is a `checkpoint_every` step (by wall time: agreement.StepDecisions)."""
        return step % self._every == 0

    def save(self, step: int, state: TrainState, data_iter: Any) -> None:
        """Start saving `state` (at `step`); returns at once while the write continues behind."""
        if step in self._manager.all_steps():
            return
        self.wait()  # orbax waits for the previous save too; its error is named for its own step
        self._saving = self.directory / str(step)
        with fs.errors(self._saving, writing=True):
            self._manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                fingerprint=ocp.args.JsonSave(fingerprints(_items(state)))))

    def restore_latest(self, abstract_state: TrainState, data_iter: Any = None
                       ) -> TrainState | None:
        """The newest checkpoint that every process reads whole, or None; restores `data_iter`'s
        position in place when one is given. Call it on every process.

        Process 0 picks the step; every process reads its part and reports how that ended, and all
        follow the same verdict. A checkpoint that does not fit `abstract_state` is refused with a
        ConfigError. One that some process found incomplete or corrupt is renamed
        `<step>.unreadable` (kept for a human, out of the way of the run's own save of that step)
        and the one before it is tried. Any other error is retried with backoff, then raises
        RestoreFailed, leaving the checkpoint as it is. A step with parameters only (an import,
        `python -m lm.hf`) is no run state: it is passed over, left as it is, for
        `train.init_from` to load.
        """
        below, failures = None, 0
        while (listed := self._agreed_step(below))[0] != _NO_STEP:
            step, reason = listed
            outcomes, state, data_state = [_FAILED], None, None
            if step != _UNLISTED:
                outcomes, state, data_state, reason = self._agreed_read(step, abstract_state,
                                                                        data_iter)
            if max(outcomes) == _READ:
                return self._resume(state, data_state, abstract_state, data_iter)
            if max(outcomes) == _MISMATCH:
                raise ConfigError(reason or f"checkpoint {step} does not fit this run's state on "
                                  f"process {outcomes.index(_MISMATCH)}")
            if max(outcomes) == _DAMAGED:
                self._set_aside(step, [p for p, o in enumerate(outcomes) if o == _DAMAGED])
                below, failures = step, 0
                continue
            failures += 1
            self._wait_to_retry(self.directory / str(step) if step >= 0 else self.directory,
                                failures, reason)
        self._manager.reload()
        return None

    def _resume(self, state: TrainState, data_state: Any, abstract_state: TrainState,
                data_iter: Any) -> TrainState:
        """The state every process read, with its step as an array, and the data position set."""
        self._manager.reload()  # after the last agreement: process 0 renamed what it set aside
        step = int(state.step)
        if data_iter is not None:
            self._set_data_state(step, data_iter, data_state)
        # Multi-process, device_put checks that every process passes the same value: a
        # collective, so only once all have read.
        return state.replace(step=jax.device_put(jax.numpy.asarray(step, jax.numpy.int32),
                                                 abstract_state.step.sharding))

    def _agreed_step(self, below: int | None) -> tuple[int, str]:
        """Process 0's pick, on every process: the newest step below `below` with optimizer state,
        _NO_STEP, or _UNLISTED when process 0 could not list the steps (and its reason there)."""
        step, reason = _NO_STEP, ""
        if jax.process_index() == 0:
            steps, _, reason = _attempt(lambda: [
                s for s in self.steps() if (below is None or s < below)
                and (self.directory / str(s) / "opt_state").exists()])
            if reason:
                _warn(f"cannot list the checkpoints in {self.directory}: {reason}")
            elif below is None:
                self._say_unfinished(max(steps, default=-1))
            step = _UNLISTED if steps is None else (steps[-1] if steps else _NO_STEP)
        return agreement.broadcast(step), reason

    def _say_unfinished(self, newest: int) -> None:
        """Name the saves newer than the newest finished step that never finished (a run killed
        mid-save): they are passed over, and the run's own save of that step replaces them."""
        listed, _, reason = _attempt(lambda: [p.name for p in fs.listdir(self.directory)])
        unfinished = sorted({int(m.group(1)) for name in listed or []
                             if (m := _STEP_FOLDER.match(name)) and int(m.group(1)) > newest})
        if unfinished:
            console(f"checkpoint {', '.join(map(str, unfinished))} in {self.directory}: a save that "
                    f"never finished (the run stopped during it), passed over")

    def _agreed_read(self, step: int, abstract_state: TrainState, data_iter: Any
                     ) -> tuple[list[int], TrainState | None, Any, str]:
        """(every process's outcome, this process's state, data-iterator state and reason): of
        reading `step`, and once every process has read it, of checking its arrays against the
        fingerprint saved with them (a computation over all processes' shards)."""
        path = self.directory / str(step)
        read, outcome, reason = _attempt(
            lambda: self._read(path, abstract_state, data_iter is not None))
        state, data_state = read or (None, None)
        outcomes = agreement.gather(outcome)
        if max(outcomes) == _READ:
            _, outcome, reason = _attempt(lambda: _verify(path, _items(state)))
            outcomes = agreement.gather(outcome)
        if reason:
            _warn(f"checkpoint {path}: {reason}")
        return outcomes, state, data_state, reason

    def _wait_to_retry(self, what: fs.Path, failures: int, reason: str) -> None:
        """Wait before another attempt to read `what`, or raise RestoreFailed after the last."""
        if failures == self._attempts:
            reason = reason or "see the other processes"
            raise RestoreFailed(
                f"cannot read {what} after {failures} attempts ({reason}); every checkpoint is "
                f"left as it is: rerun once the storage reads again, or move a damaged step aside "
                f"yourself to resume from an earlier one")
        wait = self._backoff * 2 ** (failures - 1)
        console(f"retrying {what} in {wait:g} s (attempt {failures + 1} of {self._attempts})")
        time.sleep(wait)

    def _read(self, path: fs.Path, abstract_state: TrainState, with_data: bool
              ) -> tuple[TrainState, Any]:
        """(this process's part of the state, its data-iterator state if `with_data`)."""
        for name, abstract in (("params", abstract_state.params),
                               ("opt_state", abstract_state.opt_state)):
            if not (path / name).is_dir():
                raise Damaged(f"{name}/ is missing")
            _check_tree(self._handler.metadata(path / name), abstract, path / name,
                        "the optimizer state" if name == "opt_state" else "the parameters")
        data_state = self._read_data_state(path) if with_data else None
        params, opt_state = (
            self._handler.restore(path / name, args=ocp.args.StandardRestore(abstract))
            for name, abstract in (("params", abstract_state.params),
                                   ("opt_state", abstract_state.opt_state)))
        jax.block_until_ready((params, opt_state))
        return TrainState(step=int(path.name), params=params, opt_state=opt_state), data_state

    @staticmethod
    def _read_data_state(path: fs.Path) -> Any:
        """This process's data-iterator state; process 0's when the checkpoint was written by
        another number of processes. Every process's iterator yields its rows of global batch k at
        its k-th step, so its state (the count of batches taken) is the same in any layout."""
        folder = path / "data"
        own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        saved = [own] if own.exists() else sorted(folder.glob("process_0-of-*.json"))
        if not saved:
            raise Damaged("no data-iterator state")
        return json.loads(saved[0].read_text())

    def _set_data_state(self, step: int, data_iter: Any, state: Any) -> None:
        data_iter.set_state(state)
        writers = {p.stem.split("-of-")[1]
                   for p in (self.directory / str(step) / "data").glob("process_0-of-*.json")}
        if str(jax.process_count()) not in writers:
            console(f"checkpoint {step} was written by {min(writers)} processes; each of the "
                    f"{jax.process_count()} now continues at the same global batch")

    def _set_aside(self, step: int, processes: list[int]) -> None:
        """Rename a damaged step (process 0), so that the run can save that step again."""
        path = self.directory / str(step)
        target = path.with_name(f"{step}.unreadable")
        suffix = 1
        while target.exists():
            target, suffix = path.with_name(f"{step}.unreadable{suffix}"), suffix + 1
        where = f" (found by process {', '.join(map(str, processes))})" \
            if jax.process_count() > 1 else ""
        console(f"warning: checkpoint {path} is incomplete or corrupt{where}; moved to "
                f"{target.name}, resuming from an earlier one")
        if jax.process_index() == 0:
            path.rename(target)
            self._manager.reload()

    def wait(self) -> None:
        """Block until pending saves are on disk; re-raises a background save's error."""
        with fs.errors(self._saving, writing=True):
            self._manager.wait_until_finished()
            self._manager.check_for_errors()

    def close(self) -> None:
        with fs.errors(self._saving, writing=True):
            self._manager.close()


def _attempt(read: Callable[[], Any]) -> tuple[Any, int, str]:
    """(read()'s value, _READ, "") or (None, the outcome its error means, the reason)."""
    try:
        return read(), _READ, ""
    except ConfigError as e:
        return None, _MISMATCH, str(e)
    except Exception as e:  # sorted here: only proven damage passes a checkpoint over
        return None, _DAMAGED if is_damage(e) else _FAILED, _first_line(e)


@jax.jit
def _sums(leaves: list[jax.Array]) -> list[jax.Array]:
    def one(x: jax.Array) -> jax.Array:
        if x.dtype == bool:
            x = x.astype(jnp.uint8)
        words = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
        # The flat (row-major) position, built per dimension rather than by flattening, which
        # would gather an array sharded along a later dimension onto every device.
        position, stride = jnp.zeros(x.shape, jnp.uint32), 1
        for dim in reversed(range(x.ndim)):
            position += jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * (stride % 2**32)
            stride *= x.shape[dim]
        return jnp.sum(words * (2 * position + 1))
    return [one(x) for x in leaves]


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _items(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state}


def fingerprints(trees: dict[str, Any]) -> dict[str, list[int]]:
    """Per array of each tree (the parameters, the optimizer state): the sum of its words (bits as
    unsigned integers) times 1, 3, 5, ... by position, modulo 2**32. Any change within one word
    changes it (an odd weight times a nonzero change below 2**32 is never a multiple of 2**32);
    other changes escape with a chance of 2**-32. Integer sums are exact in any order, so the
    result does not depend on the mesh. A computation over all processes' shards."""
    return {name: [int(v) for v in jax.device_get(_sums(jax.tree.leaves(tree)))]
            for name, tree in trees.items()}


def _verify(path: fs.Path, trees: dict[str, Any]) -> None:
    """Raise Damaged when the arrays differ from the fingerprint saved with them (checkpoints
    written before fingerprints, and imports, have none to compare with)."""
    actual = fingerprints(trees)  # first, on every process: a computation over all of them
    if not (path / "fingerprint").is_dir():
        return
    saved = ocp.JsonCheckpointHandler().restore(path / "fingerprint")
    wrong = [f"{name}[{i}]" for name in actual for i, (a, b) in
             enumerate(zip(actual[name], saved[name])) if a != b]
    if wrong or any(len(actual[n]) != len(saved[n]) for n in actual):
        raise Damaged(f"{len(wrong)} arrays differ from the fingerprint saved with them "
                      f"(first: {', '.join(wrong[:3])}): the stored bytes changed after the save")


def _warn(message: str) -> None:
    """A problem this process saw, on its own stderr (console() prints on process 0 only)."""
    prefix = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    print(f"{prefix}warning: {message}", file=sys.stderr, flush=True)


def check_directory(path: str | os.PathLike) -> None:
    """Refuse, before any work, a place orbax cannot checkpoint to: orbax writes gs:// and local
    paths, and s3:// once lm.orbax_s3 has taught it (an orbax without the places it extends
    collapses an s3:// path to `s3:/...` and refuses it as relative)."""
    if fs.scheme(path) == "s3" and not orbax_s3.install():
        raise ConfigError(f"{os.fspath(path)}: this orbax ({ocp.__version__}) cannot write or "
                          f"read checkpoints at s3:// paths; use a gs:// or local --workdir, or "
                          f"orbax-checkpoint 0.12 (data, tokenizers and exports may stay on s3://)")


def load_run_config(workdir: fs.PathLike) -> ConfigDict:
    """The config a workdir's run was created with (its config.json: what its checkpoints mean),
    over today's defaults. The one reader of it, for lm.train's resume check, lm.load and lm.hf
    export, so a workdir that an older lm wrote loads with the defaults of the fields added since.
    """
    path = fs.path(workdir) / "config.json"
    if not fs.exists(path):
        raise ConfigError(f"{path} does not exist; pass a workdir that lm.train or lm.hf import "
                          f"wrote")
    try:
        saved = json.loads(fs.read_text(path))
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    return over_defaults(saved)


def step_directory(path: str | os.PathLike) -> fs.Path:
    """The checkpoint step directory `path` means: a workdir or `checkpoints/` directory (its latest
    step), or a step directory itself."""
    check_directory(path)
    path = fs.absolute(path)
    if fs.is_dir(path / "checkpoints"):
        path = path / "checkpoints"
    if not fs.is_dir(path / "params"):
        steps = saved_steps(path)
        if not steps:
            raise ConfigError(f"{path}: no checkpoint found; pass a workdir with checkpoints or a "
                              f"checkpoint step directory")
        path = path / str(steps[-1])
    return path


def saved_steps(directory: fs.Path) -> list[int]:
    """The steps saved whole in a `checkpoints/` directory, ascending. In a bucket, which has no
    atomic rename, orbax writes a step's directory in place and marks it complete last: a save
    that failed there (a bucket that refused it) leaves a directory that is no checkpoint."""
    with fs.errors(directory):
        return sorted(int(p.name) for p in fs.listdir(directory)
                      if p.name.isdigit() and ocp.step.is_path_finalized(p))


def restore_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint, for fine-tuning or evaluation.

    `path` is a workdir (its latest checkpoint), a `checkpoints/` directory, or one step's directory.
    """
    path = step_directory(path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that a manager's item has no step metadata
    try:
        checkpointer = ocp.StandardCheckpointer()
        stored = checkpointer.metadata(path / "params")
        _check_tree(getattr(stored, "item_metadata", stored), abstract_params, path,
                    "the parameters")
        params = checkpointer.restore(path / "params", abstract_params)
        try:
            _verify(path, {"params": params})
        except Damaged as e:
            raise ConfigError(f"{path}: {e}; the checkpoint is corrupt: load another step") from e
        return params
    finally:
        logging.set_verbosity(verbosity)


def _leaves(tree: Any) -> dict[str, Any]:
    """Leaves by path, the same for a stored tree (lists and dicts) and a live one (tuples,
    namedtuples, dataclasses): `1/0/mu/embed`."""
    def name(key) -> str:
        return str(next(getattr(key, a) for a in ("key", "idx", "name") if hasattr(key, a)))
    tree = getattr(tree, "tree", tree)  # orbax's metadata holds the stored tree in `.tree`
    return {"/".join(map(name, path)): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_tree(stored: Any, wanted: Any, path: fs.Path, what: str) -> None:
    """Refuse a checkpoint item whose leaves or shapes differ from those this run expects."""
    flat_stored, flat_wanted = _leaves(stored), _leaves(wanted)
    problems = [f"{k} missing" for k in flat_wanted if k not in flat_stored]
    problems += [f"{k} unexpected" for k in flat_stored if k not in flat_wanted]
    problems += [f"{k} {tuple(flat_stored[k].shape)} vs {tuple(v.shape)}"
                 for k, v in flat_wanted.items()
                 if k in flat_stored and tuple(flat_stored[k].shape) != tuple(v.shape)]
    if problems:
        fix = ("use the same config.model as the checkpoint's run" if what == "the parameters" else
               "use the optimizer settings of the checkpoint's run (optim.grad_clip on or off)")
        verb = "do" if what.endswith("s") else "does"
        raise ConfigError(f"{path}: {what} {verb} not match this run's ({len(problems)} "
                          f"differences; first: {'; '.join(problems[:3])}); {fix}")
