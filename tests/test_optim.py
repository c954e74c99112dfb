"""jaxscale.core.optim: every optimizer descends, schedules hit their values, clipping, the weight
decay mask, moment dtypes and the errors for unknown names."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from util import tiny_model_config

from jaxscale import config
from jaxscale.config import ConfigError, OptimConfig
from jaxscale.core.optim import OPTIMIZERS, SCHEDULES, decay_mask, make_optimizer, make_schedule
from jaxscale.core.trees import path_str
from jaxscale.models import build_model

# (name, settings): every optimizer, sgd both with momentum and plain.
OPTIMIZER_CASES = {
    "adamw": dict(name="adamw", lr=1e-2),
    "lion": dict(name="lion", lr=1e-3),
    "adafactor": dict(name="adafactor", lr=1e-2),
    "sgd_momentum": dict(name="sgd", lr=0.1, momentum=0.9),
    "sgd_plain": dict(name="sgd", lr=0.3, momentum=0.0),
}


def _cfg(**kwargs) -> OptimConfig:
    return OptimConfig(**{"schedule": "constant", "warmup_steps": 0, **kwargs})


def test_tables_match_config_choices():
    assert tuple(OPTIMIZERS) == config.OPTIMIZERS
    assert tuple(SCHEDULES) == config.SCHEDULES


# --------------------------------------------------------------------------------------------
# A tiny problem: scaled linear regression, with parameter names the decay mask knows.

_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(64, 128)), jnp.float32)
Y = X @ jnp.asarray(_rng.normal(size=(128, 160)) / np.sqrt(128), jnp.float32)
# The kernel is 128 x 160, so adafactor factors its second moment.
PARAMS = {
    "dense": {"kernel": jnp.asarray(_rng.normal(size=(128, 160)) * 0.02, jnp.float32),
              "bias": jnp.zeros(160)},
    "norm": {"scale": jnp.ones(160)},
}


def _regression_loss(p):
    return jnp.mean(((X @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["norm"]["scale"] - Y) ** 2)


def _train(tx, steps=30):
    @jax.jit
    def run(params):
        def body(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(_regression_loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
        return jnp.append(losses, _regression_loss(params))

    return np.asarray(run(PARAMS))


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_optimizer_decreases_loss(case):
    losses = _train(make_optimizer(_cfg(**OPTIMIZER_CASES[case]), total_steps=30))
    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses[0], 1.0400, rtol=1e-3)  # same start for all
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.mean(losses[-5:]) < np.mean(losses[5:10]) < np.mean(losses[:5])


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_decoupled_weight_decay_scales_with_lr(case):
    """With zero gradients, the first step multiplies decayed parameters by (1 - lr * wd) and
    leaves the excluded ones (bias, scale) alone, for every optimizer."""
    cfg = _cfg(**OPTIMIZER_CASES[case], weight_decay=0.1)
    tx = make_optimizer(cfg, total_steps=30)
    params = jax.tree_util.tree_map(lambda x: x + 0.5, PARAMS)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"],
                               params["dense"]["kernel"] * (1 - cfg.lr * 0.1), rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
    np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])


# --------------------------------------------------------------------------------------------
# Schedules: lr=1, 10 warmup steps, 100 decay steps, end at 0.1.

SCHEDULE_CFG = dict(lr=1.0, warmup_steps=10, decay_steps=100, end_lr_ratio=0.1)
# step: 0 warmup start, 5 mid-warmup, 10 warmup end, 60 middle of the decay, 100, 110 end, 200.
STEPS = (0, 5, 10, 60, 100, 110, 200)
EXPECTED = {
    "constant": (0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0),
    # 0.1 + 0.9 * (1 + cos(pi * t / 100)) / 2 for t = step - 10.
    "cosine": (0.0, 0.5, 1.0, 0.55, 0.1 + 0.45 * (1 + math.cos(0.9 * math.pi)), 0.1, 0.1),
    "linear": (0.0, 0.5, 1.0, 0.55, 0.19, 0.1, 0.1),
    # Stable for 80 steps after warmup, then linear to 0.1 over the last 20 (wsd_decay_fraction).
    "wsd": (0.0, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_values(name):
    schedule = make_schedule(OptimConfig(schedule=name, **SCHEDULE_CFG))
    values = [float(schedule(step)) for step in STEPS]
    np.testing.assert_allclose(values, EXPECTED[name], rtol=1e-6, atol=1e-7)


def test_schedule_spans_the_rest_of_the_run_when_decay_steps_is_zero():
    cfg = OptimConfig(schedule="linear", lr=1.0, warmup_steps=10, decay_steps=0, end_lr_ratio=0.0)
    schedule = make_schedule(cfg, total_steps=50)  # 40 decay steps after warmup
    np.testing.assert_allclose([float(schedule(s)) for s in (10, 30, 50)], [1.0, 0.5, 0.0],
                               atol=1e-7)
    msg = "optim.decay_steps=0 needs the run's total steps to size the schedule"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        make_schedule(cfg)


def test_no_warmup_starts_at_peak():
    schedule = make_schedule(OptimConfig(schedule="cosine", warmup_steps=0, **{
        k: v for k, v in SCHEDULE_CFG.items() if k != "warmup_steps"}))
    np.testing.assert_allclose([float(schedule(0)), float(schedule(50))], [1.0, 0.55], rtol=1e-6)


def test_optimizer_follows_the_schedule():
    """sgd's step size is the scheduled lr: with a unit gradient the update is -lr(step)."""
    tx = make_optimizer(_cfg(name="sgd", momentum=0.0, weight_decay=0.0, clip_norm=0.0,
                             **{**SCHEDULE_CFG, "lr": 2.0}, schedule="linear"))
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    lrs = []
    for _ in range(12):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    np.testing.assert_allclose(lrs, [0.2 * i for i in range(11)] + [2.0 - 1.8 / 100], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Clipping.


@pytest.mark.parametrize("scale, clipped", [(10.0, True), (0.2, False)])
def test_clip_by_global_norm(scale, clipped):
    tx = make_optimizer(_cfg(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, clip_norm=0.5),
                        total_steps=10)
    rng = np.random.default_rng(1)
    grads = {"a": jnp.asarray(rng.normal(size=(4, 3))), "b": {"c": jnp.asarray(rng.normal(size=5))}}
    grads = jax.tree_util.tree_map(lambda g: g * scale / optax.tree.norm(grads), grads)
    params = jax.tree_util.tree_map(jnp.zeros_like, grads)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = float(optax.tree.norm(updates))
    assert norm <= 0.5 * (1 + 1e-6) if clipped else True
    np.testing.assert_allclose(norm, 0.5 if clipped else scale, rtol=1e-6)
    # Clipping rescales, it does not change the direction.
    ratio = 0.5 / scale if clipped else 1.0
    for u, g in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(grads),
                    strict=True):
        np.testing.assert_allclose(-u, g * ratio, rtol=1e-6)


