"""Comparing parameter trees leaf by leaf, naming the leaf that differs."""

import jax
import numpy as np


def assert_trees_close(actual, expected, atol=0.0, rtol=0.0):
    """Same structure and values within tolerance; the defaults demand exact equality."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                            jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol,
                                   err_msg=jax.tree_util.keystr(path))
