"""The language-model task: next-token prediction over [B, T] token batches.

A batch holds five [B, T] int32 fields (the data pipelines produce them; `jaxscale.data`):
  inputs       token ids fed to the model
  targets      next-token ids; negative ids are ignored by the loss
  loss_mask    1 where a target counts and 0 where it does not
  positions    position of each token within its document (packing)
  segment_ids  document id of each token; attention stays within a document
The model is called with the roles inputs, positions and segment_ids and returns logits_BTV,
or (the built-in decoder under `loss.chunked`) `core.vocab.HeadInputs` for a loss that computes
the logits a chunk of positions at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.core.step import Batch, LossOutput
from jaxscale.core.vocab import HeadInputs, chunked_cross_entropy_sums, cross_entropy_sums
from jaxscale.tasks.base import Field

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
LOGICAL = ("batch", "length")


def token_weights(batch: Batch) -> jax.Array:
    """1.0 where a target counts: a non-negative target and a non-zero loss_mask (if any)."""
    weight_BT = (batch["targets"] >= 0).astype(jnp.float32)
    if "loss_mask" in batch:
        weight_BT = weight_BT * batch["loss_mask"].astype(jnp.float32)
    return weight_BT


def lm_loss(outputs: jax.Array | HeadInputs, batch: Batch, *, z_loss: float = 0.0,
            chunk: int = 256) -> LossOutput:
    """Next-token cross-entropy (float32) with masking and optional z-loss.

    `outputs` are the logits [B, T, V], or the decoder's `HeadInputs` (`loss.chunked`): then the
    logits are computed `chunk` positions at a time and never held whole (`core.vocab`).
    The z-loss, ``z_loss * logsumexp(logits)**2``, keeps the softmax normaliser near 1.
    The reported "loss" is the cross-entropy alone.
    """
    weight_BT = token_weights(batch)
    targets_BT = jnp.maximum(batch["targets"], 0)
    if isinstance(outputs, HeadInputs):
        objective, ce_sum, z_sum = chunked_cross_entropy_sums(outputs, targets_BT, weight_BT,
                                                              chunk, z_loss)
    else:
        ce_sum, z_sum = cross_entropy_sums(outputs, targets_BT, weight_BT)
        objective = ce_sum + z_loss * z_sum
    return LossOutput(
        objective=objective,
        weight=jnp.sum(weight_BT),
        sums={"loss": ce_sum, "z_loss": z_sum},
    )


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Next-token prediction with masking and an optional z-loss (see `lm_loss`)."""

    seq_len: int  # tokens per example
    z_loss: float = 0.0  # weight of the log(Z)^2 term
    chunk: int = 256  # positions per chunk when the model returns HeadInputs (loss.chunked)
    name: str = "lm"
    unit: str = "tokens"

    def batch_spec(self, batch_size: int) -> dict[str, Field]:
        return {k: Field((batch_size, self.seq_len), np.int32, LOGICAL) for k in FIELDS}

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"inputs": batch["inputs"], "positions": batch.get("positions"),
                "segment_ids": batch.get("segment_ids")}

    def loss(self, outputs: Any, batch: Batch) -> LossOutput:
        return lm_loss(outputs, batch, z_loss=self.z_loss, chunk=self.chunk)

    def units_per_example(self) -> int:
        return self.seq_len

    def flops_per_example(self, model_cfg: Any) -> float | None:
        """The decoder's count (`analysis.metrics.flops_per_token`, causal), for the built-in
        decoder's config; None for any other model."""
        from jaxscale.analysis.metrics import flops_per_token
        from jaxscale.config import ModelConfig

        if not isinstance(model_cfg, ModelConfig):
            return None
        return flops_per_token(model_cfg, self.seq_len).causal_per_token * self.seq_len

    def pipelines(self, cfg: Any, shardings: dict[str, Any]):
        """The training and held-out data pipelines of `cfg.data` (`jaxscale.data`)."""
        from jaxscale.data import make_pipelines

        return make_pipelines(cfg, shardings)


def from_config(cfg: Any) -> LanguageModel:
    return LanguageModel(seq_len=cfg.seq_len, z_loss=cfg.z_loss, chunk=cfg.loss.chunk)
