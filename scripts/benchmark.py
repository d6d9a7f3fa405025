"""Benchmarks: each row in a fresh process after warm-up, the median of several repeats (the
machine's matmul and memory-read peaks: the fastest of 20).

    python scripts/benchmark.py                  # the CPU suite
    python scripts/benchmark.py --suite=gpu      # GPT-2 small and 1B LLaMAs in bfloat16, 2k and 8k
    python scripts/benchmark.py --rows=train_shakespeare_char,matmul_f32 --output_json=bench.json
    python scripts/benchmark.py --rows=train_shakespeare_char_torch   # only the PyTorch row
    python scripts/benchmark.py --notorch        # the lm rows alone

Train rows run `lm.step`'s compiled train step on random tokens (data loading is measured apart).
MFU counts FLOPs with the PaLM formula of `lm/flops.py` (6N + 12LTd per token, exact under scan),
against two peaks: the matmul rate this machine just measured through XLA (`mfu_measured`) and,
on an accelerator, the vendor's dense bf16 peak (`mfu_vendor`, e.g. 989 TFLOP/s for an H100/H200).

In the CPU suite, the train, sample and perplexity rows have a PyTorch pair, `<row>_torch`: the
same shapes in HuggingFace transformers' `GPT2LMHeadModel` (float32, random weights, dropout 0,
"sdpa" attention, PyTorch's default thread count), run in the same way and in the same run:
  train: forward with labels, backward, `clip_grad_norm_(1.0)`, AdamW (lr 1e-3, betas (0.9, 0.99),
    weight decay 0.1) step, `zero_grad`; the Shakespeare rows use nanoGPT's shapes in GPT-2's class;
    the LoRA row trains peft's rank-8 adapters on c_attn, c_proj and c_fc (lm's: on query, key,
    value, out, up and down), the rest frozen, the optimizer over the adapters alone.
  sample: `generate` after the lm row's 4-token prompt with exactly the lm row's new tokens
    (`min_new_tokens`), greedy or plain temperature sampling (`top_k=0`: no top-50 filter).
  perplexity: an `inference_mode` forward with the loss.
Naming an lm row in --rows runs its pair after it; --notorch leaves out every PyTorch row. The lm
row's `vs_torch` is its throughput over its pair's (tokens/s; above 1, lm is faster). Without torch
or transformers installed, the PyTorch rows are skipped with a note.

Slow rows cap --repeats (`Row.max_repeats`): on 2 CPU cores the whole CPU suite took ~9 minutes
before the long-context compile rows and the 8-device eval row, which add about 4 (estimated).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lm import allocator  # noqa: E402  (stdlib only: the parent process stays light)

_SUITE = flags.DEFINE_enum("suite", "cpu", ["cpu", "gpu"], "Which set of rows to run.")
_ROWS = flags.DEFINE_list("rows", [], "Run only these rows (names from the suite tables).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per row; the median is reported.")
_OUTPUT = flags.DEFINE_string("output_json", "", "Also write the results here.")
_TORCH = flags.DEFINE_bool("torch", True, "Run the PyTorch rows, each after its lm row.")
_ROW = flags.DEFINE_string("row", "", "Internal: run this one row in this process, print JSON.")


@dataclasses.dataclass(frozen=True)
class Row:
    kind: str                      # matmul | memory | train | compile | sample | perplexity |
                                   # eval, or torch_train | torch_sample | torch_perplexity
    config: str = ""               # configs/*.py for train and compile rows
    overrides: tuple = ()          # (("model.num_layers", 2), ...)
    dtype: str = "float32"         # matmul rows
    size: int = 2048               # matmul rows: the matrix side; memory rows: MiB read
    steps: int = 10                # train steps per timed repeat
    batch: int = 1                 # sample, perplexity and torch rows
    new_tokens: int = 0            # sample rows
    temperature: float = 0.0       # sample rows
    gpt2: tuple = ()               # torch rows: GPT2Config fields; train rows fill n_positions
    max_repeats: int = 0           # caps --repeats for slow rows (0: no cap)
    cpu_devices: int = 0           # the row's process simulates this many CPU devices (0: real ones)
    lora_rank: int = 0             # torch_train rows: peft LoRA adapters of this rank


_NANOGPT_6L = (("model.num_layers", 6), ("model.num_heads", 6), ("model.d_model", 384),
               ("model.context_length", 256), ("train.batch_size", 16))
_GPT2_F32 = (("model.dtype", "float32"), ("model.remat_policy", "none"))
# The well-known HuggingFace example: 3 samples of max_length=100 after a 4-token prompt.
# max_repeats: on 2 CPU cores the slow rows take 4 to 25 s a repeat, in lm and in PyTorch alike;
# the caps keep the CPU suite, PyTorch rows included, under 10 minutes.
_SAMPLING = {
    "sample_gpt2_small_3x96_t0.7": Row("sample", "configs/gpt2_small.py", _GPT2_F32, batch=3,
                                       new_tokens=96, temperature=0.7, max_repeats=3),
    "sample_gpt2_small_1x128_greedy": Row("sample", "configs/gpt2_small.py", _GPT2_F32, batch=1,
                                          new_tokens=128, max_repeats=3),
    "sample_gpt2_small_8x128_t0.7": Row("sample", "configs/gpt2_small.py", _GPT2_F32, batch=8,
                                        new_tokens=128, temperature=0.7, max_repeats=2),
}
# The lm row's prompt for GPT-2's vocabulary: four tokens, as "Once upon a time".
_PROMPT = [464, 2068, 7586, 21831]
# The CPU rows' PyTorch pairs, under their lm row's name. nanoGPT's Shakespeare shapes go into
# GPT-2's class, which keeps its biases and tanh GELU (the lm configs have neither).
_TORCH_PAIRS = {
    "train_shakespeare_char": Row("torch_train", gpt2=(
        ("n_layer", 4), ("n_head", 4), ("n_embd", 128), ("n_positions", 64), ("vocab_size", 65)),
        batch=12, steps=20),
    "train_shakespeare_6l384": Row("torch_train", gpt2=(
        ("n_layer", 6), ("n_head", 6), ("n_embd", 384), ("n_positions", 256), ("vocab_size", 65)),
        batch=16, steps=3, max_repeats=2),
    "train_gpt2_small_8x256": Row("torch_train", gpt2=(("n_positions", 256),), batch=8, steps=1,
                                  max_repeats=2),
    "train_gpt2_small_lora_8x256": Row("torch_train", gpt2=(("n_positions", 256),), batch=8,
                                       steps=1, max_repeats=2, lora_rank=8),
    **{name: dataclasses.replace(row, kind="torch_sample", config="", overrides=())
       for name, row in _SAMPLING.items()},
    "perplexity_gpt2_small_8x1024": Row("torch_perplexity", batch=8, max_repeats=1),
}
_GPT2_8X256 = (("model.dtype", "float32"), ("model.context_length", 256), ("train.batch_size", 8),
               ("model.remat_policy", "none"), ("model.scan_layers", False))
CPU_ROWS = {
    "matmul_f32": Row("matmul", dtype="float32"),
    "matmul_bf16": Row("matmul", dtype="bfloat16"),
    "memory_read": Row("memory", size=1024),
    "train_shakespeare_char": Row("train", "configs/shakespeare_char.py", steps=20),
    "train_shakespeare_6l384": Row("train", "configs/shakespeare_char.py", _NANOGPT_6L, steps=3,
                                   max_repeats=2),
    # Unrolled, as a CPU user runs it: on XLA:CPU the scanned stack copies each layer's saved
    # activations into stacked buffers and zeroes stacked gradients (temporaries 4.9 GB against
    # 3.6), and its step took 13.6 s against 11.8 s unrolled, interleaved in one process.
    "train_gpt2_small_8x256": Row("train", "configs/gpt2_small.py", _GPT2_8X256, steps=1,
                                  max_repeats=2),
    # LoRA rank 8 on every projection (PEFT's c_attn, c_proj, c_fc), on a frozen random base.
    "train_gpt2_small_lora_8x256": Row("train", "configs/gpt2_small.py", _GPT2_8X256 + (
        ("lora.rank", 8), ("lora.alpha", 16.0), ("lora.targets", "query,key,value,out,up,down"),
        ("train.init_from", "(random weights)")), steps=1, max_repeats=2),
    **_SAMPLING,
    "perplexity_gpt2_small_8x1024": Row("perplexity", "configs/gpt2_small.py", _GPT2_F32, batch=8,
                                        max_repeats=1),
    "compile_gpt2_small_12l": Row("compile", "configs/gpt2_small.py", (
        ("model.dtype", "float32"), ("train.batch_size", 8), ("model.context_length", 256))),
    "compile_gpt2_small_48l": Row("compile", "configs/gpt2_small.py", (
        ("model.dtype", "float32"), ("train.batch_size", 8), ("model.context_length", 256),
        ("model.num_layers", 48))),
    # Long context on the XLA attention path: its graph, and so the compile time, must not grow
    # with the length (query blocks in a loop past four), nor its memory with the square.
    **{f"compile_gpt2_small_1x{n}k": Row("compile", "configs/gpt2_small.py", (
        ("model.dtype", "float32"), ("train.batch_size", 1), ("model.context_length", n * 1024)))
       for n in (2, 8, 32)},
    # The eval step on 8 simulated devices (2 rows each): its scoring chunks are sized per device.
    "eval_gpt2_small_16x1024_8dev": Row("eval", "configs/gpt2_small.py", _GPT2_F32 + (
        ("train.batch_size", 16), ("mesh.data", -1), ("mesh.fsdp", 1)), cpu_devices=8,
        max_repeats=1),
    **{f"{name}_torch": row for name, row in _TORCH_PAIRS.items()},
}
_GPU = (("mesh.fsdp", 1), ("mesh.data", -1))
GPU_ROWS = {
    "matmul_bf16_8192": Row("matmul", dtype="bfloat16", size=8192),
    "memory_read": Row("memory", size=1024),
    "train_llama_1b_16x2048": Row("train", "configs/llama_1b.py", _GPU + (
        ("train.batch_size", 16), ("model.remat_policy", "none")), steps=5),
    "train_gpt2_small_32x1024": Row("train", "configs/gpt2_small.py", _GPU + (
        ("train.batch_size", 32), ("model.remat_policy", "none")), steps=5),
    "train_llama_1b_16x2048_remat_dots": Row("train", "configs/llama_1b.py", _GPU + (
        ("train.batch_size", 16),), steps=5),
    # Materialised scores need remat at this size: 22 layers of [16, 32, 2048, 2048] would not fit.
    "train_llama_1b_16x2048_remat_dots_xla_attention": Row("train", "configs/llama_1b.py", _GPU + (
        ("train.batch_size", 16), ("model.attention_impl", "xla")), steps=5),
    "train_llama_1b_32x2048_remat_dots": Row("train", "configs/llama_1b.py", _GPU + (
        ("train.batch_size", 32),), steps=5),
    # Long context: the same tokens a step as 16x2048, at 8k; and a LLaMA 3 shape (its 128k
    # vocabulary's logits in chunks) at 8k.
    "train_llama_1b_4x8192_remat_dots": Row("train", "configs/llama_1b.py", _GPU + (
        ("train.batch_size", 4), ("model.context_length", 8192)), steps=5),
    "train_llama_1b_8x8192_remat_dots": Row("train", "configs/llama_1b.py", _GPU + (
        ("train.batch_size", 8), ("model.context_length", 8192)), steps=3),
    "train_llama3_1b_8x8192": Row("train", "configs/llama3_1b.py", _GPU, steps=3),
    # A GPU samples in about a second: no repeat caps.
    **{name: dataclasses.replace(row, overrides=(("model.dtype", "bfloat16"),), max_repeats=0)
       for name, row in _SAMPLING.items()},
}


def _times(fn: Callable[[], object], repeats: int,
           warm_up: Callable[[], object] | None = None) -> list[float]:
    (warm_up or fn)()  # compilation and first-touch allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_seconds(fn: Callable[[], object], repeats: int,
                    warm_up: Callable[[], object] | None = None) -> float:
    return statistics.median(_times(fn, repeats, warm_up))


# XLA:CPU starts a program's next run, and allocates its temporaries, before the previous run has
# released its own; the allocator then maps a second set once and keeps both. A training loop (or
# perplexity's) gets there at its second step; a benchmark that waits for each run got there at a
# random repeat, which took 6 s longer for GPT-2's 8x256 step (3 GB faulted in). Two runs
# dispatched back to back in the warm-up reach that state before the timing starts.
BACK_TO_BACK = 2


# The machine's peaks are the fastest of this many repeats (a 2048^3 product takes ~0.1 s): a median
# of 5 fell to 117 GFLOP/s in a slow phase of a shared machine and put a train row's MFU at 122%.
PEAK_REPEATS = 20


def matmul_flops(dtype: str, size: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a: a @ a)
    seconds = min(_times(lambda: matmul(x).block_until_ready(), max(repeats, PEAK_REPEATS)))
    return {"gflops": 2 * size ** 3 / seconds / 1e9, "seconds": seconds}


def memory_bandwidth(row: Row, repeats: int) -> dict:
    """Bytes/s of reading `row.size` MiB once (a sum): the floor for a memory-bound decode step."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((row.size * 2 ** 18,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = min(_times(lambda: total(x).block_until_ready(), max(repeats, PEAK_REPEATS)))
    return {"gb_per_sec": x.nbytes / seconds / 1e9}


