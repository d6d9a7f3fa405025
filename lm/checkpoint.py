"""Checkpoints: asynchronous orbax saves of the train state and the data iterator's position.

A checkpoint is `workdir/checkpoints/<step>/` with three items: `params`, `opt_state` and `data`
(the grain iterator's state, so a resumed run reads exactly the next batch). The step is the
directory's name and the state's own `step`. Orbax writes into a temporary directory and renames it
when complete, so a killed save leaves nothing that looks finished. Restoring against abstract arrays
that carry shardings reshards onto any mesh, each device reading only its own shard.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from ml_collections import ConfigDict

from lm import fs
from lm.config import ConfigError, over_defaults
from lm.metrics import console
from lm.step import TrainState

policies = ocp.checkpoint_managers


class Checkpointer:
    """Periodic saves with a retention policy, and restore of the latest readable checkpoint."""

    def __init__(self, directory: str | os.PathLike, train: ConfigDict):
        save = [policies.FixedIntervalPolicy(train.checkpoint_every)]
        if train.checkpoint_every_minutes:
            save.append(policies.EveryNSeconds(int(train.checkpoint_every_minutes * 60)))
        keep = [policies.LatestN(train.keep_checkpoints)]
        if train.keep_every:
            keep.append(policies.EveryNSteps(train.keep_every))
        check_directory(directory)
        self.directory = fs.absolute(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(self, step: int, state: TrainState, data_iter: Any) -> None:
        """Start saving `state` (at `step`); returns at once while the write continues behind."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter)))

    def restore_latest(self, abstract_state: TrainState, data_iter: Any = None
                       ) -> TrainState | None:
        """The newest checkpoint that reads back whole; restores `data_iter`'s position in place
        when one is given.

        An unreadable one is renamed `<step>.unreadable` (kept for a human to look at, out of the way
        of the run's own save of that step) and the one before it is tried. A step with parameters
        only (an import, `python -m lm.hf`) is no run state: it is passed over, left as it is, for
        `train.init_from` to load.
        """
        for step in reversed(self.steps()):
            if not (self.directory / str(step) / "opt_state").exists():
                continue
            try:
                items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                             opt_state=ocp.args.StandardRestore(abstract_state.opt_state))
                layout_changed = data_iter is not None and not self._own_data_state(step).exists()
                if data_iter is not None and not layout_changed:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
                items = self._manager.restore(step, args=ocp.args.Composite(**items))
                if layout_changed:
                    self._restore_data_across_layouts(step, data_iter)
            except Exception as e:  # any damage: truncated files, missing items, bad metadata
                self._set_aside(step, e)
                continue
            step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32),
                                        abstract_state.step.sharding)
            return TrainState(step=step_array, params=items.params, opt_state=items.opt_state)
        return None

    def _own_data_state(self, step: int) -> fs.Path:
        return (self.directory / str(step) / "data" /
                f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    def _restore_data_across_layouts(self, step: int, data_iter: Any) -> None:
        """Continue the data of a checkpoint written by another number of processes.

        Every process's iterator yields its rows of global batch k at its k-th step, so its state
        (the count of batches taken) is the same in any process layout: process 0's serves all.
        """
        saved = sorted((self.directory / str(step) / "data").glob("process_0-of-*.json"))
        if not saved:
            raise FileNotFoundError(f"no data-iterator state in checkpoint {step}")
        data_iter.set_state(json.loads(saved[0].read_text()))
        console(f"checkpoint {step} was written by {saved[0].stem.split('-of-')[1]} processes; "
                f"each of the {jax.process_count()} now continues at the same global batch")

    def _set_aside(self, step: int, error: Exception) -> None:
        path = self.directory / str(step)
        target = path.with_name(f"{step}.unreadable")
        suffix = 1
        while target.exists():
            target, suffix = path.with_name(f"{step}.unreadable{suffix}"), suffix + 1
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        console(f"warning: checkpoint {path} is unreadable ({reason}); moved to {target.name}, "
                f"resuming from an earlier one")
        if jax.process_index() == 0:
            path.rename(target)
        self._manager.reload()

    def wait(self) -> None:
        """Block until pending saves are on disk; re-raises a background save's error."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        self._manager.close()


def check_directory(path: str | os.PathLike) -> None:
    """Refuse, before any work, a place orbax cannot checkpoint to: orbax writes arrays through
    tensorstore, and builds tensorstore's path for gs:// and local paths only (an s3:// path is
    collapsed to `s3:/...` and rejected as relative, orbax 0.12.8)."""
    if fs.is_remote(path) and fs.scheme(path) != "gs":
        raise ConfigError(f"{os.fspath(path)}: orbax cannot write or read checkpoints at "
                          f"{fs.scheme(path)}:// paths (it supports gs:// and local paths); use a "
                          f"gs:// or local --workdir (data, tokenizers and exports may stay there)")


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
        steps = sorted((int(p.name) for p in fs.listdir(path) if p.name.isdigit()), reverse=True)
        if not steps:
            raise ConfigError(f"{path}: no checkpoint found; pass a workdir with checkpoints or a "
                              f"checkpoint step directory")
        path = path / str(steps[0])
    return path


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
        _check_shapes(getattr(stored, "item_metadata", stored), abstract_params, path)
        return checkpointer.restore(path / "params", abstract_params)
    finally:
        logging.set_verbosity(verbosity)


def _check_shapes(stored: Any, wanted: Any, path: fs.Path) -> None:
    flat_stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    flat_wanted = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(wanted)}
    problems = [f"{k} missing" for k in flat_wanted if k not in flat_stored]
    problems += [f"{k} unexpected" for k in flat_stored if k not in flat_wanted]
    problems += [f"{k} {tuple(flat_stored[k].shape)} vs {tuple(v.shape)}"
                 for k, v in flat_wanted.items()
                 if k in flat_stored and tuple(flat_stored[k].shape) != tuple(v.shape)]
    if problems:
        raise ConfigError(f"{path}: parameters do not match this model ({len(problems)} "
                          f"differences; first: {'; '.join(problems[:3])}); use the same "
                          f"config.model as the checkpoint's run")

