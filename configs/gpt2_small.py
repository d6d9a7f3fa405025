"""GPT-2 small (124M parameters): 12 layers, 12 heads, width 768, context 1024.

The vocabulary is GPT-2's 50257 padded to 50304 (a multiple of 128), as nanoGPT does. Until a GPT-2
BPE tokenizer is wired in, the byte tokenizer feeds it. Sized for an accelerator: ~0.5M tokens/step.
On a CPU, add --config.model.scan_layers=false --config.model.dtype=float32: the unrolled step runs
~14% faster there (see the README's Benchmarks), and XLA:CPU's bfloat16 products are no faster.
"""

from lm.config import default_config


def get_config():
    config = default_config()
    config.data.update(tokenizer="byte")
    config.model.update(vocab_size=50304, num_layers=12, num_heads=12, d_model=768,
                        context_length=1024, dropout=0.0, dtype="bfloat16",
                        remat_policy="dots_with_no_batch_dims_saveable")
    config.optim.update(learning_rate=6e-4, min_learning_rate=6e-5, warmup_steps=2000,
                        b2=0.95, weight_decay=0.1)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.update(steps=600_000, batch_size=512, log_every=10, eval_every=2000,
                        eval_batches=20)
    return config
