"""Models, the adapters that let jaxscale train any Flax model, and a registry by name.

Any Flax model trains with jaxscale through an adapter (`jaxscale.models.adapter`):

* a Linen module (`LinenAdapter`): parameters named with `nn.with_logical_partitioning(init,
  names)` (or `nn.with_partitioning` with mesh axis names), or unannotated and named by the
  `sharding.param_rules` path patterns; other collections (batch statistics) are carried in the
  train state;
* an NNX module (`NnxAdapter`): logical names from the variables' sharding metadata
  (`nnx.with_partitioning`), or path patterns; `nnx.BatchStat` and other non-parameter state
  carried like Linen's collections.

The model is called with the task's inputs by keyword: an argument named (after dropping a shape
suffix such as ``_BT``) inputs / tokens / input_ids / images / x receives the inputs, positions /
position_ids the positions, segment_ids the document ids, and deterministic / train / training the
train switch (see `adapter.ROLE_NAMES`; `call_args=` overrides the matching). Activations may be
constrained with `jaxscale.core.sharding.constrain` (or `nn.with_logical_constraint`) by logical
names. With `nn.scan`, pass ``metadata_params={nn.PARTITION_NAME: "layers"}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jaxscale.config import ConfigError, ModelConfig, register_model_config
from jaxscale.models.adapter import Applied, ModelAdapter, Stages, call_keywords
from jaxscale.models.decoder import Decoder
from jaxscale.models.linen import LinenAdapter
from jaxscale.models.resnet import ResNet
from jaxscale.validation import did_you_mean


def _decoder_nnx(cfg: ModelConfig):
    from jaxscale.models.decoder_nnx import DecoderNnx

    return DecoderNnx.factory(cfg)


def _lazy(module: str, name: str) -> Callable[[Any], Any]:
    """A factory that imports `module` when the model is first built."""

    def factory(cfg: Any) -> Any:
        return getattr(importlib.import_module(module), name)(cfg)

    factory.__qualname__ = f"{module}.{name}"
    return factory


# model.name -> factory(model config) -> a Linen module, an NNX module factory or an adapter.
# The image models' sections are jaxscale.vision_config.SECTIONS and jaxscale.zoo_config.SECTIONS,
# keyed by the same names.
MODELS: dict[str, Callable[[Any], Any]] = {
    "decoder": Decoder,
    "decoder_nnx": _decoder_nnx,
    "resnet": ResNet,
    "vit": _lazy("jaxscale.models.vit", "ViT"),
    "vgg": _lazy("jaxscale.models.vgg", "VGG"),
    "googlenet": _lazy("jaxscale.models.googlenet", "GoogLeNet"),
    "densenet": _lazy("jaxscale.models.densenet", "DenseNet"),
    "efficientnet": _lazy("jaxscale.models.efficientnet", "EfficientNet"),
    "regnet": _lazy("jaxscale.models.regnet", "RegNet"),
}


def register(name: str, factory: Callable[[Any], Any], config_type: type = ModelConfig) -> None:
    """Make `model.name=<name>` build `factory(model_config)`.

    Args:
      factory: model config -> a Linen module, an NNX module (or a function ``rngs -> module``,
        see `NnxAdapter`), or a ModelAdapter.
      config_type: the dataclass of the model's config section (needs a `name` field).
    """
    MODELS[name] = factory
    register_model_config(name, config_type)


def build_model(cfg: Any) -> Any:
    """The model `cfg.name` names, as its factory returns it (e.g. a Linen module)."""
    if cfg.name not in MODELS:
        raise ConfigError(
            f"model.name={cfg.name!r} is not a registered model; choose one of: "
            f"{', '.join(MODELS)} (or register one with jaxscale.models.register)"
            + did_you_mean(cfg.name, list(MODELS))
        )
    return MODELS[cfg.name](cfg)


def adapt(model: Any, *, config: Any = None, **kwargs: Any) -> ModelAdapter:
    """The adapter for `model`: a ModelAdapter as it is, a Linen module in a `LinenAdapter`, an
    NNX module (or ``rngs -> module`` factory) in an `NnxAdapter`.

    Args:
      config: the model's config dataclass, if any (task FLOPs formulas read it).
      kwargs: passed to the adapter (e.g. ``call_args={"inputs": "input_ids"}``).
    """
    if isinstance(model, nn.Module):
        return LinenAdapter(model, config=config, **kwargs)
    if isinstance(model, ModelAdapter):
        return model
    from jaxscale.models.nnx import NnxAdapter, is_nnx

    if is_nnx(model):
        return NnxAdapter(model, config=config, **kwargs)
    raise TypeError(
        f"{type(model).__name__} is neither a Flax Linen module, an NNX module (or a function "
        "rngs -> NNX module) nor a jaxscale ModelAdapter"
    )


__all__ = ["MODELS", "Applied", "Decoder", "LinenAdapter", "ModelAdapter", "ResNet", "Stages",
           "adapt", "build_model", "call_keywords", "register"]
