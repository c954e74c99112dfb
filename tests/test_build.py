"""jaxscale.run.build: one wiring for every kind of Flax model and task.

For the built-in decoder, a user-written NNX LM, the NNX twin of the decoder and an unannotated
Linen LM sharded by path rules: 3 steps on 1 device, data=8, fsdp=8 and fsdp=4 x tensor=2 give
the same losses and parameters, with the mesh as the only knob (sharding.rules=auto). A BatchNorm
classifier's statistics are the same on fsdp=8 as on one device, and every bad input has its
one-line error.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from util import assert_trees_close, full_lm_batch, small_lm_overrides

from jaxscale import config as config_lib
from jaxscale.core.mesh import make_mesh
from jaxscale.errors import ConfigError, ShardingError
from jaxscale.run.build import build
from jaxscale.tasks import objective

SEQ, BATCH, VOCAB = 16, 16, 64
SMALL = small_lm_overrides(seq_len=SEQ, batch_size=BATCH, vocab=VOCAB)
MESHES = {
    "single": ["mesh.fsdp=1"],
    "data8": ["mesh.fsdp=1", "mesh.data=8"],
    "fsdp8": ["mesh.fsdp=8"],
    "fsdp4_tp2": ["mesh.fsdp=4", "mesh.tensor=2"],
}


# --------------------------------------------------------------------------------------------
# Models written elsewhere: an unannotated Linen LM and an annotated NNX LM.


class PlainLM(nn.Module):
    """A Linen LM with no logical names at all (sharded by sharding.param_rules)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        # attention_mask sits where the decoder takes positions: passing by keyword keeps the
        # task's positions out of it.
        assert attention_mask is None
        x = nn.Embed(VOCAB, 32, name="embed")(input_ids)
        x = x + nn.Embed(SEQ, 32, name="pos")(position_ids)
        for i in range(2):
            h = nn.Dense(64, name=f"layers_{i}_up")(nn.LayerNorm(name=f"layers_{i}_norm")(x))
            x = x + nn.Dense(32, name=f"layers_{i}_down")(nn.gelu(h))
        return nn.Dense(VOCAB, name="head")(x)


PLAIN_RULES = [["embed/embedding", ["vocab", "embed"]], [r"layers_\d+_up/kernel", ["embed", "mlp"]],
               [r"layers_\d+_down/kernel", ["mlp", "embed"]], ["head/kernel", ["embed", "vocab"]]]


class NnxBlock(nnx.Module):
    def __init__(self, d: int, f: int, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.norm = nnx.RMSNorm(d, rngs=rngs,
                                scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)))
        self.up = nnx.Linear(d, f, use_bias=False, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
        self.down = nnx.Linear(f, d, use_bias=False, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))

    def __call__(self, x_BTD):
        return x_BTD + self.down(nnx.gelu(self.up(self.norm(x_BTD))))


class NnxLM(nnx.Module):
    """A user-written NNX LM: embedding, 2 blocks (a causal running mean mixes positions), head."""

    def __init__(self, rngs: nnx.Rngs, d: int = 32, f: int = 64):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(VOCAB, d, rngs=rngs,
                               embedding_init=nnx.with_partitioning(init, ("vocab", "embed")))
        self.blocks = nnx.List([NnxBlock(d, f, rngs) for _ in range(2)]) if hasattr(
            nnx, "List") else [NnxBlock(d, f, rngs) for _ in range(2)]
        self.head = nnx.Linear(d, VOCAB, use_bias=False, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("embed", "vocab")))

    def __call__(self, tokens):
        x_BTD = self.embed(tokens)
        for block in self.blocks:
            mean_BTD = jnp.cumsum(x_BTD, axis=1) / jnp.arange(1, x_BTD.shape[1] + 1)[:, None]
            x_BTD = block(x_BTD + mean_BTD)
        return self.head(x_BTD)


KINDS = {
    "decoder": (lambda: None, []),
    "plain_linen": (PlainLM, ["sharding.param_rules=" + repr(PLAIN_RULES).replace("'", '"')]),
    "nnx_lm": (lambda: NnxLM, []),
    "decoder_nnx": (lambda: None, ["model.name=decoder_nnx"]),
}


def _model(kind: str):
    factory, _ = KINDS[kind]
    model = factory()
    return model() if isinstance(model, type) and issubclass(model, nn.Module) else model


def _cfg(kind: str, mesh_name: str, *extra: str):
    return config_lib.load("tiny", [*SMALL, *KINDS[kind][1], *MESHES[mesh_name], *extra])


def lm_batch(step: int) -> dict[str, np.ndarray]:
    return full_lm_batch(step, BATCH, SEQ, VOCAB)


