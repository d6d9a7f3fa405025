"""transformers' `generate` example beside lm's one-liner, from the same hub cache, wall time each.

    python scripts/hf_generate_paired.py --dir=/tmp/hf_paired [--name=gpt2] [--repeats=2]

Without --name (no network needed) it first writes a hub cache in --dir holding a random model of
GPT-2 small's shape (124M parameters) under the name `lm-bench/gpt2-random`, with a byte-level BPE
trained on tinyshakespeare (or generated words) as GPT-2-era vocab.json + merges.txt, and runs
offline. With --name it uses the real hub and your HF_HOME (that needs the network once).

Each command runs as a user runs it, in a fresh process; the two sides alternate. lm's first call
imports into a fresh lm cache and compiles into a fresh compilation cache; its later calls reuse
both, as a user's second call does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RANDOM_NAME = "lm-bench/gpt2-random"
_DIR = flags.DEFINE_string("dir", "/tmp/hf_paired", "Scratch folder (emptied first).")
_NAME = flags.DEFINE_string("name", None, "A hub model to use instead of the random one.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Warm runs of each side, alternated.")
PROMPT, MAX_LENGTH, TEMPERATURE, SEQUENCES = "Once upon a time", 100, 0.7, 3

TRANSFORMERS = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
name = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(name)
model = AutoModelForCausalLM.from_pretrained(name)
inputs = tokenizer({PROMPT!r}, return_tensors="pt")
out = model.generate(**inputs, do_sample=True, max_length={MAX_LENGTH}, temperature={TEMPERATURE},
                     num_return_sequences={SEQUENCES}, pad_token_id=tokenizer.eos_token_id)
print(tokenizer.batch_decode(out, skip_special_tokens=True))
"""


def write_random_gpt2(hub_dir: Path) -> None:
    import tokenizers as tk
    import torch
    import transformers

    if SHAKESPEARE.is_file():
        texts = [SHAKESPEARE.read_text()]
    else:
        import random
        words = [w for w in "the of and to in a is that it for on with as was by he at".split()]
        texts = [" ".join(random.Random(0).choice(words) for _ in range(100_000))]
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, tk.trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    config = transformers.GPT2Config(bos_token_id=0, eos_token_id=0)  # GPT-2 small's shape
    snapshot = hub_dir / "models--lm-bench--gpt2-random" / "snapshots" / ("0" * 40)
    transformers.GPT2LMHeadModel(config).save_pretrained(snapshot)
    bpe.model.save(str(snapshot))
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"error: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds


def main(argv: list[str]) -> None:
    root = Path(_DIR.value)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = dict(os.environ, LM_CACHE=str(root / "lm"),
               JAX_COMPILATION_CACHE_DIR=str(root / "xla"))
    name = _NAME.value
    if name is None:
        name = RANDOM_NAME
        write_random_gpt2(root / "hf" / "hub")
        env.update(HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1")
    hf = [sys.executable, "-c", TRANSFORMERS, name]
    ours = [sys.executable, "-m", "lm.evaluate", f"--hf={name}", "--mode=sample",
            f"--prompt={PROMPT}", f"--max_length={MAX_LENGTH}", f"--temperature={TEMPERATURE}",
            f"--num_return_sequences={SEQUENCES}"]
    # PyTorch's OpenMP threads spin while they wait: on cores other jobs share too, one thread can
    # be many times faster than its default of one a core, so both are timed.
    sides = {"transformers": (hf, env),
             "transformers 1 thread": (hf, {**env, "OMP_NUM_THREADS": "1"}), "lm": (ours, env)}
    times = {"lm first call": [timed(ours, env)], **{side: [] for side in sides}}
    for _ in range(_REPEATS.value):
        for side, (command, side_env) in sides.items():
            times[side].append(timed(command, side_env))
    for side, seconds in times.items():
        print(f"{side:>22}: {', '.join(f'{s:.1f}s' for s in seconds)}")
    best = {side: min(seconds) for side, seconds in times.items()}
    print(f"{name}: lm's one-liner {best['lm']:.1f}s against transformers' generate "
          f"{best['transformers']:.1f}s (ratio {best['lm'] / best['transformers']:.2f}), "
          f"{best['transformers 1 thread']:.1f}s on one thread (ratio "
          f"{best['lm'] / best['transformers 1 thread']:.2f}); best of each; lm's first call, "
          f"which imports and compiles, {best['lm first call']:.1f}s")


if __name__ == "__main__":
    app.run(main)
