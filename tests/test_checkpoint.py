"""jaxscale.checkpoint in one process: what a step holds, the policies, reshard-on-restore onto
other meshes, parameters-only loading, and every error's message."""

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import resume_harness
from util import random_batch

from jaxscale import config as config_lib
from jaxscale.checkpoint.manager import Checkpointer, checkpoint_dir
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.core.optim import make_optimizer
from jaxscale.core.state import unbox
from jaxscale.core.step import jit_step
from jaxscale.core.trees import path_str
from jaxscale.errors import CheckpointError
from jaxscale.models import build_model
from jaxscale.run.build import abstract_state, init_state, make_train_step

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=64", "model.vocab_size=64", "seq_len=16", "batch_size=16",
         "data.source=synthetic", "optim.warmup_steps=2", "steps=10"]
DP8 = ["mesh.fsdp=1", "mesh.data=8", "sharding.rules=dp"]  # 8-device data parallelism
RNG = jax.random.key(7)


def make_cfg(workdir, *overrides) -> config_lib.Config:
    return config_lib.load("tiny", SMALL + [f"workdir={workdir}", *overrides])


class Setup:
    """Model, optimizer, mesh, shardings and a fresh state for a config (on some devices).

    Setups that differ only in workdir and checkpoint settings share everything else, the fresh
    state included (it is never donated), so each program compiles once per test process.
    """

    _shared: dict = {}

    def __init__(self, cfg, devices=None):
        key = (repr(dataclasses.replace(cfg, workdir="", checkpoint=None)),
               None if devices is None else tuple(d.id for d in devices))
        if key not in self._shared:
            model = build_model(cfg.model)
            tx = make_optimizer(cfg.optim, cfg.steps)
            mesh = make_mesh(cfg.mesh, devices)
            rules = shd.resolve_rules(cfg.sharding.rules, mesh)
            abstract = abstract_state(model, tx, cfg.seq_len, cfg.seed)
            self._shared[key] = dict(
                model=model, tx=tx, mesh=mesh, rules=rules, abstract=abstract,
                shardings=shd.state_shardings(abstract, mesh, rules), fresh=[],
            )
        self.__dict__.update(self._shared[key])
        self.cfg = cfg

    def init(self):
        if not self.fresh:
            self.fresh.append(init_state(self.model, self.tx, self.mesh, self.rules,
                                         seq_len=self.cfg.seq_len, seed=self.cfg.seed)[0])
        return self.fresh[0]

    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.cfg, self.mesh, log=lambda message: None)

    def restore(self, init=None):
        with self.checkpointer() as ckpt:
            return ckpt.restore_or_init(init or self.init, self.abstract, self.shardings, rng=RNG)


def data_state(step):
    return {"step": step, "seed": 0, "global_batch": 16}


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_bitwise(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y, strict=True)


@pytest.fixture(scope="module")
def dp8(tmp_path_factory):
    """A state saved at steps 2 and 4 by an 8-device data-parallel run (rules dp)."""
    workdir = tmp_path_factory.mktemp("dp8")
    setup = Setup(make_cfg(workdir, *DP8, "checkpoint.every=2"))
    state = setup.init()
    with setup.checkpointer() as ckpt:
        ckpt.restore_or_init(lambda: state, setup.abstract, setup.shardings, rng=RNG)
        for step in (2, 4):
            assert ckpt.should_save(step)
            ckpt.save(step, state.replace(step=state.step + step), data_state(step))
    return setup, state


def test_a_step_holds_state_data_rng_and_meta(dp8):
    setup, _ = dp8
    step_dir = pathlib.Path(checkpoint_dir(setup.cfg)) / "4"
    assert step_dir.parent == pathlib.Path(setup.cfg.workdir).absolute() / "checkpoints"
    assert {"state", "data", "rng", "meta"} <= {p.name for p in step_dir.iterdir()}
    read = lambda item: json.loads((step_dir / item / "metadata").read_text())
    assert read("data") == data_state(4)
    assert read("rng") == {"seed": 0, "impl": "threefry2x32",
                           "key_data": np.asarray(jax.random.key_data(RNG)).tolist()}
    meta = read("meta")
    assert meta["step"] == 4 and meta["jaxscale_version"] == __import__("jaxscale").__version__
    assert meta["mesh"]["data"] == 8 and meta["num_devices"] == 8
    assert meta["jax_threefry_partitionable"] == jax.config.jax_threefry_partitionable
    assert config_lib.from_dict(meta["config"]) == setup.cfg