def _mesh(cfg, mesh_name):
    devices = jax.devices()[:1] if mesh_name == "single" else None
    return make_mesh(cfg.mesh, devices=devices)


@functools.cache
def three_steps(kind: str, mesh_name: str):
    cfg = _cfg(kind, mesh_name)
    run = build(cfg, _model(kind), mesh=_mesh(cfg, mesh_name))
    state = run.init_state()
    losses = []
    batch = jax.device_put(lm_batch(0), run.batch_shardings)  # one batch: the loss must fall
    for _ in range(3):
        state, metrics = run.train_step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), run


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mesh_name", ["data8", "fsdp8", "fsdp4_tp2"])
def test_every_model_kind_trains_the_same_on_every_mesh(kind, mesh_name):
    ref_losses, ref_params, _ = three_steps(kind, "single")
    losses, params, run = three_steps(kind, mesh_name)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert_trees_close(params, ref_params)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_mesh_alone_shards_the_parameters(kind):
    """Under sharding.rules=auto, fsdp=4 x tensor=2 splits kernels over both axes."""
    _, _, run = three_steps(kind, "fsdp4_tp2")
    specs = [s.spec for s in jax.tree_util.tree_leaves(run.shardings.params)]
    assert any("tensor" in shd_axes(spec) and "fsdp" in shd_axes(spec) for spec in specs)
    _, _, data_run = three_steps(kind, "data8")
    assert all(not shd_axes(s.spec) for s in jax.tree_util.tree_leaves(data_run.shardings.params))


def shd_axes(spec) -> set[str]:
    out = set()
    for target in spec:
        out.update((target,) if isinstance(target, str) else (target or ()))
    return out


def test_nnx_twin_matches_the_linen_decoder_from_the_same_parameters():
    from jaxscale.models.decoder_nnx import params_from_linen

    cfg = _cfg("decoder", "fsdp8")
    linen = build(cfg, mesh=_mesh(cfg, "fsdp8"))
    twin_cfg = _cfg("decoder_nnx", "fsdp8")
    twin = build(twin_cfg, mesh=_mesh(twin_cfg, "fsdp8"))
    a, b = linen.init_state(), twin.init_state()
    b = b.replace(params=jax.device_put(params_from_linen(jax.device_get(a.params), cfg.model),
                                        twin.shardings.params),
                  opt_state=twin.tx.init(params_from_linen(a.params, cfg.model)))
    b = jax.device_put(b, twin.shardings)
    for step in range(3):
        batch = lm_batch(step)
        a, ma = linen.train_step(a, jax.device_put(batch, linen.batch_shardings), jax.random.key(0))
        b, mb = twin.train_step(b, jax.device_put(batch, twin.batch_shardings), jax.random.key(0))
        np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad inputs: one line each.


def test_unmatched_large_parameter_names_its_path_and_shape():
    cfg = _cfg("plain_linen", "fsdp8", "sharding.param_rules=[]", "sharding.replicate_below=1024")
    with pytest.raises(ShardingError) as info:
        build(cfg, _model("plain_linen"), mesh=_mesh(cfg, "fsdp8"))
    message = str(info.value)
    assert message.startswith("parameter 'embed/embedding' of shape (64, 32) (8.0 KiB) matches no "
                              "sharding.param_rules entry and is above "
                              "sharding.replicate_below=1024 bytes"), message
    assert "\n" not in message


def test_fsdp_over_an_unannotated_model_is_an_error_not_data_parallelism():
    cfg = _cfg("plain_linen", "fsdp8", "sharding.param_rules=[]")
    with pytest.raises(ShardingError) as info:
        build(cfg, _model("plain_linen"), mesh=_mesh(cfg, "fsdp8"))
    message = str(info.value)
    assert message.startswith("mesh axis 'fsdp' has size 8 and sharding rules map parameter names "
                              "to it"), message
    assert "no parameter is sharded over it" in message and "\n" not in message


class UnnamedNnx(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, 8192, rngs=rngs)  # 2 MiB of float32: above the default
        self.head = nnx.Linear(8192, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.embed(tokens))


def test_nnx_model_without_names_says_how_to_name_them():
    cfg = _cfg("decoder", "fsdp8")
    with pytest.raises(ShardingError) as info:
        build(cfg, UnnamedNnx, mesh=_mesh(cfg, "fsdp8"))
    message = str(info.value)
    assert message.startswith("parameter 'embed/embedding' of shape (64, 8192) (2.0 MiB) matches "
                              "no sharding.param_rules entry"), message
    assert "nnx.with_partitioning" in message and "\n" not in message


