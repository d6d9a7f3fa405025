"""Prepared token shards -> shuffled, process-sharded grain batches of next-token windows.

A split is a `TokenStream`: the memory-mapped shards its manifest names (lm/prepare.py writes both),
read as one stream.
Only the windows a process batches are ever read, and grain's iterator state is a position in the
sequence of windows, so a checkpoint holds a few integers and a restored run reads exactly the next
batch.
"""

from __future__ import annotations

import bisect
import functools
from typing import Iterator, Sequence

import grain
import jax
import numpy as np

from lm.config import ConfigError
from lm.shards import DOCUMENT_START, SCORED

Batch = dict[str, np.ndarray]


class TokenStream:
    """A split's token ids, and for prompt/completion and chat data each token's loss weight as a
    target, stored in shards and read as one stream: a window may span two shards.

    `marks_documents`: the weights also mark where each document starts (chat data, whose end of
    turn may be the end-of-document id: only the marked ones start a conversation)."""

    def __init__(self, shards: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None,
                 marks_documents: bool = False):
        self.shards, self.weights = list(shards), None if weights is None else list(weights)
        self.marks_documents = marks_documents
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + len(shard))

    def __len__(self) -> int:
        return self._starts[-1]

    def _read(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        i = bisect.bisect_right(self._starts, start) - 1
        parts = []
        while start < stop and i < len(arrays):
            local = start - self._starts[i]
            take = min(stop, self._starts[i + 1]) - start
            parts.append(arrays[i][local:local + take])
            start, i = start + take, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def window(self, start: int, size: int) -> dict[str, np.ndarray]:
        """Positions [start, start + size): `tokens`, and `weights` when the stream has them."""
        window = {"tokens": self._read(self.shards, start, start + size)}
        if self.weights is not None:
            marks = self._read(self.weights, start, start + size)
            window["weights"] = marks & SCORED
            if self.marks_documents:
                window["starts"] = (marks & DOCUMENT_START) > 0
        return window


def segments(inputs: np.ndarray, eos_id: int, starts: np.ndarray | None = None) -> Batch:
    """Segment ids and positions of packed documents in [rows, length] inputs.

    A document starts at the end-of-document token before it, at position 0, as every document
    starts where it is scored or sampled alone (`tokenizer.document_ids`): its first token is
    predicted from "a document starts here" only, and its own last token predicts its end. A row
    that starts inside a document starts a segment there too (a cut, as in unpacked windows).
    `starts` [rows, length], when given, marks the end-of-document tokens that start documents
    (chat data, whose end of turn may be the same id).
    """
    starts = inputs == eos_id if starts is None else starts.copy()
    starts[:, 0] = True
    index = np.arange(inputs.shape[1], dtype=np.int32)
    return {"segment_ids": np.cumsum(starts, axis=1, dtype=np.int32),
            "positions": index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)}


def _to_batch(windows: dict[str, np.ndarray], segment_eos: int | None) -> Batch:
    tokens = windows["tokens"].astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    # A token's weight says whether it is scored as a target (0 on prompts, for fine-tuning).
    mask = (windows["weights"][:, 1:].astype(np.float32) if "weights" in windows
            else np.ones(targets.shape, np.float32))
    batch = {"inputs": inputs, "targets": targets, "mask": mask}
    if segment_eos is not None:
        starts = windows["starts"][:, :-1] if "starts" in windows else None
        batch.update(segments(inputs, segment_eos, starts))
    return batch


def _check_windows(count: int, num_tokens: int, split: str, length: int) -> None:
    if not count:
        raise ConfigError(f"the {split} split has {num_tokens} tokens, too few for one window of "
                          f"context_length+1={length + 1}; use a bigger corpus, a larger "
                          f"config.data.val_fraction, or a smaller config.model.context_length")


def _process_rows(global_batch: int, process_index: int | None, process_count: int | None
                  ) -> tuple[int, int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise ConfigError(f"config.train.batch_size={global_batch} must be divisible by the "
                          f"{count} processes")
    return index, count, global_batch // count


def train_batches(tokens: TokenStream, length: int, global_batch: int, seed: int, *,
                  segment_eos: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, read_threads: int = 0) -> Iterator[Batch]:
    """Endless batches of this process's rows: each epoch is a fresh permutation of the windows,
    which start at a fresh random offset so that every epoch cuts the text at different places.

    Global batch k is windows k*global_batch... of that sequence; process p takes every
    process_count-th of them from p, and reads no others. With `segment_eos`, batches also carry
    `segment_ids` and `positions` that restart at each end-of-document token. `read_threads`
    prefetching threads (0: none) suit slow disks; from the page cache, grain's default 16 only
    contend with the train step for the GIL and the cores (2-core baby Shakespeare: ~8% slower).
    """
    per_epoch = max(len(tokens) - length, 0) // length  # room for any offset below `length`
    _check_windows(per_epoch, len(tokens), "train", length)
    process_index, process_count, rows = _process_rows(global_batch, process_index, process_count)

    @functools.lru_cache(maxsize=2)
    def offset(epoch: int) -> int:
        return int(np.random.default_rng([seed, epoch]).integers(length))

    def window(index: int, position: int) -> dict[str, np.ndarray]:
        return tokens.window(offset(index // per_epoch) + position * length, length + 1)

    dataset = (grain.MapDataset.range(per_epoch).shuffle(seed=seed).repeat(None)
               .map_with_index(window)[process_index::process_count]
               .batch(rows, drop_remainder=True)
               .map(functools.partial(_to_batch, segment_eos=segment_eos)))
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads)))


def eval_batches(tokens: TokenStream, length: int, global_batch: int, num_batches: int, *,
                 segment_eos: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> list[Batch]:
    """The same validation batches at every evaluation: windows spread evenly over the split.

    A split with fewer windows than `num_batches` batches need gives fewer batches (at least one).
    """
    count = max(len(tokens) - 1, 0) // length
    _check_windows(count, len(tokens), "validation", length)
    process_index, process_count, _ = _process_rows(global_batch, process_index, process_count)
    num_batches = min(num_batches, max(1, count // global_batch))
    picks = np.linspace(0, count - 1, num_batches * global_batch).round().astype(int)
    rows = picks.reshape(num_batches, global_batch)[:, process_index::process_count]
    batches = []
    for batch in rows:
        windows = [tokens.window(i * length, length + 1) for i in batch]
        stacked = {k: np.stack([w[k] for w in windows]) for k in windows[0]}
        batches.append(_to_batch(stacked, segment_eos))
    return batches


def unigram_cross_entropy(train_counts: np.ndarray, val_counts: np.ndarray, vocab_size: int
                          ) -> float:
    """Nats per token of val under train's add-one-smoothed token frequencies: the bar to beat."""
    counts = np.ones(vocab_size, np.float64)
    counts[:len(train_counts)] += train_counts
    log_p = np.log(counts / counts.sum())
    return float(-(val_counts * log_p[:len(val_counts)]).sum() / val_counts.sum())