def load_config(path: str, overrides: tuple):
    spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(dict(overrides))
    return config


def _compiled(row: Row):
    from lm import optim, sharding, step
    from lm.config import validate
    from lm.model import ModelConfig, Transformer

    config = load_config(row.config, row.overrides)
    validate(config)
    mesh = sharding.make_mesh(config)
    # Character-level Shakespeare has 65 symbols; the other configs fix their vocabulary.
    cfg = ModelConfig.from_config(config.model, config.model.vocab_size or 65).adapted(
        config.lora)
    steps = step.compile_steps(
        Transformer(cfg), optim.make_optimizer(config.optim, config.train.steps),
        optim.learning_rate_schedule(config.optim, config.train.steps), mesh, seed=0,
        batch_size=config.train.batch_size, grad_accum_steps=config.optim.grad_accum_steps)
    return config, cfg, mesh, steps


def _random_model(row: Row):
    """A model of the row's config with freshly initialised weights, on one device."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lm.model import ModelConfig, Transformer

    config = load_config(row.config, row.overrides)
    cfg = ModelConfig.from_config(config.model, config.model.vocab_size or 65)
    model = Transformer(cfg)
    init = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
    return model, init()["params"]


def sampling_throughput(row: Row, repeats: int) -> dict:
    import jax

    from lm.sampling import SamplingOptions, decoding_layout, generate

    model, params = _random_model(row)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))  # what a step reads
    # Laid out once, as lm.load() does for all of its samples; the time is reported apart.
    layout = jax.jit(lambda p: decoding_layout(model, p)[1])
    layout_seconds = _median_seconds(lambda: jax.block_until_ready(layout(params)), 1)
    model, params = decoding_layout(model, params)[0], layout(params)
    prompts = [_PROMPT] * row.batch
    options = SamplingOptions(temperature=row.temperature)
    seconds = _median_seconds(lambda: generate(model, params, prompts, row.new_tokens,
                                               options=options), repeats)
    return {"new_tokens_per_sec": row.batch * row.new_tokens / seconds,
            "ms_per_step": seconds / row.new_tokens * 1e3, "weight_gb": weight_bytes / 1e9,
            "layout_seconds": layout_seconds}


def perplexity_throughput(row: Row, repeats: int) -> dict:
    import functools

    import jax
    import numpy as np

    from lm import step

    model, params = _random_model(row)
    length = model.cfg.context_length
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (row.batch, length + 1))
    batch = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
             "mask": np.ones((row.batch, length), np.float32)}
    evaluate = jax.jit(functools.partial(step.eval_step, model=model))
    seconds = _median_seconds(
        lambda: jax.block_until_ready(evaluate(params, batch)), repeats,
        warm_up=lambda: jax.block_until_ready([evaluate(params, batch) for _ in range(BACK_TO_BACK)]))
    return {"tokens_per_sec": row.batch * length / seconds, "step_ms": seconds * 1e3}


def compile_time(row: Row) -> dict:
    _, cfg, _, steps = _compiled(row)
    return {"compile_seconds": steps.compile_seconds, "layers": cfg.num_layers,
            "memory_estimate_gib": (steps.memory_bytes_per_device or 0) / 2 ** 30}


def eval_throughput(row: Row, repeats: int) -> dict:
    """The compiled eval step of a run on its mesh (perplexity's rows run one device's)."""
    import jax

    config, cfg, mesh, steps = _compiled(row)
    rows = config.train.batch_size
    batch = random_batch(mesh, cfg, rows)
    params = steps.init().params
    seconds = _median_seconds(
        lambda: jax.block_until_ready(steps.eval(params, batch)), repeats,
        warm_up=lambda: jax.block_until_ready([steps.eval(params, batch)
                                               for _ in range(BACK_TO_BACK)]))
    return {"tokens_per_sec": rows * cfg.context_length / seconds, "step_ms": seconds * 1e3,
            "devices": len(jax.devices())}


def random_batch(mesh, cfg, rows: int) -> dict:
    """Random tokens [rows, context], every position scored, sharded over the mesh's batch axes."""
    import numpy as np

    from lm import sharding

    length = cfg.context_length
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, length + 1), np.int32)
    return sharding.global_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                        "mask": np.ones((rows, length), np.float32)}, rows)


