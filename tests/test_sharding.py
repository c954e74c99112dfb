"""jaxscale.core.sharding: rule resolution (first match wins), state shardings and every error."""

import re

import flax.linen as nn
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
from jaxscale.core.trees import path_str
from jaxscale.core.units import format_bytes
from jaxscale.models import build_model
from jaxscale.run.build import abstract_state

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
    return {path_str(path): s.spec for path, s in flat}


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
    names = {path_str(p): tuple(n) for p, n in flat}
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
        if "opt" in path_str(path) and len(names):
            by_shape[path_str(path).rsplit("/", 2)[-2]] = tuple(names)
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
    # Shorter annotations replicate the trailing dimensions (Flax's convention); longer ones
    # are an error.
    msg = "array 'w' of shape (4, 8) is annotated with 3 logical axes ('embed', 'mlp', 'heads')"
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}$"):
        shd.named_sharding(mesh_fsdp8, ("embed", "mlp", "heads"), shd.RULE_PRESETS["fsdp"],
                           (4, 8), what="array 'w'")


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
    assert text.splitlines()[-1].startswith(f"total: {format_bytes(total)} per device")
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(12) == "12 B"


# --------------------------------------------------------------------------------------------
# Auto rules: the mesh is the knob.


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _named_state():
    """A hand-built boxed state: an MLP kernel, an embedding, a stacked query kernel, a norm."""
    lp = nn.LogicallyPartitioned
    return {"params": {
        "wi": lp(_sds(32, 64), ("embed", "mlp")),
        "embedding": lp(_sds(64, 32), ("vocab", "embed")),
        "query": lp(_sds(2, 32, 4, 8), ("layers", "embed", "heads", "head_dim")),
        "norm": lp(_sds(32), ("norm",)),
    }, "step": _sds(dtype=jnp.int32)}


def test_auto_rules_without_a_mesh_name_every_axis():
    rules = shd.resolve_rules("auto")
    assert rules is shd.RULE_PRESETS["auto"] is shd.AUTO_RULES
    table = dict(rules)
    assert table["batch"] == ("data", "fsdp", "expert") and table["length"] == "sequence"
    assert table["embed"] == "fsdp" and table["exp"] == table["expert"] == "expert"
    for name in ("heads", "kv_heads", "mlp", "vocab", "act_heads", "act_kv_heads", "act_mlp",
                 "act_vocab"):
        assert table[name] == "tensor", name
    assert table["layers"] == "stage"  # the scanned layer stack: pipeline stages
    for name in ("norm", "head_dim", "act_embed", "act_head_dim", "height", "width", "channels"):
        assert table[name] is None, name


def test_auto_rules_on_fsdp4_tp2(mesh_fsdp4_tp2):
    rules = shd.resolve_rules("auto", mesh_fsdp4_tp2)
    specs = _specs(shd.state_shardings(_named_state(), mesh_fsdp4_tp2, rules))
    assert specs["params/wi"] == P("fsdp", "tensor")
    assert specs["params/embedding"] == P("tensor", "fsdp")
    assert specs["params/query"] == P(None, "fsdp", "tensor", None)
    assert specs["params/norm"] == P(None)
    assert specs["step"] == P()
    # The batch always names both data-parallel axes (a size-1 axis is a no-op).
    assert shd.batch_sharding(mesh_fsdp4_tp2, rules).spec == P(("data", "fsdp"), None)
    rows = {r.path: r for r in shd.sharding_report(_named_state(), mesh_fsdp4_tp2, rules)}
    assert rows["params/wi"].bytes_per_device == 32 * 64 * 4 // 8
    assert rows["params/query"].bytes_per_device == 2 * 32 * 4 * 8 * 4 // 8
    assert rows["params/norm"].bytes_per_device == 32 * 4


def test_auto_rules_on_data8_replicate_parameters():
    mesh = make_mesh(MeshConfig(data=8))
    rules = shd.resolve_rules("auto", mesh)
    rows = shd.sharding_report(_named_state(), mesh, rules)
    for row in rows:
        assert row.spec == P(*([None] * len(row.shape))), row.path
        assert row.bytes_per_device == row.total_bytes, row.path
        assert row.rule == ("replicated" if any(row.logical) else ""), row.path
    assert shd.batch_sharding(mesh, rules).spec == P(("data", "fsdp"), None)


