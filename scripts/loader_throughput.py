"""The data loader alone: train batches per second from memory-mapped shards, at a config's shapes.

    python scripts/loader_throughput.py --config=configs/gpt2_small.py \
        --config.data.path=../shared/data/tinyshakespeare/input.txt --workdir=/tmp/loader

Prepares `config.data` into `<workdir>/data` (or reads a prepared directory given as the path), then
times `train_batches` for one process holding the whole global batch; compare with the train step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm import data, prepare  # noqa: E402
from lm.config import ConfigError, load_config_flag, parse_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/loader_throughput", "Where to prepare the data.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches to time (after one warm-up batch).")


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    config = load_config_flag(_CONFIG)
    try:
        prepared = prepare.prepared_data(config.data, config.seed, _WORKDIR.value)
        length, batch_size = config.model.context_length, config.train.batch_size
        segment_eos = prepared.tokenizer.eos_id if config.data.segment_documents else None
        batches = data.train_batches(prepared.train, length, batch_size, config.seed,
                                     segment_eos=segment_eos, process_index=0, process_count=1)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    next(batches)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(batches)
    seconds = time.perf_counter() - start
    rate = _BATCHES.value / seconds
    tokens = rate * batch_size * length
    print(f"{rate:.2f} batches/s of {batch_size} x {length} tokens = {tokens:,.0f} tokens/s ("
          f"{prepared.meta['dtype']} shards, {len(prepared.train):,} train tokens, "
          f"packing {'on' if segment_eos is not None else 'off'})")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
