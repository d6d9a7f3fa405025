"""Log-likelihoods of continuations given contexts, as multiple-choice evaluation asks for them.

A request is (context ids, continuation ids): its score is the summed log-probability of the
continuation's tokens, each given everything before it, and whether each of them is the model's
most likely next token (`is_greedy`). A request longer than the context window loses tokens from the
left, as lm-evaluation-harness's HuggingFace backend cuts them.

Requests that share a context are scored in one row, the context once: the row holds the context
and then each continuation, every continuation seeing the context and itself but not the others
(an attention mask over [prefix | branch 1 | branch 2 ...], with each branch's positions starting
where the context ends). A four-way choice after a long context costs little more than one
request. Rows hold several such groups and have one of a few lengths (powers of two up to the
context), so a whole evaluation compiles a handful of programs.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lm import sharding
from lm.config import ConfigError
from lm.model import ModelConfig, Transformer, token_losses

SHORTEST_ROW = 16


@dataclasses.dataclass
class _Unit:
    """A context (less its last token) and some of its requests' branches, kept in one row."""
    prefix: Sequence[int]
    branches: list[tuple[int, list[int], list[int]]]  # (request, inputs, targets)

    @property
    def size(self) -> int:
        return len(self.prefix) + sum(len(inputs) for _, inputs, _ in self.branches)


def _branch(context: Sequence[int], continuation: Sequence[int], window: int
            ) -> tuple[tuple[int, ...], list[int], list[int]]:
    """(shared prefix, branch inputs, branch targets) of one request: the context's last token
    predicts the continuation's first. Cut from the left to `window` inputs, as the harness does."""
    if not context or not continuation:
        raise ValueError("a request needs a context and a continuation of at least one token")
    if len(continuation) > window:
        raise ConfigError(f"a continuation of {len(continuation)} tokens is longer than the "
                          f"model's context of {window} tokens")
    full = (list(context) + list(continuation))[-(window + 1):]
    split = len(full) - len(continuation)
    return tuple(full[:split - 1]), full[split - 1:-1], full[split:]


def _units(requests: Sequence[tuple[Sequence[int], Sequence[int]]], window: int,
           row: int) -> list[_Unit]:
    """Requests grouped by their prefix; a group too long for one row is split, prefix repeated."""
    groups: dict[tuple[int, ...], _Unit] = {}
    for index, (context, continuation) in enumerate(requests):
        prefix, inputs, targets = _branch(context, continuation, window)
        groups.setdefault(prefix, _Unit(prefix, [])).branches.append((index, inputs, targets))
    units = []
    for group in groups.values():
        current = _Unit(group.prefix, [])
        for branch in group.branches:
            if current.branches and current.size + len(branch[1]) > row:
                units.append(current)
                current = _Unit(group.prefix, [])
            current.branches.append(branch)
        units.append(current)
    return units


def _group_sizes(requests: Sequence[tuple[Sequence[int], Sequence[int]]], window: int
                 ) -> list[int]:
    sizes: dict[tuple[int, ...], int] = {}
    for context, continuation in requests:
        prefix, inputs, _ = _branch(context, continuation, window)
        sizes[prefix] = sizes.get(prefix, len(prefix)) + len(inputs)
    return list(sizes.values())


def _layout_cost(cfg: ModelConfig, rows: int, row: int) -> float:
    """FLOPs of `rows` rows of `row` positions, up to a constant: per position each layer's
    products (12 d^2) and its attention over the whole row (2 row d), and the output head (d V)."""
    d = cfg.d_model
    return rows * row * (cfg.num_layers * (12 * d * d + 2 * row * d) + d * cfg.vocab_size)


def plan(requests: Sequence[tuple[Sequence[int], Sequence[int]]], cfg: ModelConfig
         ) -> tuple[int, list[list[_Unit]]]:
    """(row length, the rows' units): the cheapest layout over a few row lengths, powers of two
    from the one that holds the largest group of requests up to the window. Longer rows leave
    less padding and cost more attention."""
    window = cfg.context_length
    shortest = bucket(max(_group_sizes(requests, window), default=1), window)
    layouts = [(row, _pack(_units(requests, window, row), row))
               for row in sorted({min(shortest << k, window) for k in range(3)})]
    return min(layouts, key=lambda layout: _layout_cost(cfg, len(layout[1]), layout[0]))


def bucket(length: int, most: int, shortest: int = SHORTEST_ROW) -> int:
    """The smallest power of two that holds `length`, at least `shortest` and at most `most`."""
    return min(most, max(shortest, 1 << (length - 1).bit_length()))


