"""Mixture of experts: routing by hand, dispatch paths, expert parallelism equal to one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import assert_trees_close, full_lm_batch, small_lm_overrides

from jaxscale import config as config_lib
from jaxscale.core import experts
from jaxscale.core.mesh import make_mesh
from jaxscale.errors import ConfigError
from jaxscale.models import moe
from jaxscale.run.build import build

SEQ, BATCH, VOCAB = 16, 16, 64
SMALL = [*small_lm_overrides(seq_len=SEQ, batch_size=BATCH, vocab=VOCAB),
         "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.d_ff=32"]
MESHES = {
    "single": ["mesh.fsdp=1"],
    "expert4_fsdp2": ["mesh.fsdp=2", "mesh.expert=4"],
    "expert2_fsdp2_tensor2": ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
    "fsdp8": ["mesh.fsdp=8"],
}
DROP_NOTHING = ["model.moe.dispatch=capacity", "model.moe.capacity_factor=4"]  # C = T


def lm_batch(step: int) -> dict[str, np.ndarray]:
    return full_lm_batch(step, BATCH, SEQ, VOCAB)


def _run(mesh_name: str, *extra: str):
    cfg = config_lib.load("tiny", [*SMALL, *MESHES[mesh_name], *extra])
    devices = jax.devices()[:1] if mesh_name == "single" else None
    return build(cfg, mesh=make_mesh(cfg.mesh, devices=devices))


@functools.cache
def three_steps(mesh_name: str, *extra: str):
    run = _run(mesh_name, *extra)
    state = run.init_state()
    losses, metrics = [], None
    for i in range(3):
        batch = jax.device_put(lm_batch(i), run.batch_shardings)
        state, metrics = run.train_step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("mesh_name", ["expert4_fsdp2", "expert2_fsdp2_tensor2"])
def test_expert_parallel_dropless_equals_one_device(mesh_name):
    ref_losses, ref_params, _ = three_steps("single")
    losses, params, _ = three_steps(mesh_name)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params)


def test_shared_experts_on_an_expert_parallel_mesh_equal_one_device():
    shared = ("model.moe.num_shared_experts=1",)
    ref_losses, ref_params, _ = three_steps("single", *shared)
    losses, params, _ = three_steps("expert2_fsdp2_tensor2", *shared)
    assert "shared" in params["layers"]["moe"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params)


def test_capacity_that_drops_nothing_equals_dropless():
    ref_losses, ref_params, _ = three_steps("single")
    losses, params, metrics = three_steps("single", *DROP_NOTHING)
    assert float(metrics["moe_dropped"]) == 0.0
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params)


def test_capacity_on_expert_parallel_mesh_equals_one_device():
    ref_losses, ref_params, _ = three_steps("single", *DROP_NOTHING)
    losses, params, _ = three_steps("expert4_fsdp2", *DROP_NOTHING)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params)


# --------------------------------------------------------------------------------------------
# Routing, losses and dispatch by hand.


def test_route_top_k_renormalised():
    logits = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    weights, chosen, probs = moe.route(logits, top_k=2)
    np.testing.assert_array_equal(chosen, [[1, 2], [0, 2]])
    np.testing.assert_allclose(weights, [[0.6 / 0.9, 0.3 / 0.9], [0.5 / 0.8, 0.3 / 0.8]],
                               rtol=1e-6)
    np.testing.assert_allclose(probs, [[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], rtol=1e-6)
    weights, _, probs = moe.route(jnp.zeros((1, 4)), top_k=1, score="sigmoid",
                                  renormalize=False)
    np.testing.assert_allclose(weights, [[0.5]], rtol=1e-6)
    np.testing.assert_allclose(probs, [[0.25] * 4], rtol=1e-6)


def test_load_balancing_loss_load_and_z_loss_by_hand():
    chosen = jnp.array([[0, 1], [0, 2], [0, 1], [3, 0]])  # expert 0 takes 4 of the 8 choices
    np.testing.assert_allclose(moe.expert_load(chosen, 4), [4 / 8, 2 / 8, 1 / 8, 1 / 8])
    uniform = jnp.full((4, 4), 0.25)
    np.testing.assert_allclose(moe.load_balancing_loss(uniform, chosen), 1.0, rtol=1e-6)
    skewed = jnp.tile(jnp.array([0.4, 0.3, 0.2, 0.1]), (4, 1))
    # 4 * (4*0.4 + 2*0.3 + 1*0.2 + 1*0.1) / 8
    np.testing.assert_allclose(moe.load_balancing_loss(skewed, chosen), 1.25, rtol=1e-6)
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    expected = (np.log(4.0) ** 2 + (1 + np.log(4.0)) ** 2) / 2
    np.testing.assert_allclose(moe.router_z_loss(logits), expected, rtol=1e-6)


def test_capacity_fills_first_choices_first_and_counts_drops():
    chosen = jnp.array([[[0, 1], [1, 0], [2, 0]]])  # [B=1, T=3, K=2]
    weights = jnp.array([[[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]])
    dispatch, combine, dropped = moe.capacity_routing(chosen, weights, 3, slots=1)
    np.testing.assert_array_equal(dropped[0], [[False, True]] * 3)  # every second choice
    dispatch, combine, dropped = moe.capacity_routing(chosen, weights, 3, slots=2)
    # second choices in token order: t0 -> e1 slot 1, t1 -> e0 slot 1, t2 -> e0 (full)
    np.testing.assert_array_equal(dropped[0], [[False, False], [False, False], [False, True]])
    np.testing.assert_array_equal(dispatch[0, 0, 1], [0, 1])
    np.testing.assert_array_equal(dispatch[0, 1, 0], [0, 1])
    assert float(dispatch[0, 2, 0].sum()) == 0.0
    np.testing.assert_allclose(combine[0, 0, 0], [0.7, 0.0])
    np.testing.assert_allclose(combine[0, 0, 1], [0.0, 0.3])
    assert moe.capacity(16, 2, 8, 1.25) == 5 and moe.capacity(16, 2, 8, 4.0) == 16


def _dense_reference(x_ND, chosen_NK, weights_NK, wi_gate, wi_up, wo):
    """Every expert on every token, then each token's chosen ones weighted: the definition."""
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x_ND, wi_gate)) * jnp.einsum(
        "nd,edf->nef", x_ND, wi_up)
    y_NED = jnp.einsum("nef,efd->ned", h, wo)
    picked = jnp.take_along_axis(y_NED, chosen_NK[:, :, None], axis=1)
    return jnp.einsum("nkd,nk->nd", picked, weights_NK)


