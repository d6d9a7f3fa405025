"""lm's training is nanoGPT's, step for step: scripts/nanogpt_paired.py trains lm (on 8 devices)
and an independent PyTorch nanoGPT from the same weights on the same batches."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm.config import ConfigError, default_config

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def paired():
    spec = importlib.util.spec_from_file_location("nanogpt_paired", ROOT / "scripts/nanogpt_paired.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired_config(corpus: Path, **model):
    c = default_config()
    c.data.update(path=str(corpus), tokenizer="char")
    c.model.update(num_layers=2, num_heads=4, d_model=32, context_length=16, use_bias=False,
                   **{"vocab_multiple": 1, **model})
    # A peak rate high enough for the clip to bite early on, a warmup and a decay to the floor.
    c.optim.update(learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=5, weight_decay=0.1,
                   grad_clip=0.5)
    c.train.update(steps=STEPS, batch_size=8, log_every=STEPS, eval_batches=4,
                   final_eval_batches=0)
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = ["the ", "king ", "of ", "rome ", "speaks\n", "and ", "all ", "listen, "]
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(rng.choice(words, 6000)))
    return path


@pytest.mark.parametrize("model, decay_embeddings, mesh", [
    (dict(mlp="gelu_exact", scan_layers=False), True, (8, 1, 1)),  # shakespeare_char's model
    (dict(mlp="gelu", scan_layers=True, vocab_multiple=8), False, (2, 2, 2)),
])
def test_training_matches_an_independent_pytorch_nanogpt_step_for_step(
        paired, corpus, tmp_path, model, decay_embeddings, mesh):
    config = paired_config(corpus, **model)
    config.optim.decay_embeddings = decay_embeddings
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    run = paired.paired_run(config, tmp_path)

    lm_losses, torch_losses = run["losses"].T
    assert lm_losses[-1] < lm_losses[0] - 1.0  # it learned: the comparison is not of two no-ops
    np.testing.assert_allclose(lm_losses, torch_losses, rtol=0, atol=2e-5)
    lm_norms, torch_norms = run["grad_norms"].T
    assert (torch_norms > config.optim.grad_clip).sum() >= 5  # the clip acts
    np.testing.assert_allclose(lm_norms, torch_norms, rtol=1e-4)
    assert run["val_lm"] == pytest.approx(run["val_nanogpt"], abs=2e-5)

    # The weights themselves, norms and embeddings included: weight decay on the norms too, or a
    # warmup one step ahead, moves some by 0.02 or more over these steps (measured).
    lm_as_torch = copy.deepcopy(run["reference"])
    paired.load_lm_params(lm_as_torch, run["lm_params"])
    expected = run["reference"].state_dict()
    for name, value in lm_as_torch.state_dict().items():
        np.testing.assert_allclose(value.numpy(), expected[name].numpy(), rtol=0, atol=2e-5,
                                   err_msg=name)


def test_a_config_nanogpt_cannot_run_is_a_one_line_error(paired):
    config = default_config()
    config.model.norm = "rmsnorm"
    with pytest.raises(ConfigError, match=r"config.model.norm='rmsnorm'.*--config.model.norm="):
        paired.check_pairable(config)
    one_device = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user runs it
    done = subprocess.run([sys.executable, "scripts/nanogpt_paired.py",
                           "--config.model.use_bias=True"],
                          cwd=ROOT, env=one_device, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: config.model.use_bias=True: nanoGPT's model has False; set "
        "--config.model.use_bias=False"]