@pytest.mark.parametrize("mesh_cfg, num_devices, batch, wi", [
    (MeshConfig(fsdp=8), 8, ("data", "fsdp"), P("fsdp", None)),  # FSDP alone
    (MeshConfig(tensor=2), 2, ("data", "fsdp"), P(None, "tensor")),  # tensor parallelism alone
    (MeshConfig(data=2, fsdp=4), 8, ("data", "fsdp"), P("fsdp", None)),  # HSDP
])
def test_auto_rules_drop_size_one_axes(mesh_cfg, num_devices, batch, wi):
    mesh = make_mesh(mesh_cfg, devices=jax.devices()[:num_devices])
    rules = shd.resolve_rules("auto", mesh)
    live = {axis for axis, size in mesh.shape.items() if size > 1}
    for name, target in rules:
        if name != "batch":  # (the batch keeps data and fsdp, see auto.ALWAYS_KEPT)
            assert set(shd.axes_of(target)) <= live, (name, target)
    assert shd.batch_sharding(mesh, rules).spec == P(batch, None)
    assert _specs(shd.state_shardings(_named_state(), mesh, rules))["params/wi"] == wi


def test_presets_ignore_the_mesh(mesh_fsdp8):
    for name in ("dp", "fsdp", "tp", "fsdp_tp", "hsdp"):
        assert shd.resolve_rules(name, mesh_fsdp8) is shd.RULE_PRESETS[name]


# --------------------------------------------------------------------------------------------
# Flax's conventions.


def test_shorter_annotation_replicates_trailing_dims(mesh_fsdp8):
    sharding = shd.named_sharding(mesh_fsdp8, ("embed",), shd.RULE_PRESETS["fsdp"], (16, 8))
    assert sharding.spec == P(BATCH, None)
    state = {"params": {"w": nn.LogicallyPartitioned(_sds(16, 8, 4), ("embed",))}}
    names = jax.tree_util.tree_leaves(shd.logical_axes_of(state))
    assert [tuple(n) for n in names] == [("embed", None, None)]
    rules = shd.resolve_rules("auto", mesh_fsdp8)
    assert _specs(shd.state_shardings(state, mesh_fsdp8, rules))["params/w"] == P(
        "fsdp", None, None)


def test_mesh_axis_name_annotation_maps_to_that_axis(mesh_fsdp4_tp2):
    rules = shd.resolve_rules("auto", mesh_fsdp4_tp2)
    model = nn.Dense(64, kernel_init=nn.with_partitioning(
        nn.initializers.lecun_normal(), ("fsdp", "tensor")))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32)))["params"]
    state = {"params": shd.annotate_params(params, [], replicate_below=1024)}
    specs = _specs(shd.state_shardings(state, mesh_fsdp4_tp2, rules))
    assert specs["params/kernel"] == P("fsdp", "tensor")
    assert specs["params/bias"] == P(None)
    # Several mesh axes for one dimension, as nn.with_partitioning allows.
    sharding = shd.named_sharding(mesh_fsdp4_tp2, (("fsdp", "tensor"),), rules, (16,))
    assert sharding.spec == P(("fsdp", "tensor"))
    # A name that is neither a rule's nor a mesh axis is still an error.
    msg = ("array has logical axis 'fsdpp' but no sharding rule maps it; add a rule such as "
           "['fsdpp', null] to sharding.rules (did you mean 'fsdp'?)")
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}$"):
        shd.named_sharding(mesh_fsdp4_tp2, ("fsdpp",), rules, (16,))


# --------------------------------------------------------------------------------------------
# Path rules for unannotated parameters.

PARAM_RULES = [["mlp/wi/kernel", ["embed", "mlp"]], ["kernel", ["mlp"]]]


def _plain_params():
    return {
        "layers_0": {"mlp": {"wi": {"kernel": _sds(32, 64), "bias": _sds(64)},
                             "wo": {"kernel": _sds(64, 32)}}},
        "embed": nn.LogicallyPartitioned(_sds(64, 32), ("vocab", "embed")),
    }


