"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere.

XLA's backend optimisation level 0 halves compile times (most of this suite's time) and changes
no result a test checks: tests compare runs made under the same flags.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
