"""nanoGPT's CPU "baby" Shakespeare settings (config/train_shakespeare_char.py with its CPU notes),
for comparison: published validation loss 1.88 after 2000 steps.

Run from the repository root, or point --config.data.path at your copy of Tiny Shakespeare.
"""

from lm.config import default_config


def get_config():
    config = default_config()
    config.data.update(path="../shared/data/tinyshakespeare/input.txt", tokenizer="char",
                       val_fraction=0.1)
    # nanoGPT: no biases, exact GELU, 65 characters (here 66 with the end-of-text id, unpadded).
    # Four layers compile quickly unrolled, and on a CPU the unrolled step runs ~30% faster.
    config.model.update(num_layers=4, num_heads=4, d_model=128, context_length=64, dropout=0.0,
                        use_bias=False, mlp="gelu_exact", vocab_multiple=1, scan_layers=False)
    # nanoGPT decays every 2-D weight, the (tied) embedding and the position table included.
    config.optim.update(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
                        schedule="cosine", decay_steps=2000, b1=0.9, b2=0.99, weight_decay=0.1,
                        decay_embeddings=True, grad_clip=1.0)
    # nanoGPT estimates val loss from 20 random batches (std ~0.016 per estimate). Here the
    # evaluations on the way score 20 fixed batches spread over the split (nanoGPT's eval_iters),
    # and the last one scores every window (145 batches, 1.75 s), which gives the number itself.
    config.train.update(steps=2000, batch_size=12, log_every=100, eval_every=250, eval_batches=20,
                        final_eval_batches=1000, sample_prompt="\n", sample_length=300)
    return config