@pytest.mark.parametrize("overrides, message", [
    (["task.name=clasify"],
     "task.name='clasify' is not valid; choose one of: lm, classify (did you mean 'classify'?)"),
    (['sharding.param_rules=[["layers_(", ["embed"]]]'],
     "sharding.param_rules regex 'layers_(' does not compile: missing ), unterminated subpattern "
     "at position 7"),
    (['sharding.param_rules=[["x", "embed"]]'],
     "sharding.param_rules entry ['x', 'embed'] must be [regex, [logical names]] (a name may be "
     "null)"),
    (["sharding.replicate_below=-1"], "sharding.replicate_below=-1 must be >= 0"),
])
def test_bad_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_lib.load("tiny", overrides)
    assert str(info.value) == message


def test_a_model_without_an_inputs_argument_is_named():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, foo):
            return nn.Dense(VOCAB)(foo)

    cfg = _cfg("decoder", "single")
    with pytest.raises(ConfigError) as info:
        build(cfg, Odd(), mesh=_mesh(cfg, "single"))
    assert str(info.value) == (
        "model Odd takes no argument for its inputs: its call signature is ('foo',); name the "
        "argument with call_args={'inputs': '<argument>'}")


# --------------------------------------------------------------------------------------------
# Auxiliary losses and metrics; FLOPs for any model.


class SowingLM(nn.Module):
    """PlainLM that sows an auxiliary loss (as a mixture-of-experts balance loss would) and a
    metric."""

    @nn.compact
    def __call__(self, tokens):
        logits = PlainLM(name="lm")(tokens, position_ids=jnp.zeros_like(tokens))
        self.sow("aux_loss", "balance", 0.25 * jnp.mean(jnp.square(logits)))
        self.sow("metrics", "logit_mean", jnp.mean(logits))
        return logits


def test_auxiliary_losses_reach_the_objective_and_the_metrics():
    rules = ["sharding.param_rules=" + repr([[r"lm/" + r[0], r[1]] for r in PLAIN_RULES])
             .replace("'", '"')]
    cfg = config_lib.load("tiny", [*SMALL, *MESHES["fsdp8"], *rules])
    run = build(cfg, SowingLM(), mesh=_mesh(cfg, "fsdp8"))
    state = run.init_state()
    batch = jax.device_put(lm_batch(0), run.batch_shardings)
    params = jax.device_get(state.params)
    _, metrics = run.train_step(state, batch, jax.random.key(0))
    logits = SowingLM().apply({"params": params}, lm_batch(0)["inputs"], mutable=["aux_loss",
                                                                                  "metrics"])[0]
    balance = 0.25 * float(jnp.mean(jnp.square(logits)))
    np.testing.assert_allclose(float(metrics["balance"]), balance, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logit_mean"]), float(jnp.mean(logits)), rtol=1e-4,
                               atol=1e-7)
    lse = jax.nn.logsumexp(logits, axis=-1)
    targets = lm_batch(0)["targets"]
    ce = float(jnp.mean(lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]))
    np.testing.assert_allclose(float(metrics["loss"]), ce, rtol=1e-5)  # "loss" stays the CE
    # What the step differentiates is the cross-entropy plus the auxiliary loss.
    out, _ = objective(run.task, run.model)(params, {}, lm_batch(0), None, True)
    np.testing.assert_allclose(float(out.objective / out.weight), ce + balance, rtol=1e-5)


def test_flops_come_from_the_task_formula_or_from_xla():
    from jaxscale.analysis.inspection import compile_run, inspect_compiled
    from jaxscale.analysis.metrics import flops_per_token

    _, _, decoder = three_steps("decoder", "fsdp8")
    cfg = decoder.cfg
    assert decoder.flops_per_example() == flops_per_token(cfg.model, SEQ).causal_per_token * SEQ
    _, _, plain = three_steps("plain_linen", "fsdp8")
    assert plain.flops_per_example() is None  # cfg.model (a decoder) does not describe PlainLM
    report = inspect_compiled(compile_run(plain))
    stats_flops = report.xla_flops_per_device
    assert report.flops_source == "XLA" and stats_flops > 0
    assert report.flops_per_step == stats_flops * 8


def test_a_model_that_cannot_take_the_tasks_inputs_is_one_line():
    cfg = _cfg("decoder", "single", "task.name=classify", "data.source=synthetic")
    with pytest.raises(ConfigError) as info:
        build(cfg, mesh=_mesh(cfg, "single"))
    assert str(info.value) == (
        "model 'decoder' cannot be initialised on the classify task's examples (images [8, 8, 1] "
        "float32, labels [] int32): ValueError: too many values to unpack (expected 2)")