def test_interval_last_step_and_retention(tmp_path):
    setup = Setup(make_cfg(tmp_path, *DP8, "checkpoint.every=3", "checkpoint.keep=2",
                           "checkpoint.keep_period=6", "checkpoint.async_save=false"))
    state = setup.init()
    saved = []
    with setup.checkpointer() as ckpt:
        ckpt.restore_or_init(lambda: state, setup.abstract, setup.shardings, rng=RNG)
        for step in range(1, 11):
            if ckpt.should_save(step):
                saved.append(step)
                ckpt.save(step, state, data_state(step))
    assert saved == [3, 6, 9, 10]  # every 3, and the last step
    # The latest 2, plus every multiple of 6; temporary directories never remain.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "6", "9"]


@pytest.mark.parametrize("target", ["fsdp2_tensor2", "fsdp2_tensor2_auto", "one_device"])
def test_restore_onto_another_mesh_has_target_shardings_and_equal_values(dp8, target):
    setup, state = dp8
    overrides, devices = {
        "fsdp2_tensor2": (["mesh.fsdp=2", "mesh.tensor=2", "sharding.rules=fsdp_tp"], 4),
        "fsdp2_tensor2_auto": (["mesh.fsdp=2", "mesh.tensor=2"], 4),  # the mesh alone
        "one_device": (["mesh.fsdp=1"], 1),
    }[target]
    other = Setup(make_cfg(setup.cfg.workdir, *overrides), jax.devices()[:devices])
    restored, rng, data = other.restore(init=pytest.fail)
    assert data == data_state(4) and int(restored.step) == 4
    assert np.array_equal(jax.random.key_data(rng), jax.random.key_data(RNG))
    got = jax.tree_util.tree_leaves(restored)
    want = jax.tree_util.tree_leaves(other.shardings)
    assert len(got) == len(want) == len(jax.tree_util.tree_leaves(state))
    for leaf, sharding in zip(got, want, strict=True):
        assert leaf.sharding == sharding
    if devices == 4:  # the saved leaves were all replicated; here parameters are split
        assert any(not s.is_fully_replicated for s in want)
        assert any("tensor" in str(s.spec) for s in jax.tree_util.tree_leaves(
            other.shardings.params))
    assert_bitwise(restored.replace(step=state.step), state)


def test_training_continues_on_the_new_mesh(dp8):
    """Restored onto fsdp=2 x tensor=2, training gives the losses of a run on that mesh started
    from the same state without a checkpoint."""
    setup, state = dp8
    other = Setup(make_cfg(setup.cfg.workdir, "mesh.fsdp=2", "mesh.tensor=2",
                           "sharding.rules=fsdp_tp"), jax.devices()[:4])
    restored, rng, _ = other.restore(init=pytest.fail)
    step = jit_step(make_train_step(other.model, other.tx, mesh=other.mesh, rules=other.rules),
                    other.shardings, shd.batch_sharding(other.mesh, other.rules), donate=False)

    def losses(s):
        out = []
        for i in range(3):
            batch = jax.device_put(random_batch(seed=i), shd.batch_sharding(other.mesh,
                                                                             other.rules))
            s, metrics = step(s, batch, rng)
            out.append(float(metrics["loss"]))  # blocks: one program at a time on CPU
        return out

    direct = jax.device_put(state.replace(step=state.step + 4), other.shardings)
    np.testing.assert_allclose(losses(restored), losses(direct), rtol=1e-6)


def test_model_change_is_refused_naming_the_changed_keys(dp8):
    setup, _ = dp8
    other = Setup(make_cfg(setup.cfg.workdir, *DP8, "model.d_model=48", "model.num_layers=3",
                           "model.dtype=bfloat16"))
    with pytest.raises(CheckpointError) as e:
        other.restore(init=pytest.fail)
    message = str(e.value)
    assert message.startswith(f"cannot resume from checkpoint step 4 in {checkpoint_dir(setup.cfg)}"
                              ": the model changed (")
    assert "model.num_layers: 2 in the checkpoint, 3 now" in message
    assert "model.d_model: 32 in the checkpoint, 48 now" in message
    assert "dtype" not in message  # the compute dtype may change


def test_sample_stream_change_is_refused(dp8):
    setup, _ = dp8
    other = Setup(make_cfg(setup.cfg.workdir, *DP8, "seed=1", "batch_size=32", "steps=20"))
    with pytest.raises(CheckpointError) as e:
        other.restore(init=pytest.fail)
    assert str(e.value).startswith(
        f"cannot resume from checkpoint step 4 in {checkpoint_dir(setup.cfg)}: the sample stream "
        "changed (seed: 0 in the checkpoint, 1 now; batch_size: 16 in the checkpoint, 32 now), "
        "so the batches after it would not continue the run")  # steps=20 is fine