def test_clip_norm_zero_disables_clipping():
    tx = make_optimizer(_cfg(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, clip_norm=0.0),
                        total_steps=10)
    grads = {"w": jnp.full((4,), 50.0)}
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(updates["w"], -50.0)


# --------------------------------------------------------------------------------------------
# The weight decay mask on the real models' parameters.


def _mask_by_path(**model_overrides) -> dict[str, bool]:
    model = build_model(tiny_model_config(**model_overrides))
    tokens = jnp.zeros((1, 8), jnp.int32)
    import flax.linen as nn

    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    mask = decay_mask(OptimConfig().weight_decay_exclude)(params)
    flat, _ = jax.tree_util.tree_flatten_with_path(mask)
    return {path_str(p): bool(m) for p, m in flat}


def test_decay_mask_llama_style():
    mask = _mask_by_path()
    decayed = {p for p, m in mask.items() if m}
    assert decayed == {
        "layers/attn/query/kernel", "layers/attn/key/kernel", "layers/attn/value/kernel",
        "layers/attn/out/kernel", "layers/mlp/wi_gate/kernel", "layers/mlp/wi_up/kernel",
        "layers/mlp/wo/kernel", "lm_head/kernel",
    }
    for path in ("embed/embedding", "final_norm/scale", "layers/attn_norm/scale",
                 "layers/mlp_norm/scale"):
        assert mask[path] is False


def test_decay_mask_gpt2_style():
    mask = _mask_by_path(norm="layernorm", position="learned", mlp="gelu", tie_embeddings=True,
                         use_bias=True)
    assert mask["layers/attn/query/kernel"] is True
    assert mask["layers/mlp/wo/kernel"] is True
    for path in ("embed/embedding", "pos_embed/embedding", "layers/attn/query/bias",
                 "layers/mlp/wo/bias", "layers/attn_norm/scale", "layers/attn_norm/bias",
                 "final_norm/bias", "final_norm/scale"):
        assert mask[path] is False, path
    assert "lm_head/kernel" not in mask  # tied
    assert sum(mask.values()) == 6  # q, k, v, out, wi_up, wo kernels


def test_decay_mask_custom_patterns():
    mask = decay_mask(("^dense/",))(PARAMS)
    assert mask == {"dense": {"kernel": False, "bias": False}, "norm": {"scale": True}}


# --------------------------------------------------------------------------------------------
# Moment dtypes.

FIRST_MOMENTS = ("mu", "trace", "ema")  # adamw/lion, sgd momentum, adafactor momentum


@pytest.mark.parametrize("case", ["adamw", "lion", "adafactor", "sgd_momentum"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_moment_dtype(case, dtype):
    tx = make_optimizer(_cfg(**OPTIMIZER_CASES[case], moment_dtype=dtype), total_steps=10)
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, PARAMS))
    dtypes = {}
    for path, leaf in flat:
        field = next((k.name for k in reversed(path) if hasattr(k, "name")), None)
        if leaf.ndim:
            dtypes.setdefault(field, set()).add(jnp.dtype(leaf.dtype).name)
    first = [f for f in dtypes if f in FIRST_MOMENTS]
    assert len(first) == 1, dtypes  # every optimizer here keeps one first moment
    assert dtypes[first[0]] == {dtype}
    # Second moments stay float32 (adamw's nu, adafactor's factored statistics).
    for field, kinds in dtypes.items():
        if field not in FIRST_MOMENTS:
            assert kinds == {"float32"}, (field, kinds)
    # bf16 moments halve the first moment's bytes.
    first_bytes = sum(x.size * x.dtype.itemsize for p, x in flat
                      if any(getattr(k, "name", None) == first[0] for k in p))
    n = sum(x.size for x in jax.tree_util.tree_leaves(PARAMS))
    assert first_bytes == n * (2 if dtype == "bfloat16" else 4)


# --------------------------------------------------------------------------------------------
# Unknown names.


def test_unknown_optimizer():
    msg = "optim.name='adam' is not valid; choose one of: adamw, lion, adafactor, sgd"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        make_optimizer(OptimConfig(name="adam"), total_steps=10)


def test_unknown_schedule():
    msg = "optim.schedule='cosin' is not valid; choose one of: constant, cosine, linear, wsd"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        make_optimizer(OptimConfig(schedule="cosin"), total_steps=10)
