"""`lm.train --preflight`: the run's own train step compiled for its mesh, measured against a
memory budget before any data is read, and one-line errors for what it cannot know."""

import jax
import numpy as np
import pytest

from configs import tiny

from lm.config import ConfigError
from lm.model import ModelConfig, Transformer
from lm.preflight import preflight

VOCAB = 300


def huggingface_tokenizer_json(path):
    """A HuggingFace tokenizer.json of VOCAB ids (a word-level vocabulary)."""
    hf_tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def test_preflight_measures_the_runs_own_step_packed_documents_included(tmp_path):
    config = tiny.get_config()
    config.data.tokenizer = str(huggingface_tokenizer_json(tmp_path / "tokenizer.json"))
    plain = preflight(config)
    model = Transformer(ModelConfig.for_run(config, VOCAB, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32), np.int32))
    assert plain["parameters"] == sum(x.size for x in jax.tree.leaves(shapes))  # vocab 384
    # Packed batches carry segment ids and positions too: over a budget the plain step fits in.
    config.data.segment_documents = True
    with pytest.raises(ConfigError, match=r"the train step needs ~.* GiB per device, over the "):
        preflight(config, memory_budget_gib=plain["memory_gib_per_device"])


def test_preflight_of_a_character_vocabulary_asks_for_its_size():
    with pytest.raises(ConfigError, match=r"known only after reading the data; set "
                                          r"config.model.vocab_size for the preflight"):
        preflight(tiny.get_config())