def _shape_lines(saved, expected):
    """The lines check_tree must print for two (boxed) abstract states."""
    def flat(tree):
        return {path_str(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(unbox(tree))[0]}
    a, b = flat(saved), flat(expected)
    assert a.keys() == b.keys()
    return [f"  {k}: saved {a[k]}, expected {b[k]}" for k in sorted(a) if a[k] != b[k]], len(a)


def test_shape_mismatch_lists_every_path_with_both_shapes(dp8):
    """The config matches but the model does not (e.g. a custom model passed to train)."""
    setup, _ = dp8
    wider = Setup(dataclasses.replace(setup.cfg, model=dataclasses.replace(setup.cfg.model,
                                                                           d_ff=128)))
    with setup.checkpointer() as ckpt, pytest.raises(CheckpointError) as e:
        ckpt.restore_or_init(pytest.fail, wider.abstract, wider.shardings, rng=RNG)
    lines, total = _shape_lines(setup.abstract, wider.abstract)
    assert len(lines) == 9  # wi_gate, wi_up, wo: the parameter and its two Adam moments
    message = str(e.value)
    assert message.splitlines() == [
        f"checkpoint step 4 in {checkpoint_dir(setup.cfg)} does not fit the model: 9 of "
        f"{total} arrays differ in shape or presence (saved vs expected):", *lines]
    assert "  params/layers/mlp/wo/kernel: saved (2, 64, 32), expected (2, 128, 32)" in lines


@pytest.fixture()
def damaged(dp8, tmp_path):
    """A copy of the dp8 run's checkpoints, to damage."""
    setup, state = dp8
    shutil.copytree(checkpoint_dir(setup.cfg), tmp_path / "checkpoints")
    return Setup(dataclasses.replace(setup.cfg, workdir=str(tmp_path))), state


@pytest.mark.parametrize("victim", ["state", "meta"])
def test_truncated_step_names_the_file_and_offers_the_previous_step(damaged, victim):
    setup, state = damaged
    step_dir = pathlib.Path(checkpoint_dir(setup.cfg)) / "4"
    # Steps written before manifests existed are read unverified, and a read that fails names
    # the file (tests/test_checkpoint_verify.py covers the verified steps' fallback).
    for manifest in step_dir.parent.glob("*/jaxscale_manifest.json"):
        manifest.unlink()
    if victim == "meta":
        bad = step_dir / "meta" / "metadata"
    else:  # the array data: orbax's OCDBT manifest if there is one, else the largest file
        files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
        bad = next((p for p in files if p.name == "manifest.ocdbt" and p.parent.name == "state"),
                   max(files, key=lambda p: p.stat().st_size))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        setup.restore(init=pytest.fail)
    message = str(e.value)
    assert message.startswith(f"checkpoint step 4 in {step_dir.parent} is corrupted or "
                              f"truncated: cannot read {bad} (")
    assert message.endswith("The previous complete step is 2: resume from it with "
                            "checkpoint.restore_step=2 (later steps are then deleted)")

    # Taking the offer restores step 2 and removes the damaged step.
    older = Setup(dataclasses.replace(setup.cfg, checkpoint=dataclasses.replace(
        setup.cfg.checkpoint, restore_step=2)))
    restored, _, data = older.restore(init=pytest.fail)
    assert int(restored.step) == 2 and data == data_state(2)
    assert_bitwise(restored.replace(step=state.step), state)
    assert not step_dir.exists()


def test_missing_steps_and_directories_are_named(dp8, tmp_path):
    setup, _ = dp8
    wrong_step = Setup(make_cfg(setup.cfg.workdir, *DP8, "checkpoint.restore_step=3"))
    with pytest.raises(CheckpointError, match=r"checkpoint.restore_step=3: there is no complete "
                       r"checkpoint of that step in .*; complete steps: \[2, 4\]"):
        wrong_step.restore(init=pytest.fail)
    empty = Setup(make_cfg(tmp_path / "empty", *DP8, "checkpoint.restore_step=3"))
    with pytest.raises(CheckpointError, match="that step in .*empty/checkpoints; it holds no "
                       "checkpoint"):
        empty.restore(init=pytest.fail)
    missing = Setup(make_cfg(tmp_path / "fresh", *DP8, "checkpoint.init_from=/nonexistent/run"))
    with pytest.raises(CheckpointError, match="checkpoint.init_from='/nonexistent/run': no such "
                       "directory"):
        missing.restore()
    (tmp_path / "hollow").mkdir()
    hollow = Setup(make_cfg(tmp_path / "fresh2", *DP8,
                            f"checkpoint.init_from={tmp_path / 'hollow'}"))
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        hollow.restore()


@pytest.mark.parametrize("source", ["run", "step"])
def test_init_from_loads_only_the_parameters(dp8, tmp_path, source):
    setup, state = dp8
    path = checkpoint_dir(setup.cfg) + ("/2" if source == "step" else "")
    fresh = Setup(make_cfg(tmp_path, "mesh.fsdp=2", "mesh.tensor=2", "sharding.rules=fsdp_tp",
                           f"checkpoint.init_from={path}", "seed=3"), jax.devices()[:4])
    restored, _, data = fresh.restore()
    assert data is None and int(restored.step) == 0
    assert_bitwise(restored.params, state.params)
    assert_bitwise(restored.opt_state, fresh.init().opt_state)  # a fresh optimizer
    for leaf, sharding in zip(jax.tree_util.tree_leaves(restored.params),
                              jax.tree_util.tree_leaves(fresh.shardings.params), strict=True):
        assert leaf.sharding == sharding


def test_init_from_with_other_shapes_lists_the_parameters(dp8, tmp_path):
    setup, _ = dp8
    other = Setup(make_cfg(tmp_path, *DP8, "model.d_ff=128",
                           f"checkpoint.init_from={checkpoint_dir(setup.cfg)}"))
    with pytest.raises(CheckpointError) as e:
        other.restore()
    assert str(e.value).startswith(
        f"checkpoint.init_from='{checkpoint_dir(setup.cfg)}' (step 4) does not fit the model: "
        "3 of 12 arrays differ")
    assert "  params/layers/mlp/wi_up/kernel: saved (2, 32, 64), expected (2, 32, 128)" in str(
        e.value)


@pytest.mark.parametrize("seen_by", ["save", "wait", "close"])
def test_background_write_error_is_raised_by_the_next_save_wait_or_close(
    dp8, tmp_path, monkeypatch, seen_by
):
    setup, state = dp8
    resume_harness.install({"JAXSCALE_TEST_FAIL_SAVE": "2"}, monkeypatch.setattr)
    failing = Setup(dataclasses.replace(setup.cfg, workdir=str(tmp_path)))
    ckpt = failing.checkpointer()
    ckpt.restore_or_init(lambda: state, failing.abstract, failing.shardings, rng=RNG)
    ckpt.save(1, state, data_state(1))
    ckpt.save(2, state, data_state(2))  # returns at once: the write fails in the background
    message = (f"saving checkpoint step 2 to {tmp_path / 'checkpoints'} failed: OSError: "
               "injected write failure in step 2")
    with pytest.raises(CheckpointError, match=message):
        {"save": lambda: ckpt.save(3, state, data_state(3)), "wait": ckpt.wait,
         "close": ckpt.close}[seen_by]()
    ckpt.close()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert [n for n in names if n.isdigit()] == ["1"]  # step 2 never committed


def _tiered(workdir, *overrides):
    return Setup(make_cfg(workdir, "checkpoint.every=10", f"checkpoint.local_dir={workdir}/local",
                          "checkpoint.local_every=2", *overrides))


def _restore_logged(setup, init=None):
    lines = []
    with Checkpointer(setup.cfg, setup.mesh, log=lines.append) as ckpt:
        restored = ckpt.restore_or_init(init or setup.init, setup.abstract, setup.shardings,
                                        rng=RNG)
    return restored, lines


def test_local_tier_round_trip_corruption_and_another_mesh(tmp_path):
    """Local saves (each of the 8 FSDP shards of every leaf) restore bitwise; a corrupt local
    step is named and passed over; a run on another mesh cannot use them and starts over."""
    setup = _tiered(tmp_path)
    state = setup.init()
    with setup.checkpointer() as ckpt:
        ckpt.restore_or_init(lambda: state, setup.abstract, setup.shardings, rng=RNG)
        for step in (2, 4):
            assert ckpt.should_save(step)
            ckpt.save(step, state, data_state(step))
    local = tmp_path / "local"
    assert sorted(p.name for p in local.iterdir()) == ["2", "4"]
    assert not (tmp_path / "checkpoints" / "2").exists()  # the durable tier saves at 10
    assert sorted(p.name for p in (local / "4" / "process_0").iterdir()) == [
        "index.json", "jaxscale_manifest.json", "shards.bin", "state.json"]

    (restored, _, data), lines = _restore_logged(setup, init=pytest.fail)
    assert lines == [f"checkpoint: resumed from step 4 in {local} (local tier)"]
    assert data == data_state(4)
    assert_same_arrays(restored, state)

    blob = local / "4" / "process_0" / "shards.bin"
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 0xFF
    blob.write_bytes(bytes(raw))
    (restored, _, data), lines = _restore_logged(setup, init=pytest.fail)
    assert lines == [
        f"checkpoint: local step 4 in {local / '4' / 'process_0'} is corrupt (shards.bin: "
        "contents differ from the manifest (xxh3_128)); not used",
        f"checkpoint: resumed from step 2 in {local} (local tier)"]
    assert data == data_state(2)
    assert not (local / "4" / "process_0").exists()  # the run continues from step 2

    other = Setup(setup.cfg, devices=jax.devices()[:4])  # fsdp over 4 devices: other shards
    (_, _, data), lines = _restore_logged(other)
    assert data is None
    assert len(lines) == 1 and lines[0].startswith(
        f"checkpoint: local step 2 in {local / '2' / 'process_0'}: ")
    assert lines[0].endswith(" was sharded otherwise (another mesh); the durable tier is used")


def assert_same_arrays(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(unbox(a))[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(unbox(b))[0])
    for path, x in flat_a:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_b[path]), strict=True,
                                      err_msg=path_str(path))


