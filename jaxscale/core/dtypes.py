"""The jnp dtypes that the config's dtype names stand for (model.dtype, optim.moment_dtype, ...).

The names are `jaxscale.config.DTYPES` (the `config.DType` Literal); this is the one table that
turns them into dtypes, so a dtype the config accepts is a dtype every module can build.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dot(lhs, rhs, dimension_numbers, precision, grad_dtype):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision)


def _dot_fwd(lhs, rhs, dimension_numbers, precision, grad_dtype):
    return _dot(lhs, rhs, dimension_numbers, precision, grad_dtype), (lhs, rhs)


def _dot_bwd(dimension_numbers, precision, grad_dtype, residuals, g):
    lhs, rhs = residuals
    _, lhs_vjp = jax.vjp(lambda x: jax.lax.dot_general(x, rhs, dimension_numbers, precision), lhs)
    # The weights' gradient matmul accumulates into and emits `grad_dtype`: the cross-device sum
    # of the per-device partial gradients runs in it; the result is rounded to the weights'
    # dtype once, after the sum.
    _, rhs_vjp = jax.vjp(lambda w: jax.lax.dot_general(
        lhs, w, dimension_numbers, precision, preferred_element_type=grad_dtype), rhs)
    return lhs_vjp(g)[0], rhs_vjp(g.astype(grad_dtype))[0]


_dot.defvjp(_dot_fwd, _dot_bwd)


def weight_grad_dot(grad_dtype: str, compute_dtype: str) -> Callable | None:
    """A `jax.lax.dot_general` for layers whose second operand is a weight, with the weight's
    gradient computed in `grad_dtype` (`model.weight_grad_dtype`); None when that is the compute
    dtype anyway ("compute", or a float32 model), so layers keep the plain matmul."""
    if grad_dtype == "compute" or dtype(grad_dtype) == dtype(compute_dtype):
        return None
    target = dtype(grad_dtype)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if preferred_element_type is not None and preferred_element_type != lhs.dtype:
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                       preferred_element_type=preferred_element_type)
        return _dot(lhs, rhs, dimension_numbers, precision, target)

    return dot_general
