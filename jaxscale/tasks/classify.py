"""The classification task: a label for each input, softmax cross-entropy and accuracy.

A batch holds two fields:
  images  [B, ...] float32 examples: images [B, H, W, C], or feature vectors [B, F]
  labels  [B] int32 class ids; a negative label is ignored (padding rows)
The model is called with the images as its inputs role (and the train switch) and returns
logits_BC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.core.step import Batch, LossOutput
from jaxscale.tasks.base import Field

# Logical names of an example's dimensions by rank: images are [H, W, C]; other ranks go unnamed.
INPUT_AXES: dict[int, tuple[str | None, ...]] = {
    1: ("features",),
    3: ("height", "width", "channels"),
}


def classify_loss(logits_BC: jax.Array, labels_B: jax.Array) -> LossOutput:
    """Cross-entropy (float32) summed over the counted examples, and the number correct."""
    logits_BC = logits_BC.astype(jnp.float32)
    weight_B = (labels_B >= 0).astype(jnp.float32)
    labels_B = jnp.maximum(labels_B, 0)
    lse_B = jax.nn.logsumexp(logits_BC, axis=-1)
    # A one-hot contraction, as in lm_loss, keeps the class dimension shardable.
    label_logit_B = jnp.einsum("bc,bc->b", logits_BC, jax.nn.one_hot(labels_B, logits_BC.shape[-1]))
    ce_sum = jnp.sum((lse_B - label_logit_B) * weight_B)
    correct = jnp.sum((jnp.argmax(logits_BC, axis=-1) == labels_B) * weight_B)
    return LossOutput(objective=ce_sum, weight=jnp.sum(weight_B),
                      sums={"loss": ce_sum, "accuracy": correct})


@dataclasses.dataclass(frozen=True)
class Classify:
    """Softmax classification of `input_shape` examples into `num_classes` labels."""

    input_shape: tuple[int, ...]  # one example's shape, e.g. (H, W, C)
    num_classes: int
    name: str = "classify"
    unit: str = "examples"

    def batch_spec(self, batch_size: int) -> dict[str, Field]:
        rank = len(self.input_shape)
        axes = INPUT_AXES.get(rank, (None,) * rank)
        return {
            "images": Field((batch_size, *self.input_shape), np.float32, ("batch", *axes)),
            "labels": Field((batch_size,), np.int32, ("batch",)),
        }

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"inputs": batch["images"]}

    def loss(self, outputs: Any, batch: Batch) -> LossOutput:
        return classify_loss(outputs, batch["labels"])

    def units_per_example(self) -> int:
        return 1

    def flops_per_example(self, model_cfg: Any) -> float | None:
        return None  # no formula: the compiled step's cost analysis counts them

    def pipelines(self, cfg: Any, shardings: dict[str, Any]):
        """Synthetic labelled examples (`jaxscale.data.sources.SyntheticClasses`)."""
        from jaxscale.data import EVAL_SEED
        from jaxscale.data.pipeline import DataPipeline
        from jaxscale.data.sources import SyntheticClasses

        common = dict(global_batch=cfg.batch_size, sharding=shardings,
                      num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch)
        source = dict(input_shape=self.input_shape, num_classes=self.num_classes)
        return (
            DataPipeline(SyntheticClasses(**source, seed=cfg.seed), seed=cfg.seed,
                         shuffle=cfg.data.shuffle, **common),
            DataPipeline(SyntheticClasses(**source, seed=cfg.seed, split=1), seed=EVAL_SEED,
                         shuffle=True, **common),
        )


def from_config(cfg: Any) -> Classify:
    return Classify(input_shape=tuple(cfg.task.input_shape), num_classes=cfg.task.num_classes)
