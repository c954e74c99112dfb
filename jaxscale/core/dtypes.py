"""The jnp dtypes that the config's dtype names stand for (model.dtype, optim.moment_dtype, ...).

The names are `jaxscale.config.DTYPES` (the `config.DType` Literal); this is the one table that
turns them into dtypes, so a dtype the config accepts is a dtype every module can build.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxscale.errors import ConfigError

# config name -> jnp dtype; keyed by exactly `jaxscale.config.DTYPES` (tests/test_config.py)
DTYPES: dict[str, type] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def dtype(name: str) -> type:
    """The jnp dtype of a config dtype name: ``dtype("bfloat16") is jnp.bfloat16``.

    Raises:
      ConfigError: `name` is not one of `DTYPES` (the config's validation rejects it earlier).
    """
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not valid; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]