def train_throughput(row: Row, repeats: int) -> dict:
    import jax

    from lm import flops

    config, cfg, mesh, steps = _compiled(row)
    rows, length = config.train.batch_size, cfg.context_length
    batch = random_batch(mesh, cfg, rows)
    state = steps.init()
    if steps.abstract_state.frozen is not None:  # LoRA: a random frozen base
        state = state.replace(frozen=jax.jit(lambda: jax.tree.map(
            lambda s: (0.02 * jax.random.normal(jax.random.key(0), s.shape)).astype(s.dtype),
            steps.abstract_state.frozen), out_shardings=steps.state_sharding.frozen)())

    def run_steps(count: int) -> None:
        nonlocal state
        for _ in range(count):
            state, metrics = steps.train(state, batch)
        jax.block_until_ready(metrics)

    seconds = _median_seconds(lambda: run_steps(row.steps), repeats,
                              warm_up=lambda: run_steps(max(row.steps, BACK_TO_BACK))) / row.steps
    device = jax.devices()[0]
    per_token = flops.train_flops_per_token(cfg)
    tokens_per_sec = rows * length / seconds
    chips = 1 if device.platform == "cpu" else len(jax.devices())
    vendor = flops.peak_flops(jax.devices()) if device.platform != "cpu" else None
    stats = device.memory_stats() or {}
    return {
        "step_ms": seconds * 1e3, "tokens_per_sec": tokens_per_sec,
        "model_tflops_per_sec": per_token * tokens_per_sec / 1e12,
        "mfu_vendor": per_token * tokens_per_sec / vendor if vendor else None,
        "chips": chips, "compile_seconds": steps.compile_seconds,
        "memory_estimate_gib": (steps.memory_bytes_per_device or 0) / 2 ** 30,
        "peak_device_memory_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None,
        "peak_host_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        "batch": f"{rows}x{length}", "params_m": flops.matmul_params(cfg) / 1e6,
        "trained_params_m": sum(x.size for x in jax.tree.leaves(steps.abstract_state.params)) / 1e6,
        "attention": cfg.attention, "device": device.device_kind,
    }


