"""jaxscale.core.remat: every policy computes the same gradients, saves what it says, and errors."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from util import random_batch, tiny_model_config

from jaxscale import config
from jaxscale.config import ConfigError, MeshConfig, ModelConfig, OptimConfig
from jaxscale.core import remat
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.core.optim import make_optimizer
from jaxscale.core.state import TrainState
from jaxscale.core.step import jit_step
from jaxscale.core.trees import path_str
from jaxscale.models import build_model
from jaxscale.run.build import abstract_state, make_train_step
from jaxscale.tasks.lm import lm_loss

B, T = 8, 16
BATCH = random_batch(B, T, seed=0)
L = 2  # layers of tiny_model_config


def _cfg(policy: str, **overrides) -> ModelConfig:
    return tiny_model_config(remat=policy, **overrides)


def _loss_fn(cfg: ModelConfig):
    model = build_model(cfg)

    def loss(params):
        return lm_loss(model.apply({"params": params}, BATCH["inputs"]), BATCH).objective

    return loss


@functools.cache
def _params(scan_layers: bool):
    """Random parameters drawn on the host (no init compile); norm scales around 1. The unrolled
    model's layers_i are slice i of the scanned model's stacked layers."""
    model = build_model(_cfg("none"))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), BATCH["inputs"])["params"])
    rng = np.random.default_rng(0)

    def draw(path, x):
        noise = rng.normal(0.0, 0.1, x.shape).astype(x.dtype)
        return noise + 1 if path_str(path).endswith("scale") else noise

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    if not scan_layers:
        layers = params.pop("layers")
        for i in range(L):
            params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], layers)
    return params


@functools.cache
def _grads(policy: str, scan_layers: bool = True):
    loss = _loss_fn(_cfg(policy, scan_layers=scan_layers))
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(_params(scan_layers)))


def _residual_bytes(policy: str, **overrides) -> int:
    """Bytes the backward pass keeps from the forward (the leaves of the VJP closure)."""
    loss = _loss_fn(_cfg(policy, **overrides))
    params = _params(True)
    residuals = jax.tree_util.tree_leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
    return sum(x.size * x.dtype.itemsize for x in residuals)


def _assert_grads_close(actual, desired, rtol=1e-5, floor=0.0, **kwargs):
    """allclose, with an absolute floor at 1e-6 of the leaf's largest gradient: summed float32
    reductions in another order leave errors relative to the large terms, not the small ones."""
    desired = np.asarray(desired)
    atol = 1e-6 * float(np.abs(desired).max()) + floor
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, **kwargs)


def test_policy_table_matches_config_choices():
    assert tuple(remat.POLICIES) == config.REMAT_POLICIES


@pytest.mark.parametrize("policy", [p for p in remat.POLICIES if p != "none"])
def test_policy_gives_the_same_gradients(policy):
    loss, grads = _grads(policy)
    ref_loss, ref_grads = _grads("none")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        ref = ref_grads
        for key in path:
            ref = ref[key.key]
        _assert_grads_close(g, ref, err_msg=path_str(path))


def test_full_remat_gives_the_same_gradients_unrolled():
    """Unrolled layers are rematerialised with prevent_cse (scanned ones without)."""
    loss, grads = _grads("full", scan_layers=False)
    ref_loss, ref_grads = _grads("none")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for i in range(L):
        for g, ref in zip(jax.tree_util.tree_leaves(grads[f"layers_{i}"]),
                          jax.tree_util.tree_leaves(ref_grads["layers"]), strict=True):
            _assert_grads_close(g, ref[i])
    _assert_grads_close(grads["lm_head"]["kernel"], ref_grads["lm_head"]["kernel"])


def test_policies_save_what_they_say():
    """Residual bytes of the backward pass, per policy, against the tensors each one names."""
    N, K, H, F = 4, 2, 8, 64
    f32 = 4
    saved = {p: _residual_bytes(p) for p in remat.POLICIES}
    full = saved["full"]
    # Name-based policies add exactly the tensors they name, in every layer.
    assert saved["save_qkv_proj"] - full == L * B * T * (N + 2 * K) * H * f32
    assert saved["save_attn_out"] - full == L * B * T * N * H * f32
    assert saved["save_mlp"] - full == L * B * T * 2 * F * f32  # gate and up projections
    # Dot-based policies: all dots save more than the batch-free dots, which save more than
    # nothing; no remat keeps the most.
    assert saved["none"] > saved["save_dots"] > saved["minimal"] > full
    # Offloading keeps the same residuals as minimal, in host memory instead.
    assert saved["offload_dots"] == saved["minimal"]


@pytest.mark.parametrize("policy", list(remat.POLICIES))
def test_weight_matmuls_with_their_own_gradient_save_what_plain_matmuls_save(policy):
    """With model.weight_grad_dtype=float32 under bf16 compute every weight's matmul is a custom
    VJP (`core.dtypes.weight_grad_dot`), in which no dot-based policy sees a dot_general; named
    WEIGHT_DOT, they are saved as the plain matmuls are: the same residual bytes per policy
    (unnamed, `minimal` kept what `full` keeps, 221,444 bytes against 336,132)."""
    plain = _residual_bytes(policy, dtype="bfloat16")
    custom = _residual_bytes(policy, dtype="bfloat16", weight_grad_dtype="float32")
    assert custom == plain


def test_offload_dots_moves_residuals_to_host():
    loss = _loss_fn(_cfg("offload_dots"))
    params = _params(True)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    # q, k, v, gate and up projections of the scanned layer go to host memory (and back).
    assert jaxpr.count("MemorySpace.Host") >= 5
    jaxpr = str(jax.make_jaxpr(jax.grad(_loss_fn(_cfg("minimal"))))(params))
    assert jaxpr.count("MemorySpace.Host") == 0


def test_offload_dots_in_the_sharded_train_step():
    """This CPU backend has pinned_host memory, so offload_dots compiles and trains on fsdp=8."""
    assert "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}
    mesh = make_mesh(MeshConfig(fsdp=8))
    rules = shd.resolve_rules("fsdp")
    sgd = OptimConfig(name="sgd", lr=1.0, momentum=0.0, schedule="constant", warmup_steps=0,
                      weight_decay=0.0, clip_norm=0.0)
    tx = make_optimizer(sgd, total_steps=10)
    model = build_model(_cfg("offload_dots"))
    shardings = shd.state_shardings(abstract_state(model, tx, seq_len=T), mesh, rules)
    params0 = _params(True)
    state = TrainState(step=np.int32(0), params=params0, opt_state=tx.init(params0), extra={},
                       skipped_steps=np.int32(0))
    state = jax.device_put(state, shardings)
    step = jit_step(make_train_step(model, tx, mesh=mesh, rules=rules), shardings,
                    shd.batch_sharding(mesh, rules))
    state, metrics = step(state, BATCH, jax.random.key(0))

    # Plain SGD with lr=1: the update is minus the gradient of the mean loss, which must equal
    # the gradient without remat (of the summed loss, over B * T tokens).
    ref_loss, ref_grads = _grads("none")
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss / (B * T), rtol=1e-6)
    params1 = jax.device_get(state.params)
    for p0, p1, ref in zip(jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(params1),
                           jax.tree_util.tree_leaves(ref_grads), strict=True):
        # p0 - p1 loses float32 precision relative to |p|, not to the gradient.
        floor = 2 * np.finfo(np.float32).eps * float(np.abs(p0).max())
        _assert_grads_close(p0 - p1, ref / (B * T), rtol=1e-4, floor=floor)


def test_unknown_policy():
    msg = ("model.remat='minimall' is not valid; choose one of: none, full, minimal, save_dots, "
           "save_qkv_proj, save_attn_out, save_mlp, offload_dots (did you mean 'minimal'?)")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        remat.get_policy("minimall")
    # The model raises it when traced.
    with pytest.raises(ConfigError, match="model.remat='minimall' is not valid"):
        jax.eval_shape(build_model(_cfg("minimall")).init, jax.random.key(0), BATCH["inputs"])


class _DeviceWithoutHostMemory:
    """Stands in for an accelerator whose backend offers no pinned host memory."""

    platform = "fakegpu"

    def addressable_memories(self):
        return [type("Memory", (), {"kind": "device"})()]


def test_offload_without_pinned_host_memory(monkeypatch):
    monkeypatch.setattr(remat.jax, "devices", lambda *a: [_DeviceWithoutHostMemory()])
    msg = ("model.remat='offload_dots' offloads to 'pinned_host' memory, which the fakegpu "
           "backend does not offer (it has: device); use 'minimal' instead")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        remat.get_policy("offload_dots")
    assert remat.get_policy("minimal") is remat.POLICIES["minimal"]
    assert remat.get_policy("none") is None
