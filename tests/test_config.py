"""Config loading: presets, YAML files, overrides, and one-line errors for bad values."""

import dataclasses

import pytest
import yaml

from jaxscale import config as config_lib
from jaxscale.config import Config, ConfigError
from jaxscale.core import dtypes, optim, remat, sharding


def test_presets_ship_and_load():
    assert {"tiny", "gpt2-small", "llama-1b", "llama-8b"} <= set(config_lib.presets())
    for name in config_lib.presets():
        cfg = config_lib.load(name)
        assert isinstance(cfg, Config)


def test_overrides_convert_types():
    cfg = config_lib.load("tiny", ["steps=7", "optim.lr=1e-3", "model.scan_layers=false",
                                   "profile.steps=[2,4]", "mesh.fsdp=4", "mesh.tensor=2"])
    assert cfg.steps == 7 and isinstance(cfg.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.scan_layers is False
    assert cfg.profile.steps == (2, 4)
    assert (cfg.mesh.fsdp, cfg.mesh.tensor) == (4, 2)


def test_config_is_frozen():
    cfg = config_lib.load("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3


def test_yaml_file_with_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny\nsteps: 11\nmodel:\n  d_model: 64\n")
    cfg = config_lib.load(str(path), ["seed=3"])
    assert (cfg.steps, cfg.model.d_model, cfg.seed) == (11, 64, 3)
    assert cfg.model.num_layers == config_lib.load("tiny").model.num_layers


def test_round_trip_through_yaml():
    cfg = config_lib.load("llama-1b", ["sharding.rules=[[batch,[data,fsdp]],[embed,fsdp]]"])
    again = config_lib.from_dict(yaml.safe_load(config_lib.to_yaml(cfg)))
    assert again == cfg


def test_choice_tables_match_the_implementations():
    assert set(config_lib.REMAT_POLICIES) == set(remat.POLICIES)
    assert set(config_lib.OPTIMIZERS) == set(optim.OPTIMIZERS)
    assert set(config_lib.SCHEDULES) == set(optim.SCHEDULES)
    assert set(config_lib.RULE_PRESETS) == set(sharding.RULE_PRESETS)


def test_dtype_names_are_the_dtype_table():
    assert config_lib.DTYPES == tuple(dtypes.DTYPES)


def test_head_count_defaults():
    m = config_lib.load("tiny", ["model.num_heads=4", "model.num_kv_heads=0",
                                 "model.head_dim=0"]).model
    assert (m.kv_heads, m.head_size) == (4, m.d_model // 4)
    m = config_lib.load("tiny", ["model.num_heads=4", "model.num_kv_heads=2",
                                 "model.head_dim=16"]).model
    assert (m.kv_heads, m.head_size) == (2, 16)


@pytest.mark.parametrize("overrides, message", [
    (["stpes=3"], "unknown config key 'stpes' (did you mean 'steps'?)"),
    (["model.dmodel=3"], "unknown config key 'model.dmodel' (did you mean 'd_model'?)"),
    (["steps=abc"], "steps: Value 'abc' of type 'str' could not be converted to Integer"),
    (["steps=0"], "steps=0 must be positive"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be positive"),
    (["model.remat=ful"], "model.remat='ful' is not valid; choose one of: none, full, minimal, "
                          "save_dots, save_qkv_proj, save_attn_out, save_mlp, offload_dots "
                          "(did you mean 'full'?)"),
    (["optim.name=adamm"], "optim.name='adamm' is not valid; choose one of: adamw, lion, "
                           "adafactor, sgd (did you mean 'adamw'?)"),
    (["sharding.rules=fsdpp"], "sharding.rules='fsdpp' is not valid; choose one of: auto, dp, "
                               "fsdp, tp, fsdp_tp, hsdp (did you mean 'fsdp'?)"),
    (["seq_len=4096"], "seq_len=4096 is above model.max_seq_len=1024; lower seq_len or raise "
                       "model.max_seq_len"),
    (["mesh.data=-1"], "mesh axes mesh.data, mesh.fsdp are all -1; at most one axis may be -1"),
    (["mesh.tensor=0"], "mesh.tensor=0 must be a positive size (or -1 for the remaining devices)"),
    (["model.num_heads=5"], "model.d_model=128 is not divisible by model.num_heads=5"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3 must divide model.num_heads=4"),
    (["model.dtype=float8"], "model.dtype='float8' is not valid; choose one of: float32, "
                             "bfloat16, float16"),
    (["optim.grad_accum=3"], "batch_size=32 is not divisible by optim.grad_accum=3"),
    (["on_nonfinite=ignore"], "on_nonfinite='ignore' is not valid; choose one of: abort, skip"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5 must be in [0, 1)"),
    (["profile.steps=[5,2]"], "profile.steps=[5, 2] must be [start, stop] with 0 <= start < stop"),
    (["steps"], "override 'steps' is not of the form key=value"),
    (["model.scan_unroll=0"], "model.scan_unroll=0 must be positive"),
    (["model.scan_unroll=2", "model.scan_layers=false"],
     "model.scan_unroll=2 unrolls the scan over the layers: it needs model.scan_layers=true"),
    (["sharding.rules=[[embed]]"], "sharding.rules entry ['embed'] must be [logical_name, "
                                   "mesh_axis | [mesh_axes] | null]"),
])
def test_bad_values_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_lib.load("tiny", overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match=r"--config 'tinyy' is neither a preset nor a YAML file; "
                                          r"presets: .*tiny.* \(did you mean 'tiny'\?\)"):
        config_lib.load("tinyy")


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match=r"--config '/nonexistent/x.yaml': no such file"):
        config_lib.load("/nonexistent/x.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config_lib.load(str(path))
