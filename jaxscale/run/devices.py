"""Simulated CPU devices: `set_cpu_devices(8)` makes one host look like an 8-device machine.

Nothing here imports jax at module level: the device count is an XLA flag that is read when jax
initialises its backends, so the CLI calls this after parsing its arguments and before its
first jax import.
"""

from __future__ import annotations

import os
import sys

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def set_cpu_devices(count: int | None) -> None:
    """Run on `count` simulated CPU devices; `None` leaves the platform alone.

    Call it before jax initialises its backends (before the first computation or device query).
    When jax is already imported but not yet initialised, its config is updated instead of the
    environment, which jax has read by then.
    """
    if count is None:
        return
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_COUNT_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_COUNT_FLAG}={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
