"""jaxscale.core.state: parameters and optimizer state are born sharded.

That init_state gives the same values on every mesh is checked in test_step.py, which initialises
on all five meshes anyway.
"""

import jax
import pytest
from util import tiny_model_config

from jaxscale.config import MeshConfig, OptimConfig
from jaxscale.core import optim
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.core.state import TrainState, num_params
from jaxscale.core.trees import path_str
from jaxscale.models import build_model
from jaxscale.run.build import abstract_state, init_state

CFG = tiny_model_config()  # L=2, D=32, N=4 heads, K=2 kv heads, H=8, F=64, V=64
L, D, N, K, F, V = 2, CFG.d_model, CFG.num_heads, CFG.num_kv_heads, CFG.d_ff, CFG.vocab_size
H = D // N
# Scalars per state leaf kind, counted by hand from the model's structure (Llama style, untied).
SHARDED_PARAMS = (
    V * D  # embed/embedding [vocab, embed]
    + L * (D * N * H + 2 * D * K * H + N * H * D)  # query, key, value, out
    + L * 3 * D * F  # wi_gate, wi_up, wo
    + D * V  # lm_head [embed, vocab]
)
REPLICATED_PARAMS = 2 * L * D + D  # attn_norm and mlp_norm scales per layer, final_norm scale


@pytest.fixture(scope="module")
def model_tx():
    return build_model(CFG), optim.make_optimizer(OptimConfig(), total_steps=10)


@pytest.fixture(scope="module")
def fsdp8_state(model_tx):
    model, tx = model_tx
    mesh = make_mesh(MeshConfig(fsdp=8))
    rules = shd.resolve_rules("fsdp")
    state, shardings = init_state(model, tx, mesh, rules, seq_len=16, seed=3)
    return mesh, rules, state, shardings


def _bytes_per_device(tree) -> int:
    """Bytes device 0 holds for `tree`, summed over leaves (each leaf has one shard per device)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = next(s for s in x.addressable_shards if s.device == jax.devices()[0])
        total += shard.data.nbytes
    return total


def test_param_count_matches_hand_count(fsdp8_state):
    _, _, state, _ = fsdp8_state
    assert num_params(state.params) == SHARDED_PARAMS + REPLICATED_PARAMS


def test_params_and_optimizer_state_are_born_sharded(fsdp8_state):
    _, _, state, _ = fsdp8_state
    param_bytes = 4 * (SHARDED_PARAMS // 8 + REPLICATED_PARAMS)
    assert _bytes_per_device(state.params) == param_bytes
    # adamw: mu and nu like the parameters, plus two int32 step counters (adam, schedule).
    assert _bytes_per_device(state.opt_state) == 2 * param_bytes + 2 * 4
    # step and skipped_steps: int32 scalars, replicated.
    assert _bytes_per_device(state) == 3 * param_bytes + 2 * 4 + 2 * 4
    unsharded = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    assert unsharded == 3 * 4 * (SHARDED_PARAMS + REPLICATED_PARAMS) + 4 * 4
    # Every device holds the same amount: one distinct 1/8 slice of each sharded leaf.
    for x in jax.tree_util.tree_leaves(state.params):
        shards = x.addressable_shards
        assert len({s.device for s in shards}) == 8
        if x.ndim and x.addressable_shards[0].data.size != x.size:
            assert len({str(s.index) for s in shards}) == 8
            assert all(s.data.size * 8 == x.size for s in shards)


def test_sharding_report_agrees_with_live_arrays(fsdp8_state, model_tx):
    mesh, rules, state, _ = fsdp8_state
    model, tx = model_tx
    rows = shd.sharding_report(abstract_state(model, tx, seq_len=16), mesh, rules)
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    live = {path_str(p): x.addressable_shards[0].data.nbytes for p, x in flat}
    assert {r.path: r.bytes_per_device for r in rows} == live
    assert {r.path: r.total_bytes for r in rows} == {
        path_str(p): x.nbytes for p, x in flat
    }


def test_state_shardings_are_the_live_shardings(fsdp8_state):
    _, _, state, shardings = fsdp8_state
    assert isinstance(shardings, TrainState)
    leaves, specs = jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)
    for x, s in zip(leaves, specs, strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    assert int(state.step) == 0 and int(state.skipped_steps) == 0