def test_annotate_params_first_rule_wins_and_small_ones_are_replicated():
    boxed = shd.annotate_params(_plain_params(), PARAM_RULES, replicate_below=1024)
    mlp = boxed["layers_0"]["mlp"]
    # The first matching rule wins, though the later "kernel" rule also matches.
    assert type(mlp["wi"]["kernel"]) is nn.Partitioned
    assert mlp["wi"]["kernel"].names == ("embed", "mlp")
    # Fewer names than dimensions: the rest are replicated.
    assert mlp["wo"]["kernel"].names == ("mlp", None)
    # No rule matches the bias: 64 float32 = 256 bytes <= 1024, so replicated.
    assert isinstance(mlp["wi"]["bias"], shd.ReplicatedSmall)
    assert mlp["wi"]["bias"].names == (None,)
    # Annotated leaves keep their names (and their box).
    assert type(boxed["embed"]) is nn.LogicallyPartitioned
    assert boxed["embed"].names == ("vocab", "embed")
    assert shd.replicated_small(boxed) == ["layers_0/mlp/wi/bias"]
    assert shd.replicated_small({"params": boxed}) == ["params/layers_0/mlp/wi/bias"]


def test_annotate_params_under_eval_shape():
    def init():
        params = {"w": jnp.zeros((32, 64)), "b": jnp.zeros((16, 16))}  # b: exactly 1024 bytes
        return shd.annotate_params(params, [["^w$", ["embed", "mlp"]]], replicate_below=1024)

    boxed = jax.eval_shape(init)
    assert boxed["w"].names == ("embed", "mlp") and boxed["w"].value.shape == (32, 64)
    assert isinstance(boxed["b"], shd.ReplicatedSmall) and boxed["b"].names == (None, None)
    assert jax.jit(init)()["w"].value.shape == (32, 64)


def test_annotate_params_large_unmatched_parameter_is_one_line():
    params = {"layers_0": {"mlp": {"wi": {"kernel": _sds(32, 64)}}}}
    msg = (
        "parameter 'layers_0/mlp/wi/kernel' of shape (32, 64) (8.0 KiB) matches no "
        "sharding.param_rules entry and is above sharding.replicate_below=1024 bytes; add a rule "
        'such as ["layers_0/mlp/wi/kernel", [<one logical name or null per dimension>]]'
        "; or annotate it with nn.with_partitioning"
    )
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}$"):
        shd.annotate_params(params, [["attn", ["embed"]]], replicate_below=1024,
                            hint="; or annotate it with nn.with_partitioning")
    # One byte above the limit is already too large; without a hint the message ends there.
    with pytest.raises(shd.ShardingError, match=re.escape(
            "(257,) (1.0 KiB) matches no sharding.param_rules entry and is above "
            "sharding.replicate_below=1024 bytes; add a rule such as "
            '["b", [<one logical name or null per dimension>]]') + "$"):
        shd.annotate_params({"b": _sds(257)}, [], replicate_below=1024)


# --------------------------------------------------------------------------------------------
# A mesh axis that parameter rules target but no parameter is sharded over.


def _unannotated_state():
    params = {"embed": {"embedding": _sds(64, 32)}, "mlp": {"kernel": _sds(32, 64)},
              "norm": {"scale": _sds(32)}}  # (2048 + 2048 + 32) * 4 = 16512 bytes
    return {"params": shd.annotate_params(params, [], replicate_below=1 << 20),
            "step": _sds(dtype=jnp.int32)}


