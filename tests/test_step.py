"""jaxscale.core.step: mesh equivalence, gradient accumulation, loss masking, per-step RNG, the
non-finite guard, and a third-party model through the builder.

The equivalence runs use SGD with momentum, not Adam: Adam's update is invariant to the scale of
the gradient, so it would hide a reduction that counts a gradient twice (or not at all on some
device), and it magnifies float32 rounding of near-zero gradients into parameter differences.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from util import random_batch, tiny_model_config

from jaxscale.config import MeshConfig, OptimConfig
from jaxscale.core import optim
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.core.step import (
    eval_sums_zero,
    finish_eval,
    jit_eval_step,
    jit_step,
)
from jaxscale.core.trees import path_str
from jaxscale.models import build_model
from jaxscale.run.build import init_state, make_eval_step, make_train_step
from jaxscale.tasks.lm import lm_loss

SEQ = 16
MODEL_CFG = tiny_model_config()  # fp32, num_heads=4, num_kv_heads=2: tensor=2 divides both
OPTIM_CFG = OptimConfig(
    name="sgd", lr=0.5, momentum=0.9, schedule="constant", warmup_steps=0, weight_decay=0.0,
    clip_norm=0.0,
)
MESHES = {
    "single": (MeshConfig(), "fsdp"),
    "dp8": (MeshConfig(data=8), "dp"),
    "fsdp8": (MeshConfig(fsdp=8), "fsdp"),
    "fsdp4_tp2": (MeshConfig(fsdp=4, tensor=2), "fsdp_tp"),
    "dp2_fsdp2_tp2": (MeshConfig(data=2, fsdp=2, tensor=2), "fsdp_tp"),
}
RNG = jax.random.key(7)


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _assert_trees_close(actual, desired, **tolerance):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_d, tree_d = jax.tree_util.tree_flatten_with_path(desired)
    assert tree_a == tree_d
    for (path, a), (_, d) in zip(flat_a, flat_d, strict=True):
        np.testing.assert_allclose(a, d, err_msg=path_str(path), **tolerance)


def _assert_trees_equal(actual, desired):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_d, tree_d = jax.tree_util.tree_flatten_with_path(desired)
    assert tree_a == tree_d
    for (path, a), (_, d) in zip(flat_a, flat_d, strict=True):
        np.testing.assert_array_equal(a, d, err_msg=path_str(path))


class Setup:
    """Model, optimizer, mesh, shardings and the initial state (on the host) of one mesh."""

    def __init__(self, mesh_name: str):
        mesh_cfg, rules = MESHES[mesh_name]
        devices = jax.devices()[:1] if mesh_name == "single" else None
        self.mesh = make_mesh(mesh_cfg, devices=devices)
        self.rules = shd.resolve_rules(rules)
        self.model = build_model(MODEL_CFG)
        self.tx = optim.make_optimizer(OPTIM_CFG, total_steps=100)
        state, self.shardings = init_state(
            self.model, self.tx, self.mesh, self.rules, seq_len=SEQ, seed=0
        )
        self.init = _host(state)
        self.batch_sharding = shd.batch_sharding(self.mesh, self.rules)

    def fresh_state(self):
        return jax.device_put(self.init, self.shardings)

    def step(self, *, donate=True, **kwargs):
        fn = make_train_step(self.model, self.tx, mesh=self.mesh, rules=self.rules, **kwargs)
        return jit_step(fn, self.shardings, self.batch_sharding, donate=donate)


@functools.cache
def setup(mesh_name: str) -> Setup:
    return Setup(mesh_name)


@functools.cache
def three_steps(mesh_name: str):
    """Losses, and parameters after the first and the third step, on one mesh."""
    s = setup(mesh_name)
    train_step = s.step()
    state = s.fresh_state()
    losses, params = [], []
    for i in range(3):
        state, metrics = train_step(state, random_batch(16, SEQ, seed=i), RNG)
        losses.append(float(metrics["loss"]))
        params.append(_host(state.params))
    assert int(state.step) == 3
    return np.array(losses), params[0], params[2]


# --------------------------------------------------------------------------------------------
# The same three steps on five meshes.


@pytest.mark.parametrize("mesh_name", [m for m in MESHES if m != "single"])
def test_same_init_on_every_mesh(mesh_name):
    _assert_trees_equal(setup(mesh_name).init, setup("single").init)


@pytest.mark.parametrize("mesh_name", [m for m in MESHES if m != "single"])
def test_same_losses_and_params_on_every_mesh(mesh_name):
    ref_losses, _, ref_params = three_steps("single")
    losses, _, params = three_steps(mesh_name)
    np.testing.assert_array_less(np.abs(losses - ref_losses) / ref_losses, 1e-5)
    _assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-6)


def test_training_moved_the_parameters():
    """The equivalence above is not vacuous: every parameter moved by >= 50x its tolerance."""
    init = setup("single").init.params
    losses, _, params = three_steps("single")
    assert np.all(np.isfinite(losses))
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        p0 = init
        for key in path:
            p0 = p0[key.key]
        assert np.max(np.abs(p - p0)) > 5e-5, path_str(path)


# --------------------------------------------------------------------------------------------
# Gradient accumulation; masking; z-loss.


def _scanned_inputs(eqn):
    """The inputs a scan equation slices (its xs, after the consts and the carry)."""
    params = eqn.params
    if "num_consts" in params:  # jax < 0.12: the counts of consts and carry
        return eqn.invars[params["num_consts"] + params["num_carry"]:]
    # jax >= 0.12: ft_in, a flat tree of (consts, carry, xs) over the invars
    _, _, xs = params["ft_in"].update(eqn.invars).unpack()
    return list(xs)


def _scans(jaxpr):
    """(length, shapes of the scanned inputs) of every scan in a jaxpr, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            xs = _scanned_inputs(eqn)
            yield eqn.params["length"], [tuple(v.aval.shape) for v in xs]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _scans(sub)


