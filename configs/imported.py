"""Continue from a workdir, e.g. one `python -m lm.hf import` wrote: its model and tokenizer, its
parameters as the starting point (`train.init_from`), and default training settings.

    python -m lm.train --config=configs/imported.py:runs/gpt2 --workdir=runs/gpt2_ft \
        --config.data.path=corpus.txt --config.train.steps=200 --config.optim.learning_rate=3e-5
"""

from lm.hf import load_run_config


def get_config(workdir: str):
    config = load_run_config(workdir)
    config.train.init_from = workdir
    return config
