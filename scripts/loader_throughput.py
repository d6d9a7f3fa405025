"""The data loader alone: train batches per second from prepared shards, at a config's shapes.

    python scripts/loader_throughput.py --config=configs/gpt2_small.py \
        --config.data.path=../shared/data/tinyshakespeare/input.txt --workdir=/tmp/loader
    python scripts/loader_throughput.py --config=configs/gpt2_small.py \
        --config.data.path=../shared/data/tinyshakespeare/input.txt --workdir=/tmp/loader --emulator

Prepares `config.data` into `<workdir>/data` (or reads a prepared directory given as the path), then
times `train_batches` for one process holding the whole global batch; compare with the train step.
With --emulator the same shards are also uploaded to a GCS emulator on 127.0.0.1 (tests/emulators.py)
and read from the bucket both ways lm can: ranged reads per window, and a local copy made once
(`config.data.shard_cache_dir`), side by side with the local memory map.
"""

from __future__ import annotations

import logging as logging_module
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--emulator" in sys.argv:  # before any storage client is imported: some read these at import
    sys.path.insert(0, str(ROOT / "tests"))
    import emulators  # noqa: E402

    os.environ.update(emulators.OFFLINE_CREDENTIALS)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm import data, prepare  # noqa: E402
from lm.config import ConfigError, load_config_flag, parse_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/loader_throughput", "Where to prepare the data.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches to time (after one warm-up batch).")
_EMULATOR = flags.DEFINE_bool("emulator", False, "Also read the shards from a local GCS emulator.")


def batches_per_second(stream: data.TokenStream, config, warm_up: bool = True) -> float:
    """Batches per second over --batches batches (after one untimed batch when `warm_up`)."""
    length, batch_size = config.model.context_length, config.train.batch_size
    segment_eos = None  # packing costs the same wherever the shards are
    batches = data.train_batches(stream, length, batch_size, config.seed, segment_eos=segment_eos,
                                 process_index=0, process_count=1,
                                 read_threads=config.data.read_threads)
    if warm_up:
        next(batches)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(batches)
    seconds = time.perf_counter() - start
    batches.close()  # its reader threads stop before the emulator does
    return _BATCHES.value / seconds


def row(name: str, rate: float, config, reference: float | None = None) -> None:
    tokens = rate * config.train.batch_size * config.model.context_length
    ratio = f"  {rate / reference:.2f}x local" if reference else ""
    print(f"{name:<34} {rate:8.2f} batches/s  {tokens:12,.0f} tokens/s{ratio}", flush=True)


def emulator_rows(prepared: prepare.Prepared, config, local: float) -> None:
    from lm import fs

    with emulators.gcs(("bench",)) as server:
        os.environ.update(server.env)
        remote = "gs://bench/prepared"
        for name in sorted(os.listdir(prepared.directory)):
            fs.upload(os.path.join(prepared.directory, name), f"{remote}/{name}")
        ranged = prepare.load(remote).train
        row(f"gs:// emulator, ranged reads ({config.data.read_threads} threads)",
            batches_per_second(ranged, config), config, local)
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            cached = prepare.load(remote, cache).train
            print(f"gs:// emulator, local copy: {len(cached):,} tokens downloaded in "
                  f"{time.perf_counter() - start:.2f}s", flush=True)
            row("gs:// emulator, local copy", batches_per_second(cached, config), config, local)
        # Reads a closed iterator's threads had started fail once the emulator stops: not news.
        logging_module.getLogger("gcsfs").setLevel(logging_module.CRITICAL)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    config = load_config_flag(_CONFIG)
    try:
        prepared = prepare.prepared_data(config.data, config.seed, _WORKDIR.value)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(f"{config.train.batch_size} x {config.model.context_length} tokens per batch, "
          f"{prepared.meta['dtype']} shards, {len(prepared.train):,} train tokens", flush=True)
    local = batches_per_second(prepared.train, config)
    row("local memory map", local, config)
    if _EMULATOR.value:
        emulator_rows(prepared, config, local)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
