"""A LLaMA-style model of about 1.1B parameters (the TinyLlama shape): 22 layers, width 2048,
32 query heads sharing 4 key/value heads, SwiGLU width 5632, RoPE, RMSNorm, untied head, 2048 context.
"""

from lm.config import default_config


def get_config():
    config = default_config()
    config.data.update(tokenizer="byte")
    config.model.update(vocab_size=32000, num_layers=22, num_heads=32, num_kv_heads=4, d_model=2048,
                        d_ff=5632, context_length=2048, norm="rmsnorm", norm_eps=1e-5,
                        position="rope", rope_theta=10000.0, mlp="swiglu", use_bias=False,
                        tie_embeddings=False, dtype="bfloat16",
                        remat_policy="dots_with_no_batch_dims_saveable")
    config.optim.update(learning_rate=4e-4, min_learning_rate=4e-5, warmup_steps=2000,
                        b2=0.95, weight_decay=0.1)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.update(steps=100_000, batch_size=256, log_every=10, eval_every=2000,
                        eval_batches=20)
    return config
