"""Tiny Shakespeare with a 1024-piece BPE vocabulary: the README's worked example of the data path.

Train the tokenizer first (or set data.tokenizer="train:1024" to train it on the training split):
    python -m lm.tokenizer --input=../shared/data/tinyshakespeare/input.txt \
        --model_prefix=runs/spm/shakespeare --vocab_size=1024 --model_type=bpe
The model is configs/shakespeare_char.py's; its 64-token context holds ~150 characters.
"""

from lm.config import default_config


def get_config():
    config = default_config()
    config.data.update(path="../shared/data/tinyshakespeare/input.txt",
                       tokenizer="runs/spm/shakespeare.model", val_fraction=0.1)
    config.model.update(num_layers=4, num_heads=4, d_model=128, context_length=64, dropout=0.0,
                        use_bias=False, mlp="gelu_exact", scan_layers=False)
    config.optim.update(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
                        decay_steps=1500, b1=0.9, b2=0.99, weight_decay=0.1)
    # Each of the three evaluations scores every validation window (63 batches).
    config.train.update(steps=1500, batch_size=12, log_every=100, eval_every=500, eval_batches=1000,
                        sample_prompt="\n", sample_length=100)
    return config
