"""A seconds-long run for tests and smoke checks."""

from lm.config import default_config


def get_config():
    config = default_config()
    config.model.update(num_layers=2, num_heads=4, d_model=32, context_length=32)
    config.optim.update(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=5)
    config.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                        sample_length=32)
    return config
