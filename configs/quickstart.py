"""About two minutes on a laptop CPU: a small model of Python's own documentation.

The corpus ships with every Python (pydoc topics and stdlib docstrings), so nothing is downloaded. A
1024-piece BPE vocabulary, trained on the training split at the first run, lets a model this small
write words: at the same compute, a character-level one spells its words out of fragments.
"""

from lm.config import default_config


def get_config():
    config = default_config()
    config.data.update(path="builtin:python_docs", tokenizer="train:1024")
    # Four layers compile quickly unrolled, and on a CPU the unrolled step runs faster.
    config.model.update(num_layers=4, num_heads=4, d_model=128, context_length=128,
                        scan_layers=False)
    config.optim.update(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=50)
    # "The", not "The ": a BPE piece carries the space before its word, so a prompt ending in a
    # space asks for what follows a lone space in the corpus (indentation).
    # Top-10 sampling: a model this small puts enough mass on its long tail (runs of capitals,
    # digits) that plain temperature sampling often wanders off into it.
    config.train.update(steps=800, batch_size=16, log_every=50, eval_every=200, eval_batches=20,
                        sample_prompt="The", sample_length=100, sample_temperature=0.7,
                        sample_top_k=10)
    return config
