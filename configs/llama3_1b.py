"""A LLaMA 3 shape at 8k context (Llama 3.2 1B's: 16 layers, width 2048, 32 query heads sharing 8
key/value heads, SwiGLU width 8192, RoPE theta 500,000, a 128,256-entry vocabulary tied to the
output head; 1.24B parameters). Its logits are 4.2 GB a row in float32, so the train step computes
the head and loss in chunks of positions (model.loss_chunk_positions, automatic here); it fits one
80 GB accelerator:

    python -m lm.train --config=configs/llama3_1b.py --preflight --memory_budget_gib=80
"""

from lm.config import default_config


def get_config():
    config = default_config()
    config.data.update(tokenizer="byte")
    config.model.update(vocab_size=128256, num_layers=16, num_heads=32, num_kv_heads=8,
                        d_model=2048, d_ff=8192, context_length=8192, norm="rmsnorm",
                        norm_eps=1e-5, position="rope", rope_theta=500000.0, mlp="swiglu",
                        use_bias=False, tie_embeddings=True, dtype="bfloat16",
                        remat_policy="dots_with_no_batch_dims_saveable")
    config.optim.update(learning_rate=3e-4, min_learning_rate=3e-5, warmup_steps=2000,
                        b2=0.95, weight_decay=0.1, grad_accum_steps=4)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.update(steps=100_000, batch_size=8, log_every=10, eval_every=2000,
                        eval_batches=20)
    return config