def _loops_over(step, args, shape):
    """Lengths of the scans in `step`'s program that slice an input of `shape` (e.g. the
    [microbatches, rows, SEQ] tokens); the layers' scan slices parameters, not the batch."""
    jaxpr = jax.make_jaxpr(step)(*args).jaxpr
    return [length for length, shapes in _scans(jaxpr) if shape in shapes]


def test_grad_accum_equals_one_big_step():
    """grad_accum=4 over a batch of 16 == one step on all 16 (microbatches of 4, 4 batch shards).

    Equal results alone would also pass if grad_accum were ignored, so the step's program must
    hold a scan of 4 iterations over [4, 4, SEQ] slices of the batch: 4 microbatches of 4 rows,
    which the step without accumulation does not have.
    """
    s = setup("fsdp4_tp2")
    batch = random_batch(16, SEQ, seed=0)
    accum_step = s.step(grad_accum=4)
    args = (s.fresh_state(), batch, RNG)
    assert _loops_over(accum_step, args, (4, 4, SEQ)) == [4]
    assert _loops_over(s.step(), args, (4, 4, SEQ)) == []
    state, metrics = accum_step(s.fresh_state(), batch, RNG)
    losses, params_1, _ = three_steps("fsdp4_tp2")
    np.testing.assert_allclose(float(metrics["loss"]), losses[0], rtol=1e-6)
    assert float(metrics["tokens"]) == 16 * SEQ
    _assert_trees_close(_host(state.params), params_1, rtol=1e-5, atol=1e-6)


def _masked_batch():
    batch = random_batch(8, SEQ, seed=3)
    batch["targets"][0, :5] = -1  # ignored targets
    batch["targets"][3, 10:] = -1
    loss_mask = np.ones((8, SEQ), np.float32)
    loss_mask[1, :] = 0.0  # a whole row masked out
    loss_mask[5, 2:9] = 0.0
    batch["loss_mask"] = loss_mask
    return batch


