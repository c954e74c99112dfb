"""The model adapter protocol: how jaxscale initialises, annotates and calls a Flax model.

Every kind of model (Linen with logical names, Linen without, NNX) is wrapped in an adapter that
yields the same three things:

* ``init(rng, inputs) -> (params, extra)``: the trainable parameters, whose leaves are arrays or
  `flax.linen.Partitioned` boxes carrying one logical name per dimension, and the model's other
  variable collections (e.g. BatchNorm statistics) as a dict of arrays;
* ``apply(params, extra, inputs, *, rng, train) -> Applied``: a pure call on unboxed arrays that
  returns the outputs, the updated collections and any auxiliary losses and metrics;
* ``config``: the model's config dataclass when it has one (FLOPs formulas use it), else None.

`inputs` is the task's dict of model inputs by role (``{"inputs": tokens, "positions": ...,
"segment_ids": ...}``). Adapters pass them to the model **by keyword**, matched against the
parameter names of the model's ``__call__`` (see `call_keywords`), so a model from another
library with ``__call__(self, input_ids, attention_mask=None, position_ids=None)`` receives
``input_ids=tokens, position_ids=positions`` and never a document mask in its attention-mask slot.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

from jaxscale.errors import ConfigError

# Role -> parameter names a model may give it, most specific first. A name may also carry a
# shape suffix (``tokens_BT``, ``images_BHWC``), which is ignored when matching.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "inputs": ("inputs", "tokens", "input_ids", "images", "pixel_values", "x"),
    "positions": ("positions", "position_ids"),
    "segment_ids": ("segment_ids", "segment_pos", "document_ids"),
}
# Parameter names by which models take the train/eval switch, and how to set them.
TRAIN_FLAGS: dict[str, Callable[[bool], bool]] = {
    "deterministic": lambda train: not train,
    "train": lambda train: train,
    "training": lambda train: train,
    "is_training": lambda train: train,
    "use_running_average": lambda train: not train,
}
_SHAPE_SUFFIX = re.compile(r"_[A-Z]+$")


class Applied(NamedTuple):
    outputs: Any  # what the model returned (e.g. logits)
    extra: dict  # the updated non-parameter collections (the input `extra` when none changed)
    aux_losses: dict  # name -> scalar added to the objective (per counted token / example)
    aux_metrics: dict  # name -> scalar reported with the metrics


class Stages(NamedTuple):
    """A model split for pipeline parallelism, over its own parameter tree (an adapter's
    ``stages()``; the built-in decoder's `Decoder.pipeline_stages`).

    Attributes:
      key: the top-level parameter holding the layer stack (every leaf [layers, ...]).
      embed: ``(params, inputs, rng, train) -> x``: the first stage's input (inputs by role).
      layers: ``(stack params [n, ...], x, inputs, rng, train) -> x``: n layers of the stack.
      head: ``(params, x, inputs) -> outputs``: what the task's loss reads.
      head_keys: the top-level parameters `head` reads (the last stage holds them).
    """

    key: str
    embed: Callable
    layers: Callable
    head: Callable
    head_keys: tuple[str, ...]


@runtime_checkable
class ModelAdapter(Protocol):
    kind: str  # "linen" or "nnx"
    config: Any  # the model's config dataclass, or None

    def init(self, rng: Any, inputs: Mapping[str, Any]) -> tuple[Any, dict]: ...

    def apply(self, params: Any, extra: dict, inputs: Mapping[str, Any], *, rng: Any,
              train: bool) -> Applied: ...


def call_keywords(
    fn: Callable, roles: Mapping[str, Any], train: bool, *,
    call_args: Mapping[str, str | None] | None = None, what: str = "the model",
) -> dict[str, Any]:
    """Keyword arguments for calling `fn` with the task's inputs and the train switch.

    Args:
      fn: the model's ``__call__`` (bound or not).
      roles: the task's inputs by role (values may be None: not passed).
      train: whether this is a training call.
      call_args: explicit role -> parameter name (None = do not pass that role), overriding
        `ROLE_NAMES`.

    Raises:
      ConfigError: the model takes no parameter for the "inputs" role.
    """
    params = inspect.signature(fn).parameters
    by_plain = {_SHAPE_SUFFIX.sub("", name): name for name in params if name != "self"}
    explicit = dict(call_args or {})
    kwargs: dict[str, Any] = {}
    for role, value in roles.items():
        if role in explicit:
            target = explicit[role]
        else:
            target = next((by_plain[n] for n in ROLE_NAMES.get(role, (role,)) if n in by_plain),
                          None)
        if target is None:
            if role == "inputs":
                raise ConfigError(
                    f"{what} takes no argument for its inputs: its call signature is "
                    f"{tuple(n for n in params if n != 'self')}; name the argument with "
                    f"call_args={{'inputs': '<argument>'}}"
                )
            continue
        if value is not None:
            kwargs[target] = value
    for name, flag in TRAIN_FLAGS.items():
        if name in by_plain:
            kwargs[by_plain[name]] = flag(train)
    return kwargs
