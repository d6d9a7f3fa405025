"""The FLOP convention behind MFU agrees with XLA's own count, where XLA's count is valid."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from lm import flops, step
from lm.config import default_config
from lm.model import ModelConfig, Transformer

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, tie_embeddings=False,
             num_kv_heads=2)


@pytest.mark.parametrize("variant", [{}, LLAMA], ids=["gpt2", "llama"])
def test_formula_matches_xla_cost_analysis_of_unscanned_gradient(variant):
    # XLA counts a scanned body once, so only the unscanned model's count is a valid reference.
    config = default_config()
    config.model.update(num_layers=2, d_model=128, num_heads=4, context_length=64,
                        scan_layers=False, **variant)
    cfg = ModelConfig.from_config(config.model, 256)
    model = Transformer(cfg)
    tokens = jnp.zeros((4, 64), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones((4, 64))}
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    grad = jax.jit(jax.grad(lambda p: step.loss_sums(p, model, batch, 0.0, None)[0]))
    cost = grad.lower(params).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    # The formula leaves out norms, softmax and other elementwise work: a few percent here.
    assert 0.97 < xla_flops / (flops.train_flops_per_token(cfg) * tokens.size) < 1.06


def test_peak_flops_picks_the_most_specific_device_kind():
    def chips(kind, n):
        return [SimpleNamespace(platform="tpu", device_kind=kind)] * n
    assert flops.peak_flops(chips("TPU v5 lite", 4)) == 4 * 197e12
    assert flops.peak_flops(chips("TPU v5p", 2)) == 2 * 459e12
    assert flops.peak_flops(chips("Some New Chip", 2)) is None
    assert flops.peak_flops(chips("Some New Chip", 2), per_device=1e12) == 2e12
