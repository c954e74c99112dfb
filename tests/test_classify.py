"""The classify task with a BatchNorm model: batch statistics updated inside the step equal one
device's on fsdp=8, the loop trains it, and a resumed run is bitwise equal to a straight one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import build_on, train_steps

from jaxscale import config as config_lib
from jaxscale.analysis.metrics import read_jsonl
from jaxscale.run.loop import train
from jaxscale.tasks.classify import Classify, classify_loss

BASE = ["task.name=classify", "task.num_classes=4", "task.input_shape=[8,8,1]", "batch_size=16",
        "data.source=synthetic",
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=0",
        "optim.clip_norm=0", "optim.warmup_steps=0", "optim.schedule=constant", "progress=false",
        "eval_batches=2", "log_every=1"]


class BatchNormMlp(nn.Module):
    """Flatten -> Dense -> BatchNorm -> relu -> Dense, sharded by parameter-path rules."""

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = images.reshape(images.shape[0], -1)
        x = nn.Dense(32, name="hidden")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(4, name="out")(nn.relu(x))


RULES = 'sharding.param_rules=[["hidden/kernel", ["embed", "mlp"]], ["out/kernel", ["mlp", null]]]'


def _run(mesh_overrides, devices=None):
    return build_on([*BASE, RULES, *mesh_overrides], devices, BatchNormMlp())


def test_classify_loss_by_hand():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    out = classify_loss(logits, jnp.array([0, 0, -1]))
    lse = np.log(np.exp(2.0) + 1.0), np.log(1.0 + np.e)
    np.testing.assert_allclose(float(out.objective), (lse[0] - 2.0) + lse[1], rtol=1e-6)
    assert float(out.weight) == 2.0 and float(out.sums["accuracy"]) == 1.0


def _ce(logits, target):
    """Cross-entropy of float64 logits against a target distribution, written out."""
    logits = np.asarray(logits, np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -(target * log_p).sum(-1)


def test_label_smoothing_and_mixup_by_hand():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5))
    labels, partners = np.array([0, 3, 1, -1]), np.array([2, 3, 4, 0])
    w = np.array([0.7, 0.2, 1.0, 0.5])
    onehot, partner_onehot = np.eye(5)[np.maximum(labels, 0)], np.eye(5)[partners]
    s = 0.1
    target = (1 - s) * (w[:, None] * onehot + (1 - w[:, None]) * partner_onehot) + s / 5
    out = classify_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                        label_smoothing=s, mix_labels_B=jnp.asarray(partners),
                        mix_weight_B=jnp.asarray(w, jnp.float32))
    counted = labels >= 0
    np.testing.assert_allclose(float(out.objective), _ce(logits, target)[counted].sum(),
                               rtol=1e-5)
    # The reported loss is against the mixed labels, without smoothing.
    mixed = w[:, None] * onehot + (1 - w[:, None]) * partner_onehot
    np.testing.assert_allclose(float(out.sums["loss"]), _ce(logits, mixed)[counted].sum(),
                               rtol=1e-5)
    assert "top5_accuracy" not in out.sums  # fewer than 10 classes


def test_top5_accuracy_counts_the_label_among_the_five_best():
    logits = jnp.tile(jnp.arange(10.0)[None], (3, 1))  # class 9 scores best, 0 worst
    out = classify_loss(logits, jnp.array([9, 5, 4]))
    # ranks 0, 4 and 5: the first two are in the top five.
    assert float(out.sums["top5_accuracy"]) == 2.0 and float(out.sums["accuracy"]) == 1.0


def test_image_batch_spec_names_every_dimension():
    spec = Classify(input_shape=(8, 8, 1), num_classes=4).batch_spec(16)
    assert spec["images"].shape == (16, 8, 8, 1)
    assert spec["images"].logical == ("batch", "height", "width", "channels")
    assert spec["labels"].shape == (16,) and spec["labels"].logical == ("batch",)


def test_batch_statistics_on_fsdp8_equal_one_device():
    one, one_losses = train_steps(_run(["mesh.fsdp=1"], devices=jax.devices()[:1]))
    run8 = _run(["mesh.fsdp=8"])
    eight, eight_losses = train_steps(run8)
    assert "fsdp" in str(run8.shardings.params["hidden"]["kernel"].spec)
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    stats1, stats8 = jax.device_get(one.extra["batch_stats"]), jax.device_get(
        eight.extra["batch_stats"])
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats8["bn"][name], stats1["bn"][name], rtol=1e-5, atol=1e-7)
    # The statistics moved: the step really updated them (momentum 0.9 from mean 0 / var 1).
    assert float(np.abs(stats1["bn"]["mean"]).max()) > 1e-3


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    cfg = config_lib.load("tiny", [*BASE, RULES, "mesh.fsdp=8", "steps=12", "eval_every=6",
                                   "checkpoint.every=6", f"workdir={workdir}"])
    return jax.device_get(train(cfg, model=BatchNormMlp())), workdir


def test_the_loop_trains_and_logs_examples(straight):
    _, workdir = straight
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(r["examples_per_sec"] > 0 for r in records)
    assert "eval_accuracy" in records[5] and 0.0 <= records[5]["eval_accuracy"] <= 1.0
    assert records[11]["eval_loss"] < records[5]["eval_loss"]
    assert np.mean([r["loss"] for r in records[-3:]]) < np.mean([r["loss"] for r in records[:3]])


def test_resume_is_bitwise_equal(straight, tmp_path):
    final, _ = straight
    common = [*BASE, RULES, "mesh.fsdp=8", "eval_every=6", "checkpoint.every=6",
              f"workdir={tmp_path}"]
    train(config_lib.load("tiny", [*common, "steps=6"]), model=BatchNormMlp())
    resumed = jax.device_get(train(config_lib.load("tiny", [*common, "steps=12"]),
                                   model=BatchNormMlp()))
    assert int(resumed.step) == 12
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(final),
                    strict=True):
        np.testing.assert_array_equal(a, b)
