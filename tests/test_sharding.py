"""jaxscale.core.sharding: rule resolution (first match wins), state shardings and every error."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from util import tiny_model_config

from jaxscale.config import ConfigError, MeshConfig, OptimConfig
from jaxscale.core import optim
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.core.state import abstract_state
from jaxscale.models import build_model

BATCH = ("data", "fsdp")


@pytest.fixture(scope="module")
def abstract():
    """The boxed abstract train state (adamw) of the tiny Llama-style model."""
    tx = optim.make_optimizer(OptimConfig(), total_steps=10)
    return abstract_state(build_model(tiny_model_config()), tx, seq_len=16)


@pytest.fixture(scope="module")
def mesh_fsdp8():
    return make_mesh(MeshConfig(fsdp=8))


@pytest.fixture(scope="module")
def mesh_fsdp4_tp2():
    return make_mesh(MeshConfig(fsdp=4, tensor=2))


def _specs(shardings) -> dict[str, P]:
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings)
    return {shd.path_str(path): s.spec for path, s in flat}


# --------------------------------------------------------------------------------------------
# Rule resolution.


def test_first_rule_for_a_name_wins():
    rules = (("embed", "fsdp"), ("embed", "tensor"))
    assert shd.logical_to_spec(("embed",), rules) == P("fsdp")
    assert shd.logical_to_spec(("embed",), tuple(reversed(rules))) == P("tensor")


def test_rule_whose_axis_is_taken_is_passed_over():
    rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "tensor"))
    # 'mlp' would take fsdp, but 'embed' already did: the next rule for 'mlp' is used.
    assert shd.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    # Order of the dimensions decides who gets the axis.
    assert shd.logical_to_spec(("mlp", "embed"), rules) == P("fsdp", None)
    # No rule left for the name: the dimension is replicated.
    assert shd.logical_to_spec(("embed", "mlp"), rules[:2]) == P("fsdp", None)
    # A multi-axis rule is passed over when any one of its axes is taken.
    rules = (("a", "fsdp"), ("b", ("data", "fsdp")), ("b", "data"))
    assert shd.logical_to_spec(("a", "b"), rules) == P("fsdp", "data")


def test_first_match_wins_in_state_shardings(abstract, mesh_fsdp4_tp2):
    rules = (
        ("layers", None), ("vocab", None), ("norm", None), ("head_dim", None),
        ("heads", "tensor"), ("kv_heads", "tensor"),
        ("embed", "fsdp"), ("embed", "tensor"),
        ("mlp", "fsdp"), ("mlp", "tensor"),
        ("batch", BATCH), ("length", None),
    )
    specs = _specs(shd.state_shardings(abstract, mesh_fsdp4_tp2, rules))
    # embed takes fsdp (first rule); mlp's first rule (fsdp) is taken, so tensor.
    assert specs["params/layers/mlp/wi_up/kernel"] == P(None, "fsdp", "tensor")
    # mlp first: it takes fsdp, and embed's first rule (fsdp) is taken, so tensor.
    assert specs["params/layers/mlp/wo/kernel"] == P(None, "fsdp", "tensor")
    # heads took tensor before embed: embed gets fsdp.
    assert specs["params/layers/attn/out/kernel"] == P(None, "tensor", None, "fsdp")


def test_resolve_rules_normalises_lists():
    rules = shd.resolve_rules([["embed", ["fsdp"]], ["mlp", ["data", "fsdp"]], ["norm", None]])
    assert rules == (("embed", "fsdp"), ("mlp", ("data", "fsdp")), ("norm", None))
    assert shd.resolve_rules("fsdp") is shd.RULE_PRESETS["fsdp"]


def test_unknown_rule_preset():
    msg = (
        "sharding.rules='fdsp' is not a preset; choose one of: dp, fsdp, tp, fsdp_tp, hsdp "
        "(did you mean 'fsdp'?)"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        shd.resolve_rules("fdsp")


@pytest.mark.parametrize(
    "preset, mesh_cfg, expected",
    [
        # (query kernel [layers, embed, heads, head_dim], mlp wo [layers, mlp, embed], norm)
        ("dp", MeshConfig(data=8), (P(None, None, None, None), P(None, None, None), P(None, None))),
        ("fsdp", MeshConfig(fsdp=8),
         (P(None, BATCH, None, None), P(None, None, BATCH), P(None, None))),
        ("tp", MeshConfig(data=4, tensor=2),
         (P(None, None, "tensor", None), P(None, "tensor", None), P(None, None))),
        ("fsdp_tp", MeshConfig(data=2, fsdp=2, tensor=2),
         (P(None, BATCH, "tensor", None), P(None, "tensor", BATCH), P(None, None))),
        ("hsdp", MeshConfig(data=2, fsdp=4),
         (P(None, "fsdp", None, None), P(None, None, "fsdp"), P(None, None))),
    ],
)
def test_preset_specs(abstract, preset, mesh_cfg, expected):
    mesh = make_mesh(mesh_cfg)
    specs = _specs(shd.state_shardings(abstract, mesh, shd.resolve_rules(preset)))
    query, wo, norm = expected
    assert specs["params/layers/attn/query/kernel"] == query
    assert specs["params/layers/mlp/wo/kernel"] == wo
    assert specs["params/layers/attn_norm/scale"] == norm
    # Optimizer moments follow their parameters; scalars are replicated.
    assert specs["opt_state/1/0/mu/layers/attn/query/kernel"] == query
    assert specs["opt_state/1/0/nu/layers/mlp/wo/kernel"] == wo
    assert specs["opt_state/1/0/count"] == P()
    assert specs["step"] == P()
    # The batch is split over every batch axis.
    assert shd.batch_sharding(mesh, shd.resolve_rules(preset)).spec == P(BATCH, "sequence")


def test_logical_axes_of_moments(abstract):
    flat, _ = jax.tree_util.tree_flatten_with_path(shd.logical_axes_of(abstract))
    names = {shd.path_str(p): tuple(n) for p, n in flat}
    assert names["params/layers/mlp/wi_up/kernel"] == ("layers", "embed", "mlp")
    assert names["opt_state/1/0/mu/layers/mlp/wi_up/kernel"] == ("layers", "embed", "mlp")
    assert names["opt_state/1/0/nu/embed/embedding"] == ("vocab", "embed")
    assert names["skipped_steps"] == ()


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "sgd"])
def test_every_optimizer_state_follows_its_parameters(name, mesh_fsdp8):
    """Every optimizer-state leaf shaped like its parameter is sharded like it."""
    tx = optim.make_optimizer(OptimConfig(name=name), total_steps=10)
    abstract = abstract_state(build_model(tiny_model_config()), tx, seq_len=16)
    rows = shd.sharding_report(abstract, mesh_fsdp8, shd.resolve_rules("fsdp"))
    params = {r.path[len("params/"):]: r for r in rows if r.path.startswith("params/")}
    followed = 0
    for row in rows:
        if not row.path.startswith("opt_state/"):
            continue
        for param_path, param in params.items():
            if row.path.endswith("/" + param_path) and row.shape == param.shape:
                assert row.spec == param.spec, row.path
                assert row.bytes_per_device * 8 == row.total_bytes or row.spec == P(
                    *([None] * len(row.shape))), row.path
                followed += 1
    # Parameter-shaped moments per parameter: adamw mu and nu; lion mu; adafactor its momentum
    # and (no dim here reaches 128, so none is factored) its full second moment; sgd its trace.
    moments = {"adamw": 2, "lion": 1, "adafactor": 2, "sgd": 1}[name]
    assert followed == moments * len(params) == moments * 12


def test_logical_axes_of_factored_moments():
    """Adafactor's row/column statistics take the parameter's names minus the factored dim."""
    import flax.linen as nn
    import optax

    boxed = {"w": nn.LogicallyPartitioned(jnp.zeros((256, 128)), ("embed", "mlp"))}
    state = {"params": boxed, "opt": optax.adafactor(1e-3).init(nn.unbox(boxed))}
    flat, _ = jax.tree_util.tree_flatten_with_path(shd.logical_axes_of(state))
    by_shape = {}
    for path, names in flat:
        if "opt" in shd.path_str(path) and len(names):
            by_shape[shd.path_str(path).rsplit("/", 2)[-2]] = tuple(names)
    # optax factors out the largest dim (0) for v_row and the second largest (1) for v_col.
    assert by_shape == {"v_row": ("mlp",), "v_col": ("embed",), "v": (None,)}


# --------------------------------------------------------------------------------------------
# Errors: each names the array.


def test_logical_name_without_rule(abstract, mesh_fsdp8):
    rules = tuple(r for r in shd.RULE_PRESETS["fsdp"] if r[0] != "mlp")
    msg = (
        "parameter 'params/layers/mlp/wi_gate/kernel' has logical axis 'mlp' but no sharding "
        "rule maps it; add a rule such as ['mlp', null] to sharding.rules"
    )
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}"):
        shd.state_shardings(abstract, mesh_fsdp8, rules)


def test_rule_naming_unknown_mesh_axis(abstract, mesh_fsdp8):
    rules = (("embed", "fsdpp"),) + shd.RULE_PRESETS["fsdp"]
    msg = (
        "sharding rule 'embed' -> 'fsdpp' names a mesh axis that does not exist; mesh axes: "
        "data, stage, fsdp, expert, sequence, tensor (did you mean 'fsdp'?)"
    )
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}$"):
        shd.state_shardings(abstract, mesh_fsdp8, rules)


def test_dimension_not_divisible(abstract):
    mesh = make_mesh(MeshConfig(tensor=8))
    msg = (
        "parameter 'params/layers/attn/key/kernel' of shape (2, 32, 2, 8): dimension 2 (size 2, "
        "logical 'kv_heads') is not divisible by mesh axes ('tensor',) of total size 8"
    )
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}$"):
        shd.state_shardings(abstract, mesh, shd.resolve_rules("tp"))


def test_unused_mesh_axis(abstract, mesh_fsdp4_tp2):
    msg = (
        "mesh axis 'tensor' has size 2 but neither the batch nor any parameter is sharded over "
        "it, so its devices would all compute the same thing; set mesh.tensor=1 or add a "
        "sharding rule that uses 'tensor'"
    )
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}$"):
        shd.state_shardings(abstract, mesh_fsdp4_tp2, shd.resolve_rules("fsdp"))


def test_annotation_rank_mismatch(mesh_fsdp8):
    msg = "array 'w' of shape (4, 8) is annotated with 1 logical axes ('embed',)"
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}$"):
        shd.named_sharding(mesh_fsdp8, ("embed",), shd.RULE_PRESETS["fsdp"], (4, 8),
                           what="array 'w'")


# --------------------------------------------------------------------------------------------
# Activations.


def test_constrain_is_noop_outside_context():
    x = jnp.ones((8, 4))
    assert shd.constrain(x, ("batch", "length")) is x


def test_constrain_shards_activation(mesh_fsdp4_tp2):
    rules = shd.resolve_rules("fsdp_tp")

    def f(x):
        return shd.constrain(x * 2, ("batch", "length", "act_mlp"))

    with shd.activation_sharding(mesh_fsdp4_tp2, rules):
        out = jax.jit(f)(np.ones((8, 4, 6), np.float32))
    expected = NamedSharding(mesh_fsdp4_tp2, P(BATCH, "sequence", "tensor"))
    assert out.sharding.is_equivalent_to(expected, 3)
    assert {s.data.shape for s in out.addressable_shards} == {(2, 4, 3)}
    np.testing.assert_array_equal(np.asarray(out), 2.0)


def test_constrain_not_divisible_names_the_activation(mesh_fsdp8):
    with shd.activation_sharding(mesh_fsdp8, shd.resolve_rules("fsdp")):
        with pytest.raises(shd.ShardingError, match=re.escape(
            "activation ('batch', 'length') of shape (4, 16): dimension 0 (size 4, logical "
            "'batch') is not divisible by mesh axes ('data', 'fsdp') of total size 8"
        )):
            jax.jit(lambda x: shd.constrain(x, ("batch", "length")))(np.ones((4, 16)))


# --------------------------------------------------------------------------------------------
# Report.


def test_sharding_report_bytes(abstract, mesh_fsdp8):
    rows = shd.sharding_report(abstract, mesh_fsdp8, shd.resolve_rules("fsdp"))
    by_path = {r.path: r for r in rows}
    wo = by_path["params/layers/mlp/wo/kernel"]
    assert wo.shape == (2, 64, 32) and wo.logical == ("layers", "mlp", "embed")
    assert wo.total_bytes == 2 * 64 * 32 * 4
    assert wo.bytes_per_device == 2 * 64 * 32 * 4 // 8
    norm = by_path["params/final_norm/scale"]
    assert norm.bytes_per_device == norm.total_bytes == 32 * 4
    text = shd.format_report(rows)
    total = sum(r.bytes_per_device for r in rows)
    assert text.splitlines()[-1].startswith(f"total: {shd.format_bytes(total)} per device")
    assert shd.format_bytes(1536) == "1.50 KiB" and shd.format_bytes(12) == "12 B"