def _pack(units: list[_Unit], row: int) -> list[list[_Unit]]:
    """Best fit, longest unit first: each unit goes in the fullest row it fits in."""
    rows: list[list[_Unit]] = []
    free: list[tuple[int, int]] = []  # (free positions, row index), sorted
    for unit in sorted(units, key=lambda u: -u.size):
        at = bisect.bisect_left(free, (unit.size, -1))
        if at == len(free):
            rows.append([])
            spot = (row, len(rows) - 1)
        else:
            spot = free.pop(at)
        rows[spot[1]].append(unit)
        bisect.insort(free, (spot[0] - unit.size, spot[1]))
    return rows


def _layout(units: list[_Unit], row: int) -> tuple[dict[str, np.ndarray], list[tuple]]:
    """One row's arrays and, per branch, (request, start, length) of its targets in the row.

    `group` numbers the units from 1 (0: padding) and `branch` the branches within one (0: the
    prefix): a query sees the keys of its own unit's prefix and of its own branch.
    """
    arrays = {name: np.zeros(row, np.int32)
              for name in ("inputs", "targets", "positions", "group", "branch")}
    spans, at = [], 0
    for group, unit in enumerate(units, start=1):
        n = len(unit.prefix)
        arrays["inputs"][at:at + n] = unit.prefix
        arrays["positions"][at:at + n] = np.arange(n)
        arrays["group"][at:at + n] = group
        at += n
        for branch, (request, inputs, targets) in enumerate(unit.branches, start=1):
            m = len(inputs)
            for name, values in (("inputs", inputs), ("targets", targets),
                                 ("positions", np.arange(n, n + m)), ("group", group),
                                 ("branch", branch)):
                arrays[name][at:at + m] = values
            spans.append((request, at, m))
            at += m
    return arrays, spans


def shared_prefix_mask(group: jax.Array, branch: jax.Array) -> jax.Array:
    """[batch, 1, 1, q, k]: causal, within a group, and onto the prefix (branch 0) or one's own
    branch."""
    length = group.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_group = group[:, :, None] == group[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (causal & same_group & visible)[:, None, None]


def losses_and_greedy(logits: jax.Array, targets: jax.Array, valid_vocab: int
                      ) -> tuple[jax.Array, jax.Array]:
    """Per position: the target's negative log-likelihood, and whether no valid token's logit
    beats the target's (argmax, ties to the target)."""
    nll, _ = token_losses(logits, targets)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    best = jnp.max(jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf), -1)
    return nll, target_logit >= best


def _score_rows(params: Any, batch: dict[str, jax.Array], *, model: Transformer,
                valid_vocab: int) -> tuple[jax.Array, jax.Array]:
    return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       mask=shared_prefix_mask(batch["group"], batch["branch"]),
                       targets=batch["targets"],
                       scorer=functools.partial(losses_and_greedy, valid_vocab=valid_vocab))


@functools.lru_cache(maxsize=8)
def compiled_scorer(model: Transformer, valid_vocab: int, mesh: Mesh):
    """The jitted scoring function of a model: one compilation per batch shape, kept."""
    return jax.jit(functools.partial(_score_rows, model=model, valid_vocab=valid_vocab),
                   out_shardings=sharding.replicated(mesh))


def score(model: Transformer, params: Any, mesh: Mesh,
          requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, rows_per_batch: int = 8,
          valid_vocab: int | None = None, progress=None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each request's continuation given its context.

    `rows_per_batch` is rounded up to fill the mesh's batch axes; `progress(n)` is told each time n
    more requests are scored.
    """
    row, rows = plan(requests, model.cfg)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_batch = -(-rows_per_batch // shards) * shards
    scorer = compiled_scorer(model, valid_vocab or model.cfg.vocab_size, mesh)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    for start in range(0, len(rows), per_batch):
        laid_out = [_layout(units, row) for units in rows[start:start + per_batch]]
        # A last, short batch is padded to a power of two of shards, not to a whole batch.
        size = min(per_batch, shards * bucket(-(-len(laid_out) // shards), per_batch, shortest=1))
        nll, greedy = _run(scorer, params, mesh, [a for a, _ in laid_out], size)
        for i, (_, spans) in enumerate(laid_out):
            for request, at, m in spans:
                results[request] = (-float(nll[i, at:at + m].sum(dtype=np.float64)),
                                    bool(greedy[i, at:at + m].all()))
            if progress is not None:
                progress(len(spans))
    return results


def _run(scorer, params: Any, mesh: Mesh, rows: list[dict[str, np.ndarray]],
         per_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The scorer on `rows`, padded with empty rows to `per_batch`; every process holds all rows
    and contributes its own slice of the global batch."""
    rows = rows + [jax.tree.map(np.zeros_like, rows[0])] * (per_batch - len(rows))
    mine = rows[jax.process_index()::jax.process_count()]
    batch = {k: np.stack([r[k] for r in mine]) for k in rows[0]}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        nll, greedy = scorer(params, sharding.global_batch(mesh, batch, per_batch))
    return np.asarray(jax.device_get(nll)), np.asarray(jax.device_get(greedy))
