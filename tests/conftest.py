"""Test configuration.

The root ``conftest.py`` sets 8 CPU devices and ``jax_numpy_rank_promotion="raise"``;
``pyproject.toml`` turns warnings into errors. This file holds shared fixtures.
"""

import jax
import pytest


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)