def _torch_gpt2(row: Row):
    """transformers' GPT-2 with the row's shapes and seeded random float32 weights, no dropout."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # sdpa is transformers' default attention for GPT-2; named so that a new default shows up.
    config = GPT2Config(**dict(row.gpt2), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def _torch_tokens(model, batch: int):
    """Random token ids [batch, n_positions]: a full context, as the lm rows use."""
    import torch

    return torch.randint(model.config.vocab_size, (batch, model.config.n_positions))


def _torch_details(model) -> dict:
    """What a PyTorch row's speed depends on besides its shapes."""
    import torch
    import transformers

    return {"torch_threads": torch.get_num_threads(),
            "attention": model.config._attn_implementation,
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}


def torch_train_throughput(row: Row, repeats: int) -> dict:
    import torch

    model = _torch_gpt2(row).train()
    ids = _torch_tokens(model, row.batch)
    if row.lora_rank:  # PEFT's adapters on every projection; the rest frozen
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=row.lora_rank, lora_alpha=2 * row.lora_rank, lora_dropout=0.0, fan_in_fan_out=True,
            target_modules=["c_attn", "c_proj", "c_fc"]))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def run_steps():
        for _ in range(row.steps):
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    seconds = _median_seconds(run_steps, repeats) / row.steps
    return {"tokens_per_sec": ids.numel() / seconds, "step_ms": seconds * 1e3,
            "batch": "x".join(map(str, ids.shape)), "trained_params_m": sum(
                p.numel() for p in trained) / 1e6,
            "peak_host_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            **_torch_details(model)}


def torch_sampling_throughput(row: Row, repeats: int) -> dict:
    import torch

    model = _torch_gpt2(row).eval()
    ids = torch.tensor([_PROMPT] * row.batch)
    # top_k=0 drops generate's default top-50 filter: the lm row samples from every token.
    sampling = ({"do_sample": True, "temperature": row.temperature, "top_k": 0}
                if row.temperature > 0 else {"do_sample": False})
    # min_new_tokens masks end-of-text so that every row decodes exactly new_tokens, like lm's.
    seconds = _median_seconds(lambda: model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=row.new_tokens,
        min_new_tokens=row.new_tokens, pad_token_id=50256, **sampling), repeats)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"new_tokens_per_sec": row.batch * row.new_tokens / seconds,
            "ms_per_step": seconds / row.new_tokens * 1e3, "weight_gb": weight_bytes / 1e9,
            **_torch_details(model)}


