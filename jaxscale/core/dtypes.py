"""The jnp dtypes that the config's dtype names stand for (model.dtype, optim.moment_dtype, ...).

The names are `jaxscale.config.DTYPES` (the `config.DType` Literal); this is the one table that
turns them into dtypes, so a dtype the config accepts is a dtype every module can build.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxscale.errors import ConfigError

WEIGHT_DOT = "weight_dot"  # the checkpoint name of weight_grad_dot's output (core.remat)

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
    lhs_grad = jax.linear_transpose(
        lambda x: jax.lax.dot_general(x, rhs, dimension_numbers, precision), lhs)
    return lhs_grad(g)[0], _weight_grad(lhs, g, rhs, dimension_numbers, precision, grad_dtype)


def _weight_grad(lhs, g, rhs, dimension_numbers, precision, grad_dtype):
    """The gradient of ``dot_general(lhs, rhs)`` w.r.t. `rhs` (no batch dimensions): `lhs` and
    the output's cotangent `g`, both in the compute dtype, contracted over `lhs`'s free axes with
    a `grad_dtype` result, so the cross-device sum of the per-device partial gradients runs in
    `grad_dtype`; it is rounded to the weights' dtype once, after that sum."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    assert batch == ((), ()), "weight_grad_dot: a weight's matmul has no batch dimensions"
    lhs_free = [a for a in range(lhs.ndim) if a not in lhs_contract]
    # g's axes: lhs's free axes, then rhs's free axes (dot_general's output order)
    out = jax.lax.dot_general(lhs, g.astype(lhs.dtype),
                              ((lhs_free, range(len(lhs_free))), ((), ())), precision,
                              preferred_element_type=grad_dtype)
    # out's axes: lhs's contracted axes in increasing order, then rhs's free axes
    order = sorted(lhs_contract)
    rhs_free = [a for a in range(rhs.ndim) if a not in rhs_contract]
    source = {r: order.index(c) for c, r in zip(lhs_contract, rhs_contract, strict=True)}
    source.update({r: len(order) + i for i, r in enumerate(rhs_free)})
    return jnp.transpose(out, [source[a] for a in range(rhs.ndim)]).astype(rhs.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)


def weight_grad_dtype(grad_dtype: str, compute_dtype: str) -> type | None:
    """The dtype `model.weight_grad_dtype` names, or None where it is the compute dtype anyway
    ("compute", or a float32 model)."""
    if grad_dtype == "compute" or dtype(grad_dtype) == dtype(compute_dtype):
        return None
    return dtype(grad_dtype)


def weight_grad_dot(grad_dtype: str, compute_dtype: str) -> Callable:
    """A `jax.lax.dot_general` for layers whose second operand is a weight, with the weight's
    gradient formed in the weight's own axis order and computed in `grad_dtype`
    (`model.weight_grad_dtype`; "compute": the compute dtype).

    Autodiff writes a weight's gradient as ``dot(g, x)`` transposed: the output's cotangent
    first, its [out, in] product then transposed to the weight's [in, out]. The CPU backend
    then copies the cotangent into a transposed layout before the matmul, which for an MLP's
    input projections is the d_ff-wide activation gradient (10% of a small model's step). Here
    the gradient is ``dot(x, g)`` over the positions, the weight's [in, out] directly, and the
    operand laid out again (if any) is the layer's input. Same FLOPs, same values to float32
    rounding; the forward pass is the plain matmul.
    """
    target = weight_grad_dtype(grad_dtype, compute_dtype) or dtype(compute_dtype)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if preferred_element_type is not None and preferred_element_type != lhs.dtype:
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                       preferred_element_type=preferred_element_type)
        # named so that the dot-based remat policies, which see no dot_general inside a
        # custom VJP, save it as they save the plain matmul
        return checkpoint_name(_dot(lhs, rhs, dimension_numbers, precision, target), WEIGHT_DOT)

    return dot_general
