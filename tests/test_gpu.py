"""cuDNN's fused attention against the softmax(QK^T)V reference. Needs a GPU, so CI skips it; run
`JAX_PLATFORMS=cuda,cpu python -m pytest tests/test_gpu.py` on a GPU machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_model import LENGTH, VARIANTS, model_config, random_params, random_tokens

from lm.model import Transformer

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _loss_and_grads(cfg, params, tokens, segment_ids):
    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, tokens, segment_ids=segment_ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits
    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), grads


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cudnn_attention_is_as_close_to_float32_as_bfloat16_softmax_attention(variant, packed):
    reference = model_config(variant, d_model=128, attention_impl="xla")
    params = random_params(reference)
    tokens = random_tokens((4, LENGTH))
    segments = (np.arange(LENGTH)[None] >= np.array([[3], [8], [16], [0]])).astype(np.int32)
    segments = segments if packed else None
    exact, exact_grads = _loss_and_grads(reference, params, tokens, segments)
    errors = {}
    for impl in ("xla", "cudnn"):
        cfg = model_config(variant, d_model=128, attention_impl=impl, dtype="bfloat16")
        assert cfg.attention == impl
        logits, grads = _loss_and_grads(cfg, params, tokens, segments)
        grad_error = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                         for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(exact_grads)))
        errors[impl] = (float(np.max(np.abs(logits - exact))), grad_error)
    # bfloat16 rounding bounds both; a wrong mask or head grouping would be far outside it.
    assert errors["cudnn"][0] <= 2 * errors["xla"][0] + 1e-3, errors
    assert errors["cudnn"][1] <= 2 * errors["xla"][1] + 1e-4, errors