def torch_perplexity_throughput(row: Row, repeats: int) -> dict:
    import torch

    model = _torch_gpt2(row).eval()
    ids = _torch_tokens(model, row.batch)
    with torch.inference_mode():
        seconds = _median_seconds(lambda: model(input_ids=ids, labels=ids).loss, repeats)
    return {"tokens_per_sec": ids.numel() / seconds, "step_ms": seconds * 1e3,
            **_torch_details(model)}


def run_row(row: Row, repeats: int) -> dict:
    if row.kind == "matmul":
        return matmul_flops(row.dtype, row.size, repeats)
    runners = {"memory": memory_bandwidth, "train": train_throughput,
               "sample": sampling_throughput, "perplexity": perplexity_throughput,
               "eval": eval_throughput,
               "torch_train": torch_train_throughput, "torch_sample": torch_sampling_throughput,
               "torch_perplexity": torch_perplexity_throughput}
    if row.kind == "compile":
        return compile_time(row)
    return runners[row.kind](row, repeats)


def _with_torch_pairs(names: list[str], table: dict) -> list[str]:
    """The named rows, each lm row followed by its PyTorch pair. PyTorch rows need --torch, and
    torch and transformers installed: an optional dependency, so without them a note, no error."""
    names = list(dict.fromkeys(n for name in names for n in (name, f"{name}_torch") if n in table))
    torch_rows = [n for n in names if table[n].kind.startswith("torch_")]
    missing = [m for m in ("torch", "transformers") if not importlib.util.find_spec(m)]
    if torch_rows and missing and _TORCH.value:
        print(f"Skipping the PyTorch rows: {' and '.join(missing)} not installed.", flush=True)
    if torch_rows and (missing or not _TORCH.value):
        return [n for n in names if n not in torch_rows]
    return names


