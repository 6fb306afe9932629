"""Root pytest configuration, shared by tests, doctests and the examples' tests.

Simulates 8 CPU devices (for sharding tests) and makes implicit rank promotion an
error, so that every broadcast in jaxbn is explicit. Marks the slow tier.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

# The slow tier: tests listed in tests/slow.txt (measured, see its header).
_SLOW = {
    line.strip()
    for line in (Path(__file__).parent / "tests" / "slow.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


@pytest.fixture(scope="module")
def non_partitionable_threefry():
    """Draws the module's random values with the non-partitionable threefry.

    XLA:CPU takes from one to several seconds to compile the partitionable one
    (jax's default) for each new shape with a short last axis, such as a
    convolution kernel (3, 3, 8, 16) or data (16, 4, 3), against a fraction of
    a second for the other: often more than the test itself. For modules whose
    tests hold for any drawn values (references computed from the values
    drawn); ``pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")``.
    """
    with jax.threefry_partitionable(False):
        yield


def pytest_collection_modifyitems(config, items):
    """Marks the tests of tests/slow.txt ``slow``: ``pytest -m "not slow"``."""
    del config
    for item in items:
        if item.nodeid in _SLOW:
            item.add_marker(pytest.mark.slow)
