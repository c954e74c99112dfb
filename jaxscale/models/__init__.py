"""Models that follow the jaxscale model interface, and a registry to build them by name.

The interface (any Flax linen module that meets it trains with jaxscale):

    logits_BTV = model.apply(
        {"params": params}, tokens_BT, positions_BT=None, segment_ids_BT=None,
        deterministic=True, rngs={"dropout": key},
    )

* parameters are created with `nn.with_logical_partitioning(init, names)`, one logical name (or
  None) per dimension; with `nn.scan`, pass `metadata_params={nn.PARTITION_NAME: "layers"}`;
* activations may be constrained with `jaxscale.core.sharding.constrain` (or Flax's
  `nn.with_logical_constraint`) by logical names;
* `positions_BT` restart at 0 at each packed document, and `segment_ids_BT` (when given) must keep
  attention within a document; dropout draws from the "dropout" RNG stream.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from jaxscale.config import ConfigError, ModelConfig
from jaxscale.models.decoder import Decoder

MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "decoder": Decoder,
}


def register(name: str, factory: Callable[[ModelConfig], nn.Module]) -> None:
    """Make `model.name=<name>` build `factory(model_config)`."""
    MODELS[name] = factory


def build_model(cfg: ModelConfig) -> nn.Module:
    """The Flax module for `cfg.name`."""
    if cfg.name not in MODELS:
        raise ConfigError(
            f"model.name={cfg.name!r} is not a registered model; choose one of: "
            f"{', '.join(MODELS)} (or register one with jaxscale.models.register)"
        )
    return MODELS[cfg.name](cfg)


__all__ = ["MODELS", "Decoder", "build_model", "register"]
