"""Host memory of `lm.hf import` and `export` against the checkpoint's size, on a random LLaMA.

    python scripts/hf_import_memory.py --dir=/tmp/hf_memory --hidden_size=1024 --layers=12

Writes a random bfloat16 LlamaForCausalLM (safetensors) with transformers, then runs the import and
the export (sharded) as the user runs them, each in a process of its own, and prints each one's peak
resident memory beside the weights' size and beside a process that only starts Python and JAX
(ru_maxrss of the finished child, as /usr/bin/time -v reports it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
_DIR = flags.DEFINE_string("dir", "/tmp/hf_memory", "Scratch folder (emptied first).")
_HIDDEN = flags.DEFINE_integer("hidden_size", 1024, "The model's width.")
_LAYERS = flags.DEFINE_integer("layers", 12, "The model's depth.")
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "The model's vocabulary.")
_SHARD = flags.DEFINE_string("max_shard_size", "100MB", "The export's shard size.")
_WRITE_ONLY = flags.DEFINE_bool("write_only", False, "Only write the random model into --dir/hf "
                                "(run so by main, in a child: a child forked from a process that "
                                "holds a model would count its pages as its own).")


def write_model(folder: Path) -> None:
    import torch
    import transformers

    d = _HIDDEN.value
    config = transformers.LlamaConfig(
        vocab_size=_VOCAB.value, hidden_size=d, intermediate_size=-(-8 * d // 3 // 256) * 256,
        num_hidden_layers=_LAYERS.value, num_attention_heads=d // 64,
        num_key_value_heads=d // 256, tie_word_embeddings=False, dtype=torch.bfloat16,
        max_position_embeddings=131072,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def peak_of(command: list[str]) -> tuple[float, float]:
    """(peak resident MB, seconds) of a child process running `command`."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        sys.exit(f"error: {' '.join(command)} failed")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # Linux counts ru_maxrss in KiB


def main(argv: list[str]) -> None:
    root = Path(_DIR.value)
    if _WRITE_ONLY.value:
        return write_model(root / "hf")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    subprocess.run([sys.executable, __file__, "--write_only", *sys.argv[1:]], check=True)
    weights = sum(f.stat().st_size for f in (root / "hf").glob("*.safetensors")) / 2**20
    python = sys.executable
    baseline, _ = peak_of([python, "-c", "import jax, lm.hf; jax.devices()"])
    imported, import_s = peak_of([python, "-m", "lm.hf", "import", f"--hf_dir={root / 'hf'}",
                                  f"--workdir={root / 'lm'}"])
    exported, export_s = peak_of([python, "-m", "lm.hf", "export", f"--workdir={root / 'lm'}",
                                  f"--hf_dir={root / 'out'}", f"--max_shard_size={_SHARD.value}"])
    shards = len(list((root / "out").glob("model-*.safetensors")))
    print(f"checkpoint: {weights:.0f} MB of bfloat16 safetensors; Python+JAX alone: peak "
          f"{baseline:.0f} MB")
    for name, peak, seconds in (("import", imported, import_s), ("export", exported, export_s)):
        print(f"{name}: peak {peak:.0f} MB = Python+JAX + {peak - baseline:.0f} MB = "
              f"{(peak - baseline) / weights:.2f}x the checkpoint, {seconds:.1f}s")
    print(f"export wrote {shards} shards of at most {_SHARD.value}")


if __name__ == "__main__":
    app.run(main)
