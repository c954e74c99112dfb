"""TrainState: the arrays of a training run, and their sharded initialisation.

The state is plain data: no apply function, no optimizer object. Parameters are born sharded:
`init_state` evaluates the initialiser abstractly, derives every leaf's sharding from the logical
annotations and the rules, and runs the initialiser under `jax.jit(out_shardings=...)`, so no
device ever holds a whole unsharded parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxscale.core import sharding as shd


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken so far
    params: Any  # trainable parameters
    opt_state: Any  # optax state of `params`
    extra: Any  # the model's other variable collections (e.g. batch statistics); {} if none
    skipped_steps: jax.Array  # int32 scalar: updates dropped for a non-finite loss or gradient


VariablesFn = Callable[[jax.Array], tuple[Any, Any]]
"""``variables_fn(rng) -> (params, extra)``: a model's initial parameters (leaves boxed with their
logical names, `nn.Partitioned`) and its other collections; see `jaxscale.run.build`."""


def make_init_fn(
    variables_fn: VariablesFn, tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    """A function rng -> TrainState whose parameters are still boxed with their logical axes.

    Use it with `jax.eval_shape` to get the abstract state for `sharding.state_shardings`, then
    run `unbox(init_fn(rng))` under jit (see `init_state`).
    """

    def init_fn(rng: jax.Array) -> TrainState:
        boxed_params, extra = variables_fn(rng)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=boxed_params,
            opt_state=tx.init(nn.unbox(boxed_params)),
            extra=dict(extra),
            skipped_steps=jnp.zeros((), jnp.int32),
        )

    return init_fn


def unbox(state: TrainState) -> TrainState:
    """The state with Flax's logical-partitioning boxes removed (arrays only)."""
    return state.replace(params=nn.unbox(state.params), extra=nn.unbox(state.extra))


def abstract_state(
    variables_fn: VariablesFn, tx: optax.GradientTransformation, seed: int = 0
) -> TrainState:
    """Shapes and dtypes of the boxed state, computed without allocating anything."""
    return jax.eval_shape(make_init_fn(variables_fn, tx), jax.random.key(seed))


def init_state(
    variables_fn: VariablesFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: shd.LogicalRules,
    *,
    seed: int = 0,
    shardings: Any = None,
) -> tuple[TrainState, TrainState]:
    """Initialise a TrainState sharded over `mesh` by `rules`.

    Args:
      shardings: the state's shardings when already computed (`sharding.state_shardings`).

    Returns:
      (state, shardings): the state, and a TrainState-shaped tree of NamedShardings to jit with.
    """
    init_fn = make_init_fn(variables_fn, tx)
    rng = jax.random.key(seed)
    if shardings is None:
        shardings = shd.state_shardings(jax.eval_shape(init_fn, rng), mesh, rules)
    state = jax.jit(lambda r: unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings


def num_params(params: Any) -> int:
    """Number of scalars in a parameter tree (boxed, abstract or concrete)."""
    return sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(params)))