@pytest.mark.parametrize("ragged", [True, False])
def test_dropless_local_equals_the_definition(ragged):
    keys = jax.random.split(jax.random.key(3), 5)
    N, D, F, E, K = 24, 8, 16, 4, 2
    x = jax.random.normal(keys[0], (N, D))
    wi_gate, wi_up = (jax.random.normal(k, (E, D, F)) / 3 for k in keys[1:3])
    wo = jax.random.normal(keys[3], (E, F, D)) / 4
    weights, chosen, _ = moe.route(jax.random.normal(keys[4], (N, E)), top_k=K)
    y = experts.dropless_local(x, chosen, weights, wi_gate, wi_up, wo, ragged=ragged)
    np.testing.assert_allclose(y, _dense_reference(x, chosen, weights, wi_gate, wi_up, wo),
                               rtol=1e-5, atol=1e-6)


def test_grouped_matmul_fallback_equals_ragged_dot():
    x = jax.random.normal(jax.random.key(0), (10, 4))
    w = jax.random.normal(jax.random.key(1), (3, 4, 5))
    sizes = jnp.array([3, 0, 5])  # rows 8 and 9 belong to no group: zeros
    out = experts.grouped_matmul(x, w, sizes, ragged=False)
    np.testing.assert_allclose(out, experts.grouped_matmul(x, w, sizes, ragged=True),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[8:], 0.0)


# --------------------------------------------------------------------------------------------
# The model, the mesh and the compiled exchange.


