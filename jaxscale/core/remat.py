"""Named rematerialization policies: what each layer keeps for the backward pass.

A policy is applied per transformer layer (inside `nn.scan` when layers are scanned): during the
backward pass everything the policy does not save is recomputed from the layer's input. Models
tag the tensors that the name-based policies refer to with `checkpoint_name(x, NAME)`.

| policy         | saved for backward                                  | memory | recompute |
|----------------|-----------------------------------------------------|--------|-----------|
| none           | everything (no remat)                               | most   | none      |
| full           | nothing but the layer input                         | least  | whole fwd |
| minimal        | matmul outputs without batch dims (projections)     | medium | attention |
| save_dots      | every matmul output, incl. attention scores         | high   | elementwise |
| save_qkv_proj  | query/key/value projections                         | low    | most      |
| save_attn_out  | attention output (before its output projection)     | low    | most      |
| save_mlp       | MLP input projections                               | medium | attention |
| offload_dots   | like minimal, but saved to pinned host memory       | low (device) | attention |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxscale.config import ConfigError
from jaxscale.core.dtypes import WEIGHT_DOT

# Names models give to the tensors that name-based policies save.
QUERY_PROJ = "query_proj"
KEY_PROJ = "key_proj"
VALUE_PROJ = "value_proj"
ATTN_OUT = "attn_out"
MLP_IN = "mlp_in"
MLP_OUT = "mlp_out"
# WEIGHT_DOT names the output of a weight's matmul with its own gradient rule
# (`core.dtypes.weight_grad_dot`), a custom VJP: no dot-based policy sees a dot_general inside
# it, so those policies save it by that name.

_cp = jax.checkpoint_policies


def _and_weight_dots(dot_policy: Callable[..., Any]) -> Callable[..., Any]:
    """`dot_policy`, also saving the weight matmuls that carry their own gradient rule (a weight's
    matmul has no batch dimensions, so every dot-based policy saves it)."""
    return _cp.save_from_both_policies(dot_policy, _cp.save_only_these_names(WEIGHT_DOT))


def _offload_with_weight_dots(src: str, dst: str) -> Callable[..., Any]:
    """`offload_dot_with_no_batch_dims`, also offloading the weight matmuls with their own
    gradient rule."""
    dots = _cp.offload_dot_with_no_batch_dims(src, dst)
    named = _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[WEIGHT_DOT],
        offload_src=src, offload_dst=dst)

    recompute = dots(jax.lax.add_p)  # what the dot policy answers for anything not a dot

    def policy(prim, *args, **params):
        decision = dots(prim, *args, **params)
        return named(prim, *args, **params) if decision is recompute else decision

    return policy


# None means: do not wrap the layer in jax.checkpoint at all.
POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": _cp.nothing_saveable,
    "minimal": _and_weight_dots(_cp.dots_with_no_batch_dims_saveable),
    "save_dots": _and_weight_dots(_cp.dots_saveable),
    "save_qkv_proj": _cp.save_only_these_names(QUERY_PROJ, KEY_PROJ, VALUE_PROJ),
    "save_attn_out": _cp.save_only_these_names(ATTN_OUT),
    "save_mlp": _cp.save_only_these_names(MLP_IN),
    "offload_dots": _offload_with_weight_dots("device", "pinned_host"),
}

# Policies that move residuals to host memory, and the memory kind they need.
_NEEDS_MEMORY_KIND = {"offload_dots": "pinned_host"}


def get_policy(name: str) -> Callable[..., Any] | None:
    """The jax.checkpoint policy for `name` (None for "none").

    Raises:
      ConfigError: unknown name, or an offloading policy on a backend without pinned host memory.
    """
    if name not in POLICIES:
        import difflib

        close = difflib.get_close_matches(name, list(POLICIES), n=1)
        raise ConfigError(
            f"model.remat={name!r} is not valid; choose one of: {', '.join(POLICIES)}"
            + (f" (did you mean '{close[0]}'?)" if close else "")
        )
    kind = _NEEDS_MEMORY_KIND.get(name)
    if kind is not None:
        device = jax.devices()[0]
        kinds = {m.kind for m in device.addressable_memories()}
        if kind not in kinds:
            raise ConfigError(
                f"model.remat={name!r} offloads to {kind!r} memory, which the {device.platform} "
                f"backend does not offer (it has: {', '.join(sorted(kinds))}); use 'minimal' "
                "instead"
            )
    return POLICIES[name]