def test_local_tier_settings_go_together(tmp_path):
    with pytest.raises(config_lib.ConfigError) as e:
        make_cfg(tmp_path, "checkpoint.local_dir=/dev/shm/x")
    assert str(e.value) == ("checkpoint.local_dir='/dev/shm/x' and checkpoint.local_every=0: the "
                            "local tier needs both (a directory on each node's own disk and an "
                            "interval)")
    with pytest.raises(config_lib.ConfigError) as e:
        make_cfg(tmp_path, "checkpoint.local_every=5")
    assert str(e.value) == ("checkpoint.local_dir='' and checkpoint.local_every=5: the local tier "
                            "needs both (a directory on each node's own disk and an interval)")
    with pytest.raises(config_lib.ConfigError) as e:
        make_cfg(tmp_path, "checkpoint.local_keep=0")
    assert str(e.value) == "checkpoint.local_keep=0 must be positive"


def test_local_tier_errors(tmp_path, monkeypatch):
    """A failed local write is raised by the next save or wait; a local step of another model
    is refused, as a durable one is."""
    from jaxscale.checkpoint import local

    setup = _tiered(tmp_path)
    state = setup.init()
    with setup.checkpointer() as ckpt:
        ckpt.restore_or_init(lambda: state, setup.abstract, setup.shardings, rng=RNG)
        ckpt.save(2, state, data_state(2))
        ckpt.wait()
        with monkeypatch.context() as m:
            m.setattr(local.verify, "write_manifest", lambda d: (_ for _ in ()).throw(
                OSError("No space left on device")))
            ckpt.save(4, state, data_state(4))
            with pytest.raises(CheckpointError) as e:
                ckpt.wait()
    assert str(e.value) == (f"saving a local checkpoint to {tmp_path / 'local'} failed: "
                            "OSError: No space left on device")
    assert not (tmp_path / "local" / "4" / "process_0").exists()

    wider = Setup(make_cfg(tmp_path, "checkpoint.every=10",
                           f"checkpoint.local_dir={tmp_path}/local", "checkpoint.local_every=2",
                           "model.d_ff=96"))
    with pytest.raises(CheckpointError) as e:
        _restore_logged(wider, init=pytest.fail)
    message = str(e.value)
    assert message.startswith(f"cannot resume from local checkpoint step 2 in "
                              f"{tmp_path / 'local'}: the model ")
    assert "model.d_ff" in message and "64" in message and "96" in message


def test_local_tier_read_refuses_other_leaves_and_shapes(tmp_path):
    from jaxscale.checkpoint.local import LocalTier

    setup = _tiered(tmp_path)
    state = setup.init()
    with setup.checkpointer() as ckpt:
        ckpt.restore_or_init(lambda: state, setup.abstract, setup.shardings, rng=RNG)
        ckpt.save(2, state, data_state(2))
    tier = LocalTier(str(tmp_path / "local"), 2, 2)
    own = tmp_path / "local" / "2" / "process_0"
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(CheckpointError) as e:
        tier.read(2, {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=sharding)})
    assert str(e.value) == (f"local checkpoint step 2 in {own} holds other parameters than this "
                            f"run's model; move {tmp_path / 'local'} away to start over")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float16, sharding=x.sharding),
                          unbox(state))
    with pytest.raises(CheckpointError) as e:
        tier.read(2, target)
    assert str(e.value) == (f"local checkpoint step 2 in {own}: step is "
                            f"int32[], this run's float16[]; move {tmp_path / 'local'} away to "
                            "start over")