def test_metrics_report_the_routing():
    _, _, metrics = three_steps("single")
    loads = [float(metrics[f"moe_load_e{e}"]) for e in range(8)]
    np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)
    assert float(metrics["moe_load_max"]) == max(loads)
    assert float(metrics["moe_dropped"]) == 0.0
    assert 1.0 <= float(metrics["moe_balance"]) < 8.0
    # the weighted losses are reported too: aux_loss x balance, summed over the 2 layers
    np.testing.assert_allclose(float(metrics["moe_balance_loss"]),
                               0.01 * 2 * float(metrics["moe_balance"]), rtol=1e-5)


def test_expert_parallel_step_exchanges_tokens_by_all_to_all():
    from jaxscale.analysis import hlo

    run = _run("expert4_fsdp2")
    found = hlo.collectives(run.lower().compile().as_text(), 8)
    to_all = [c for c in found if c.kind == "all-to-all" and c.group_size == 4]
    assert to_all, "expert=4 exchanges tokens over the 4 expert shards"
    tokens_bytes = BATCH * SEQ * 32 * 4  # every token's activations, float32
    gathers = [c.bytes for c in found if c.kind == "all-gather"]
    assert max(gathers) < tokens_bytes, "no device gathers every token"


def test_dense_and_moe_layers_alternate():
    run = _run("single", "model.moe.every_n_layers=2")
    params = run.abstract.params["layers"]
    assert set(params) == {"block_0", "block_1"}
    assert "mlp" in params["block_0"] and "moe" in params["block_1"]
    assert params["block_1"]["moe"]["wi_up"].value.shape == (1, 8, 32, 32)  # [groups, E, D, F]


def test_flops_count_active_parameters():
    from jaxscale.analysis.metrics import flops_per_token

    cfg = config_lib.load("tiny", [*SMALL, "model.moe.num_shared_experts=1"]).model
    dense = config_lib.load("tiny", [s for s in SMALL if "moe" not in s]).model
    L, D, F_e, E = 2, 32, 32, 8
    # each MoE layer: (top_k=2 routed + 1 shared) SwiGLU experts of width 32, and the router
    moe_mlp = 3 * D * F_e * 3 + D * E
    delta = flops_per_token(cfg, SEQ).matmul_params - flops_per_token(dense, SEQ).matmul_params
    assert delta == L * (moe_mlp - 3 * D * 64)


@pytest.mark.parametrize("overrides, message", [
    (["mesh.fsdp=1", "mesh.expert=3"],
     "model.moe.num_experts=8 is not divisible by mesh.expert=3; each expert shard must hold "
     "the same number of experts"),
    (["model.moe.top_k=9"],
     "model.moe.top_k=9 is above model.moe.num_experts=8; a token cannot be sent to more "
     "experts than there are"),
    (["model.moe.every_n_layers=3"],
     "model.num_layers=2 is not divisible by model.moe.every_n_layers=3 (the layers repeat in "
     "groups ending with a MoE layer)"),
    (["model.moe.dispatch=dropall"],
     "model.moe.dispatch='dropall' is not valid; choose one of: dropless, capacity (did you "
     "mean 'dropless'?)"),
    (["model.name=decoder_nnx"],
     "model.moe.num_experts=8: mixture-of-experts layers are built by model.name='decoder', "
     "not 'decoder_nnx'"),
])
def test_bad_moe_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        config_lib.load("tiny", [*SMALL, *overrides])
    assert str(e.value) == message


def test_plan_compiles_grouped_matmuls_with_the_kernels_footprint():
    """The CPU expands ragged_dot over every expert; the stand-in plan compiles is one dense
    matmul of the same shapes (what GPU and TPU kernels hold), E times less temporary memory."""
    E, M, D, F = 8, 1024, 64, 128
    args = (jax.ShapeDtypeStruct((M, D), jnp.float32), jax.ShapeDtypeStruct((E, D, F), jnp.float32),
            jax.ShapeDtypeStruct((E,), jnp.int32))
    real = jax.jit(experts.grouped_matmul).lower(*args).compile()
    with experts.footprint_standin():  # a fresh jit: the stand-in acts when tracing
        standin = jax.jit(lambda *a: experts.grouped_matmul(*a)).lower(*args).compile()
    real = real.memory_analysis().temp_size_in_bytes
    assert standin.memory_analysis().temp_size_in_bytes * E <= real
    assert standin.out_info.shape == (M, F)