def row_environment() -> dict:
    """The environment of every row's process, lm's and PyTorch's alike: the allocator that keeps
    freed memory, as lm's binaries choose for themselves (lm/allocator.py), unless the caller
    chose one. JAX's compilation cache stays off whatever the caller's environment: compile times
    are cold ones."""
    return {**allocator.environment(os.environ), "JAX_COMPILATION_CACHE_DIR": ""}


def _in_fresh_process(name: str, repeats: int, cpu_devices: int = 0) -> dict:
    cmd = [sys.executable, __file__, f"--suite={_SUITE.value}", f"--row={name}",
           f"--repeats={repeats}"]
    env = row_environment()
    if cpu_devices:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
            [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={cpu_devices}"]).strip())
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": reason[:200]}
    return json.loads(lines[-1])


def _relative_to_measured_peaks(results: dict) -> None:
    """Train rows' MFU against this run's largest measured matmul rate; decode steps against the
    time to read the weights once at the measured memory bandwidth."""
    peaks = [r["gflops"] * 1e9 for r in results.values() if "gflops" in r]
    bandwidth = [r["gb_per_sec"] for r in results.values() if "gb_per_sec" in r]
    for r in results.values():
        if peaks and "model_tflops_per_sec" in r:
            r["mfu_measured"] = r["model_tflops_per_sec"] * 1e12 / max(peaks)
        if bandwidth and "weight_gb" in r:
            r["floor_ratio"] = r["ms_per_step"] / 1e3 / (r["weight_gb"] / bandwidth[0])


def _relative_to_torch(results: dict) -> None:
    """Each lm row's throughput over its PyTorch pair's: above 1, lm is faster."""
    for name, r in results.items():
        pair = results.get(f"{name}_torch", {})
        for key in ("new_tokens_per_sec", "tokens_per_sec"):
            if key in r and key in pair:
                r["vs_torch"] = r[key] / pair[key]


def _table(results: dict) -> str:
    lines = []
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:40s} error: {r['error']}")
        elif "gflops" in r:
            lines.append(f"{name:40s} {r['gflops']:10,.0f} GFLOP/s")
        elif "gb_per_sec" in r:
            lines.append(f"{name:40s} {r['gb_per_sec']:10,.1f} GB/s")
        elif "new_tokens_per_sec" in r:
            floor = f"  {r['floor_ratio']:.2f}x the weight-read floor" if "floor_ratio" in r else ""
            layout = f"  layout {r['layout_seconds']:.2f}s once" if "layout_seconds" in r else ""
            lines.append(f"{name:40s} {r['new_tokens_per_sec']:10,.1f} new tok/s"
                         f"  {r['ms_per_step']:7.1f} ms/step{floor}{layout}")
        elif "step_ms" in r and "compile_seconds" not in r:
            devices = f"  ({r['devices']} devices)" if r.get("devices", 1) > 1 else ""
            lines.append(f"{name:40s} {r['tokens_per_sec']:10,.0f} tok/s  {r['step_ms']:9.1f} ms"
                         f"{devices}")
        elif "tokens_per_sec" in r:
            mfu = "  ".join(f"{k} {r[k]:.1%}" for k in ("mfu_measured", "mfu_vendor") if r.get(k))
            lines.append(f"{name:40s} {r['tokens_per_sec']:10,.0f} tok/s  {r['step_ms']:9.1f} ms/step"
                         f"  {mfu}  compile {r['compile_seconds']:.1f}s"
                         f"  mem ~{r['memory_estimate_gib']:.1f} GiB  ({r['attention']} attention)")
        else:
            lines.append(f"{name:40s} compile {r['compile_seconds']:.1f}s ({r['layers']} layers)"
                         f"  mem ~{r['memory_estimate_gib']:.1f} GiB")
        if "vs_torch" in r:
            lines[-1] += f"  {r['vs_torch']:.2f}x PyTorch"
        if "torch_threads" in r:
            lines[-1] += f"  (PyTorch, {r['attention']} attention, {r['torch_threads']} threads)"
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    table = CPU_ROWS if _SUITE.value == "cpu" else GPU_ROWS
    if _ROW.value:
        print(json.dumps(run_row(table[_ROW.value], _REPEATS.value)))
        return
    unknown = sorted(set(_ROWS.value) - set(table))
    if unknown:
        sys.exit(f"error: unknown rows {unknown}; the {_SUITE.value} suite has {sorted(table)}")
    results = {}
    for name in _with_torch_pairs(_ROWS.value or list(table), table):
        repeats = min(_REPEATS.value, table[name].max_repeats or _REPEATS.value)
        results[name] = _in_fresh_process(name, repeats, table[name].cpu_devices)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    _relative_to_measured_peaks(results)
    _relative_to_torch(results)
    env = row_environment()
    print("Each row in a fresh process with " + ", ".join(
        f"{name}={env[name]}" for name in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
        if name in env))
    print(_table(results))
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
