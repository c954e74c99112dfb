"""The classification task: a label for each input, softmax cross-entropy and accuracy.

A batch holds two fields:
  images  [B, ...] float32 examples: images [B, H, W, C], or feature vectors [B, F]
  labels  [B] int32 class ids; a negative label is ignored (padding rows)
and, with mixup (`data.mixup` > 0), two more: `mix_labels` [B] int32 (the label of the image
mixed in) and `mix_weight` [B] float32 (the weight of `labels`; evaluation batches carry 1).
The model is called with the images as its inputs role (and the train switch) and returns
logits_BC.

Training FLOPs per example come from the model's forward multiply-accumulates (`FORWARD_MACS`:
ViT and ResNet) as 2 FLOPs per MAC, three times over (forward, and backward for activations and
weights); other models use XLA's count of the compiled step (docs/metrics.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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


TOP_K = 5  # top-k accuracy is reported (as `top5_accuracy`) when there are at least 10 classes


def classify_loss(logits_BC: jax.Array, labels_B: jax.Array, *, label_smoothing: float = 0.0,
                  mix_labels_B: jax.Array | None = None,
                  mix_weight_B: jax.Array | None = None) -> LossOutput:
    """Softmax cross-entropy (float32) summed over the counted examples, and the number correct.

    The objective's target is the label smoothed towards uniform, ``(1 - s) * onehot + s / C``;
    with mixup it is ``w * target(labels) + (1 - w) * target(mix_labels)``. The reported `loss`
    is the cross-entropy against the (mixed) labels without smoothing, so evaluation losses of
    runs with different smoothing compare. Accuracy counts `labels` only.
    """
    logits_BC = logits_BC.astype(jnp.float32)
    C = logits_BC.shape[-1]
    weight_B = (labels_B >= 0).astype(jnp.float32)
    labels_B = jnp.maximum(labels_B, 0)
    lse_B = jax.nn.logsumexp(logits_BC, axis=-1)
    # A one-hot contraction, as in lm_loss, keeps the class dimension shardable.
    label_logit_B = jnp.einsum("bc,bc->b", logits_BC, jax.nn.one_hot(labels_B, C))
    ce_B = lse_B - label_logit_B
    if mix_labels_B is not None:
        mix_logit_B = jnp.einsum("bc,bc->b", logits_BC, jax.nn.one_hot(mix_labels_B, C))
        ce_B = mix_weight_B * ce_B + (1.0 - mix_weight_B) * (lse_B - mix_logit_B)
    # Smoothing mixes in the cross-entropy against the uniform target: lse - mean(logits).
    objective_B = (1.0 - label_smoothing) * ce_B + label_smoothing * (
        lse_B - jnp.mean(logits_BC, axis=-1))
    sums = {"loss": jnp.sum(ce_B * weight_B),
            "accuracy": jnp.sum((jnp.argmax(logits_BC, axis=-1) == labels_B) * weight_B)}
    if C >= 2 * TOP_K:
        # The label is in the top k when fewer than k classes score above it (ties count for).
        rank_B = jnp.sum(logits_BC > label_logit_B[:, None], axis=-1)
        sums[f"top{TOP_K}_accuracy"] = jnp.sum((rank_B < TOP_K) * weight_B)
    return LossOutput(objective=jnp.sum(objective_B * weight_B), weight=jnp.sum(weight_B),
                      sums=sums)


def _vit_macs(model_cfg: Any, input_shape: tuple[int, ...]) -> float:
    from jaxscale.models.vit import forward_macs

    return forward_macs(model_cfg, input_shape)


def _resnet_macs(model_cfg: Any, input_shape: tuple[int, ...]) -> float:
    from jaxscale.models.resnet import forward_macs

    return forward_macs(model_cfg, input_shape)


# model config section name -> fn(model config, example shape) -> forward MACs per example
FORWARD_MACS: dict[str, Callable[[Any, tuple[int, ...]], float]] = {
    "ViTConfig": _vit_macs,
    "ResNetConfig": _resnet_macs,
}


@dataclasses.dataclass(frozen=True)
class Classify:
    """Softmax classification of `input_shape` examples into `num_classes` labels."""

    input_shape: tuple[int, ...]  # one example's shape, e.g. (H, W, C)
    num_classes: int
    label_smoothing: float = 0.0  # weight of the uniform target in the objective
    mixup: bool = False  # batches carry mix_labels and mix_weight
    name: str = "classify"
    unit: str = "examples"

    def batch_spec(self, batch_size: int) -> dict[str, Field]:
        rank = len(self.input_shape)
        axes = INPUT_AXES.get(rank, (None,) * rank)
        spec = {
            "images": Field((batch_size, *self.input_shape), np.float32, ("batch", *axes)),
            "labels": Field((batch_size,), np.int32, ("batch",)),
        }
        if self.mixup:
            spec["mix_labels"] = Field((batch_size,), np.int32, ("batch",))
            spec["mix_weight"] = Field((batch_size,), np.float32, ("batch",))
        return spec

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"inputs": batch["images"]}

    def loss(self, outputs: Any, batch: Batch) -> LossOutput:
        return classify_loss(outputs, batch["labels"], label_smoothing=self.label_smoothing,
                             mix_labels_B=batch.get("mix_labels"),
                             mix_weight_B=batch.get("mix_weight"))

    def units_per_example(self) -> int:
        return 1

    def flops_per_example(self, model_cfg: Any) -> float | None:
        """6 x the forward MACs of a model in `FORWARD_MACS`; None for any other model (the
        compiled step's cost analysis counts them)."""
        macs = FORWARD_MACS.get(type(model_cfg).__name__)
        return None if macs is None else 6.0 * macs(model_cfg, self.input_shape)

    def pipelines(self, cfg: Any, shardings: dict[str, Any]):
        """The training and held-out pipelines of `cfg.data.source` (`jaxscale.data.images`)."""
        from jaxscale.data import images

        return images.pipelines(cfg, self.input_shape, self.num_classes, shardings)


def from_config(cfg: Any) -> Classify:
    from jaxscale.vision_config import scaled_input_shape

    return Classify(input_shape=scaled_input_shape(cfg.model, tuple(cfg.task.input_shape)),
                    num_classes=cfg.task.num_classes,
                    label_smoothing=cfg.task.label_smoothing, mixup=cfg.data.mixup > 0)