def _hand_objective(logits_BTV, batch):
    """(masked mean cross-entropy, mean logsumexp^2 over counted tokens), written out."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    counted_BT = (batch["targets"] >= 0) & (batch["loss_mask"] > 0)
    log_probs_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    targets_BT1 = jnp.maximum(batch["targets"], 0)[..., None]
    target_lp_BT = jnp.take_along_axis(log_probs_BTV, targets_BT1, axis=-1)[..., 0]
    n = jnp.sum(counted_BT)
    ce = -jnp.sum(jnp.where(counted_BT, target_lp_BT, 0.0)) / n
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    z = jnp.sum(jnp.where(counted_BT, lse_BT**2, 0.0)) / n
    return ce, z


Z = 1e-2


@functools.cache
def single_step_fn():
    """A non-donating step on one device with z-loss; batches carry a float loss_mask."""
    return setup("single").step(z_loss=Z, donate=False)


@functools.cache
def forward_with_hidden():
    """jit(params, inputs) -> (logits, final-norm output) of the setup's model."""
    model = setup("single").model

    @jax.jit
    def forward(params, inputs):
        logits, captured = model.apply(
            {"params": params}, inputs, capture_intermediates=True, mutable=["intermediates"]
        )
        return logits, captured["intermediates"]["final_norm"]["__call__"][0]

    return forward


def test_masked_targets_and_z_loss():
    s = setup("single")
    batch = _masked_batch()
    state = s.fresh_state()
    new_state, metrics = single_step_fn()(state, batch, RNG)

    logits, hidden_BTD = forward_with_hidden()(state.params, batch["inputs"])
    ce, z = _hand_objective(logits, batch)
    counted = int(np.sum((batch["targets"] >= 0) & (batch["loss_mask"] > 0)))
    assert counted == 8 * SEQ - 5 - 6 - SEQ - 7
    assert float(metrics["tokens"]) == counted
    np.testing.assert_allclose(float(metrics["loss"]), float(ce), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["z_loss"]), float(z), rtol=1e-6)
    # The masked tokens would change the mean: the mask is not vacuous.
    unmasked = {"targets": random_batch(8, SEQ, seed=3)["targets"],
                "loss_mask": np.ones((8, SEQ), np.float32)}
    assert abs(float(_hand_objective(logits, unmasked)[0]) - float(ce)) > 1e-3

    # The step descends ce + Z * mean(lse^2): its first (plain) SGD update of the output
    # projection is -lr * hidden^T @ d(objective)/d(logits).
    def objective(logits_BTV):
        ce, z = _hand_objective(logits_BTV, batch)
        return ce + Z * z

    dlogits_BTV = jax.grad(objective)(logits)
    grad_DV = np.einsum("btd,btv->dv", np.asarray(hidden_BTD), np.asarray(dlogits_BTV))
    before_DV = np.asarray(state.params["lm_head"]["kernel"])
    after_DV = np.asarray(new_state.params["lm_head"]["kernel"])
    stepped_DV = (before_DV - after_DV) / OPTIM_CFG.lr
    np.testing.assert_allclose(stepped_DV, grad_DV, rtol=1e-3, atol=1e-7)
    # Without the z term the update would be measurably different.
    dce_BTV = jax.grad(lambda lg: _hand_objective(lg, batch)[0])(logits)
    ce_only_DV = np.einsum("btd,btv->dv", np.asarray(hidden_BTD), np.asarray(dce_BTV))
    assert np.max(np.abs(ce_only_DV - stepped_DV)) > 100 * np.max(np.abs(stepped_DV - grad_DV))


def test_lm_loss_by_hand():
    """lm_loss on fixed logits: sums over counted tokens, z-term = z * sum(lse^2)."""
    logits = jnp.array([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0], [1.0, 1.0, 1.0]]])
    batch = {"targets": np.array([[2, -1, 0]]), "loss_mask": np.array([[1, 1, 0]])}
    out = lm_loss(logits, batch, z_loss=0.5)
    lse0 = np.log(np.exp(0.0) + np.exp(1.0) + np.exp(2.0))
    assert float(out.weight) == 1.0  # token 1 has target -1, token 2 has loss_mask 0
    np.testing.assert_allclose(float(out.sums["loss"]), lse0 - 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(out.sums["z_loss"]), lse0**2, rtol=1e-6)
    np.testing.assert_allclose(float(out.objective), lse0 - 2.0 + 0.5 * lse0**2, rtol=1e-6)


