"""Perplexity and bits per byte of documents, every token scored with up to a full context.

Each document is scored on its own, preceded by the end-of-document id: that is what precedes a
document in training, so the document's first token is scored too, given only "a document starts
here". A document longer than the context is cut into windows that advance by `stride` tokens; a
window scores only the targets no earlier window scored, so each of those sees at least
`context - stride` tokens of left context (`stride = context` gives disjoint windows: fastest, least
context).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from lm import sharding, step
from lm.model import Transformer
from lm.tokenizer import Tokenizer, document_ids


@dataclasses.dataclass(frozen=True)
class Score:
    nats: float   # summed negative log-likelihood
    tokens: int   # targets scored
    bytes: int    # UTF-8 bytes of the scored text: the tokenizer-independent denominator

    @property
    def cross_entropy(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.cross_entropy)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes)

    def to_json(self) -> dict:
        return {"cross_entropy": self.cross_entropy, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "tokens": self.tokens, "bytes": self.bytes,
                "nats": self.nats}


def windows(ids: np.ndarray, length: int, stride: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of `length` (inputs, targets, mask) over `ids` whose masks score each target once."""
    targets = len(ids) - 1
    scored = 0
    for begin in range(0, max(targets, 1), stride):
        end = min(begin + length, targets)
        row = {"inputs": np.zeros(length, np.int32), "targets": np.zeros(length, np.int32),
               "mask": np.zeros(length, np.float32)}
        row["inputs"][:end - begin] = ids[begin:end]
        row["targets"][:end - begin] = ids[begin + 1:end + 1]
        row["mask"][scored - begin:end - begin] = 1.0
        yield row
        scored = end
        if end == targets:
            return


@functools.lru_cache(maxsize=8)  # scoring again (a notebook, a sweep) compiles nothing new
def _evaluator(model: Transformer, mesh: Mesh) -> Callable[[Any, step.Batch], step.Metrics]:
    return jax.jit(functools.partial(step.eval_step, model=model),
                   out_shardings=sharding.replicated(mesh))


def score_documents(model: Transformer, params: Any, tokenizer: Tokenizer,
                    documents: Sequence[str], mesh: Mesh, *, batch_size: int = 8,
                    stride: int | None = None, progress: bool = True) -> Score:
    """Score `documents` with the model; the batch is padded with empty rows to fill the mesh."""
    length = model.cfg.context_length
    stride = stride or length
    if not 0 < stride <= length:
        raise ValueError(f"stride={stride} must be in [1, context_length={length}]")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-batch_size // shards) * shards
    evaluate = _evaluator(model, mesh)

    encoded = [document_ids(tokenizer, d) for d in documents]
    nats, tokens = 0.0, 0
    bar = tqdm(total=sum(len(ids) - 1 for ids in encoded), unit="tok", unit_scale=True,
               desc="perplexity", disable=None if progress and jax.process_index() == 0 else True)

    def run(rows: list[dict[str, np.ndarray]]) -> None:
        nonlocal nats, tokens
        while len(rows) < batch_size:
            rows.append(jax.tree.map(np.zeros_like, rows[0]))
        # Every process holds all rows; each contributes its own slice of the global batch.
        mine = rows[jax.process_index()::jax.process_count()]
        batch = {k: np.stack([r[k] for r in mine]) for k in rows[0]}
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            out = jax.device_get(evaluate(params, sharding.global_batch(mesh, batch, batch_size)))
        nats, tokens = nats + float(out["nll"]), tokens + int(out["tokens"])
        bar.update(int(out["tokens"]))

    pending: list[dict[str, np.ndarray]] = []
    for ids in encoded:
        for row in windows(ids, length, stride):
            pending.append(row)
            if len(pending) == batch_size:
                run(pending)
                pending = []
    if pending:
        run(pending)
    bar.close()
    return Score(nats, tokens, sum(len(d.encode("utf-8")) for d in documents))
