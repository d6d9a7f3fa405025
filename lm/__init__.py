"""lm: autoregressive Transformer language models in JAX/Flax.

From Python or a notebook: `run = lm.load(workdir)`, then `run.generate(...)`, `run.perplexity(...)`,
`run.logits(...)`; training is `lm.train.train_and_evaluate(config, workdir)`.
"""

__all__ = ["LoadedModel", "load"]


def __getattr__(name: str):
    # Imported on first use: `python -m lm.train` must not import lm.train (its flags) twice.
    if name in __all__:
        from lm import inference
        return getattr(inference, name)
    raise AttributeError(f"module 'lm' has no attribute {name!r}")