def test_eval_step_sums_over_batches():
    """Evaluation adds sums over batches; the mean is over all counted tokens of all batches."""
    s = setup("single")
    state = s.fresh_state()
    pure = make_eval_step(s.model, mesh=s.mesh, rules=s.rules)
    eval_step = jit_eval_step(pure, s.shardings, s.batch_sharding)
    first, second = _masked_batch(), random_batch(8, SEQ, seed=4)
    second["loss_mask"] = np.ones((8, SEQ), np.float32)
    sums = eval_sums_zero(pure, state, first)
    for batch in (first, second):
        sums = eval_step(state, batch, sums)
    means = finish_eval(sums)

    totals, count = 0.0, 0
    for batch in (first, second):
        logits, _ = forward_with_hidden()(state.params, batch["inputs"])
        n = int(np.sum((batch["targets"] >= 0) & (batch["loss_mask"] > 0)))
        totals += float(_hand_objective(logits, batch)[0]) * n
        count += n
    assert float(sums["weight"]) == count == 8 * SEQ - 5 - 6 - SEQ - 7 + 8 * SEQ
    np.testing.assert_allclose(means["loss"], totals / count, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Per-step RNG.


@functools.cache
def dropout_setup():
    s = setup("single")
    model = build_model(tiny_model_config(dropout=0.2))
    step = jit_step(
        make_train_step(model, s.tx, mesh=s.mesh, rules=s.rules),
        s.shardings, s.batch_sharding, donate=False,
    )
    return model, step


def test_step_folds_the_step_number_into_the_rng():
    s = setup("single")
    model, step = dropout_setup()
    batch = random_batch(16, SEQ, seed=5)
    state = s.fresh_state().replace(step=jnp.asarray(5, jnp.int32))
    new_a, metrics_a = step(state, batch, RNG)
    new_b, metrics_b = step(state, batch, RNG)
    # Re-running from the same state and rng is bitwise equal.
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    _assert_trees_equal(_host(new_a.params), _host(new_b.params))
    # The next step (same params, same base rng) draws different dropout masks.
    _, metrics_c = step(state.replace(step=jnp.asarray(6, jnp.int32)), batch, RNG)
    assert abs(float(metrics_c["loss"]) - float(metrics_a["loss"])) > 1e-4
    # ... exactly those of fold_in(rng, step).

    @jax.jit
    def dropout_loss(params, step):
        logits = model.apply(
            {"params": params}, batch["inputs"], deterministic=False,
            rngs={"dropout": jax.random.fold_in(RNG, step)},
        )
        out = lm_loss(logits, batch)
        return out.objective / out.weight

    np.testing.assert_allclose(float(dropout_loss(state.params, 5)), float(metrics_a["loss"]),
                               rtol=1e-6)
    np.testing.assert_allclose(float(dropout_loss(state.params, 6)), float(metrics_c["loss"]),
                               rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Non-finite guard.


def test_nonfinite_loss_skips_the_update():
    s = setup("single")
    step = single_step_fn()
    state, _ = step(s.fresh_state(), _masked_batch(), RNG)  # a real step: momentum is non-zero
    assert float(optax.tree.norm(state.opt_state)) > 0
    before = _host(state)

    poisoned = _masked_batch()
    poisoned["loss_mask"][2, 3] = np.nan  # makes the loss (and every gradient) NaN
    new_state, metrics = step(state, poisoned, RNG)

    assert not bool(metrics["finite"])
    assert np.isnan(float(metrics["loss"]))
    assert int(new_state.step) == 2
    assert int(new_state.skipped_steps) == 1 == int(metrics["skipped_steps"])
    _assert_trees_equal(_host(new_state.params), before.params)
    _assert_trees_equal(_host(new_state.opt_state), before.opt_state)

    # A finite step afterwards updates again and keeps the count.
    final, metrics = step(new_state, _masked_batch(), RNG)
    assert bool(metrics["finite"]) and int(final.skipped_steps) == 1 and int(final.step) == 3
    assert not np.array_equal(np.asarray(final.params["lm_head"]["kernel"]),
                              before.params["lm_head"]["kernel"])


def test_step_makes_no_hidden_transfers():
    """With state and batch on the devices, a step moves nothing between host and device."""
    s = setup("single")
    step = single_step_fn()
    state = s.fresh_state()
    batch = jax.device_put(_masked_batch(), s.batch_sharding)
    step(state, batch, RNG)  # compiled already by the tests above, or here
    with jax.transfer_guard("disallow"):
        for _ in range(2):
            state, metrics = step(state, batch, RNG)
    assert int(state.step) == 2 and bool(metrics["finite"])


# --------------------------------------------------------------------------------------------
# A model written elsewhere, following only the documented interface.


class RunningMeanLM(nn.Module):
    """Not a transformer: a causal running mean of embeddings, an MLP and a readout.

    It keeps a call counter in a "stats" collection to exercise non-parameter state.
    """

    vocab: int = 64
    width: int = 32
    hidden: int = 64

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, deterministic=True):
        def param(name, names, shape):
            init = nn.with_logical_partitioning(nn.initializers.normal(0.05), names)
            return self.param(name, init, shape)

        table_VD = param("table", ("vocab", "embed"), (self.vocab, self.width))
        w_in_DF = param("w_in", ("embed", "mlp"), (self.width, self.hidden))
        w_out_FV = param("w_out", ("mlp", "vocab"), (self.hidden, self.vocab))
        calls = self.variable("stats", "calls", lambda: jnp.zeros((), jnp.int32))
        if self.is_mutable_collection("stats"):
            calls.value += 1

        x_BTD = jnp.take(table_VD, tokens_BT, axis=0)
        T = tokens_BT.shape[1]
        x_BTD = jnp.cumsum(x_BTD, axis=1) / jnp.arange(1, T + 1, dtype=x_BTD.dtype)[:, None]
        x_BTD = shd.constrain(x_BTD, ("batch", "length", "act_embed"))
        h_BTF = nn.relu(jnp.einsum("btd,df->btf", x_BTD, w_in_DF))
        h_BTF = shd.constrain(h_BTF, ("batch", "length", "act_mlp"))
        return jnp.einsum("btf,fv->btv", h_BTF, w_out_FV)


def test_third_party_model_trains():
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    rules = shd.resolve_rules("fsdp_tp")
    model = RunningMeanLM()
    tx = optim.make_optimizer(
        OptimConfig(lr=3e-2, schedule="constant", warmup_steps=0), total_steps=100
    )
    state, shardings = init_state(model, tx, mesh, rules, seq_len=SEQ)
    # Sharded by its own logical names: 'vocab' is passed over in w_out, since 'mlp' holds tensor.
    assert state.params["w_in"].sharding.spec == jax.sharding.PartitionSpec(
        ("data", "fsdp"), "tensor"
    )
    assert state.params["w_out"].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    assert int(state.extra["stats"]["calls"]) == 1  # init called the model once

    step = jit_step(make_train_step(model, tx, mesh=mesh, rules=rules), shardings,
                    shd.batch_sharding(mesh, rules))
    batch = random_batch(16, SEQ, seed=11)
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch, RNG)
        losses.append(float(metrics["loss"]))
    # Starts at chance (ln 64 = 4.159) and learns the repeated batch.
    np.testing.assert_allclose(losses[0], np.log(64), atol=0.02)
    assert losses[-1] < losses[0] - 0.3
    assert np.all(np.diff(losses) < 0)
    assert int(state.extra["stats"]["calls"]) == 11
    assert int(state.step) == 10
