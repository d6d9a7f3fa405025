"""Continue from a workdir, e.g. one `python -m lm.hf import` wrote: its model and tokenizer, its
parameters as the starting point (`train.init_from`), and default training settings.

    python -m lm.train --config=configs/imported.py:runs/gpt2 --workdir=runs/gpt2_ft \
        --config.data.path=corpus.txt --config.train.steps=200 --config.optim.learning_rate=3e-5
"""

import sys

from lm.config import ConfigError
from lm.checkpoint import load_run_config


def get_config(workdir: str = ""):
    if not workdir:
        sys.exit("error: --config=configs/imported.py:WORKDIR needs the workdir to start from "
                 "after the colon")
    try:
        config = load_run_config(workdir)
    except ConfigError as e:
        sys.exit(f"error: --config=configs/imported.py:{workdir}: {e}")
    if not config.lora.rank:  # a LoRA workdir keeps its base (lora_base.json)
        config.train.init_from = workdir
    return config
