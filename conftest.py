"""Root pytest configuration, shared by tests, doctests and the examples' tests.

Simulates 8 CPU devices (for sharding tests) and makes implicit rank promotion an
error, so that every broadcast in jaxbn is explicit.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