def test_unannotated_model_on_fsdp_is_an_error(mesh_fsdp8):
    msg = (
        "mesh axis 'fsdp' has size 8 and sharding rules map parameter names to it (embed, "
        "conv_in), but no parameter is sharded over it: all 16.1 KiB of parameters are "
        "replicated on its devices; annotate the model's parameters "
        "(nn.with_logical_partitioning), give sharding.param_rules, or use mesh.data for plain "
        "data parallelism"
    )
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}$"):
        shd.state_shardings(_unannotated_state(), mesh_fsdp8,
                            shd.resolve_rules("auto", mesh_fsdp8))
    # The dp preset maps no parameter name to fsdp: data parallelism is what was asked for.
    specs = _specs(shd.state_shardings(_unannotated_state(), mesh_fsdp8, shd.resolve_rules("dp")))
    assert specs["params/mlp/kernel"] == P(None, None)
    # So does auto on the data axis.
    mesh = make_mesh(MeshConfig(data=8))
    specs = _specs(shd.state_shardings(_unannotated_state(), mesh, shd.resolve_rules("auto", mesh)))
    assert specs["params/embed/embedding"] == P(None, None)
    # The fsdp preset shards parameters over data too: on the data axis the way out is dp.
    with pytest.raises(shd.ShardingError, match=re.escape(
            "mesh axis 'data' has size 8 and sharding rules map parameter names to it (embed, "
            "conv_in), but no parameter is sharded over it")
            + ".*or use sharding.rules=dp for plain data parallelism$"):
        shd.state_shardings(_unannotated_state(), mesh, shd.resolve_rules("fsdp"))


def test_batch_field_names_are_not_parameter_names(mesh_fsdp8):
    rules = (("batch", "fsdp"), ("length", None), ("tokens", "fsdp"))
    msg = ("mesh axis 'fsdp' has size 8 and sharding rules map parameter names to it (tokens), "
           "but no parameter is sharded over it")
    with pytest.raises(shd.ShardingError, match=f"^{re.escape(msg)}"):
        shd.state_shardings(_unannotated_state(), mesh_fsdp8, rules)
    specs = _specs(shd.state_shardings(_unannotated_state(), mesh_fsdp8, rules,
                                       batch_names=("batch", "tokens")))
    assert specs["params/norm/scale"] == P(None)


# --------------------------------------------------------------------------------------------
# Batch shardings of any batch.


def test_batch_shardings_of_an_image_batch():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    rules = shd.resolve_rules("auto", mesh)
    axes = {"images": ("batch", "height", "width", "channels"), "labels": ("batch",)}
    shardings = shd.batch_shardings(mesh, rules, axes)
    assert shardings["images"].spec == P(("data", "fsdp"), None, None, None)
    assert shardings["labels"].spec == P(("data", "fsdp"))
    images = jax.device_put(np.zeros((16, 8, 8, 3), np.float32), shardings["images"])
    labels = jax.device_put(np.zeros((16,), np.int32), shardings["labels"])
    assert {s.data.shape for s in images.addressable_shards} == {(2, 8, 8, 3)}
    assert {s.data.shape for s in labels.addressable_shards} == {(2,)}


# --------------------------------------------------------------------------------------------
# The report says which rule each dimension took.


def test_report_names_the_rule_of_every_dimension(mesh_fsdp4_tp2):
    import optax

    params = shd.annotate_params(_plain_params(), PARAM_RULES, replicate_below=1024)
    state = {"params": params, "opt": optax.adam(1e-3).init(nn.unbox(params))}
    rules = shd.resolve_rules("auto", mesh_fsdp4_tp2)
    rows = {r.path: r for r in shd.sharding_report(state, mesh_fsdp4_tp2, rules)}
    assert rows["params/layers_0/mlp/wi/kernel"].rule == "embed->fsdp, mlp->tensor"
    assert rows["params/layers_0/mlp/wo/kernel"].rule == "mlp->tensor"
    assert rows["params/embed"].rule == "vocab->tensor, embed->fsdp"
    bias = rows["params/layers_0/mlp/wi/bias"]
    assert bias.rule == "(replicated: below replicate_below)" and bias.replicated_small
    assert bias.bytes_per_device == bias.total_bytes == 64 * 4
    # Moments follow: the kernel's is sharded like it, the bias' is replicated for the same reason.
    assert rows["opt/0/mu/layers_0/mlp/wi/kernel"].rule == "embed->fsdp, mlp->tensor"
    assert rows["opt/0/nu/layers_0/mlp/wi/bias"].replicated_small
    assert rows["opt/0/count"].rule == "" and not rows["opt/0/count"].replicated_small
    lines = shd.format_report(list(rows.values())).splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "logical", "axes", "partition", "spec",
                                "rules", "bytes/device"]
    line = next(x for x in lines if x.startswith("params/layers_0/mlp/wi/kernel "))
    assert "embed->fsdp, mlp->tensor" in line and line.endswith("1.00 KiB")  # 8 KiB / 8
