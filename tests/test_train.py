"""End to end: `jaxscale train` writes the contract's metrics, event files, plot and summary;
the CLI path is as exact as the core; bad settings fail in one line."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

from jaxscale import cli
from jaxscale import config as config_lib
from jaxscale.analysis.metrics import flops_per_token, read_jsonl
from jaxscale.run.loop import train

CONTRACT = ("step", "loss", "grad_norm", "learning_rate", "tokens_per_sec", "step_time_s", "mfu",
            "tflops_per_device")

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=64", "seq_len=16", "batch_size=16", "eval_batches=1", "progress=false",
         "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A few hundred KB of real text: this project's own sources, as separate documents."""
    root = tmp_path_factory.mktemp("corpus")
    package = pathlib.Path(cli.__file__).parent
    for i, path in enumerate(sorted(package.rglob("*.py"))):
        (root / f"doc{i:03d}.txt").write_text(path.read_text())
    return str(root)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    workdir = tmp_path_factory.mktemp("run")
    cfg = config_lib.load("tiny", SMALL + [
        "steps=6", "log_every=2", "eval_every=3", f"workdir={workdir}", f"data.path={corpus}",
    ])
    state = train(cfg)
    return workdir, state


def test_metrics_jsonl_has_the_contract_fields(run):
    workdir, state = run
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    for r in records:
        for key in CONTRACT:
            assert isinstance(r[key], (int, float)), (key, r)
        assert r["tokens_per_sec"] > 0 and r["step_time_s"] > 0 and 0 < r["mfu"] < 1
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert int(state.step) == 6


def test_rerun_of_a_finished_run_says_so(run, corpus, capsys):
    workdir, state = run
    before = (workdir / "metrics.jsonl").read_text()
    cfg = config_lib.load("tiny", SMALL + [
        "steps=6", "log_every=2", "eval_every=3", f"workdir={workdir}", f"data.path={corpus}",
    ])
    again = train(cfg)
    assert int(again.step) == 6
    assert f"{workdir} already holds step 6 of steps=6; nothing to train" in capsys.readouterr().out
    assert (workdir / "metrics.jsonl").read_text() == before


def test_tensorboard_plot_summary_and_config_written(run):
    workdir, _ = run
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    png = workdir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((workdir / "summary.json").read_text())
    records = read_jsonl(workdir / "metrics.jsonl")
    assert summary["final_loss"] == records[-1]["loss"]
    assert summary["final_eval_loss"] == records[-1]["eval_loss"]
    assert summary["peak_bytes_per_device"] > 0
    saved = config_lib.from_dict(yaml.safe_load((workdir / "config.yaml").read_text()))
    assert saved.steps == 6 and saved.model.d_model == 32
    # What a scaling fit reads: parameters by hand, untied embeddings (the token table is the
    # embedding; the output projection counts), tokens and FLOPs of the 6 steps.
    m = saved.model
    H = m.d_model // m.num_heads
    layer = (m.d_model * H * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * m.d_model * m.d_ff
             + 2 * m.d_model)
    non_embedding = m.num_layers * layer + m.d_model + m.d_model * m.vocab_size
    assert summary["params_non_embedding"] == non_embedding
    assert summary["params_total"] == non_embedding + m.vocab_size * m.d_model
    assert summary["tokens_seen"] == 6 * saved.batch_size * saved.seq_len
    per_token = flops_per_token(m, saved.seq_len).causal_per_token
    assert summary["train_flops"] == summary["tokens_seen"] * per_token


def _scalars(event_file: pathlib.Path, tag: str) -> list[float]:
    """Values of one scalar tag in a TensorBoard event file (TFRecord framing: u64 length,
    u32 crc, payload, u32 crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, values, offset = event_file.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        values += [v.simple_value for v in event.summary.value if v.tag == tag]
    return values


def test_tensorboard_events_hold_the_losses(run):
    workdir, _ = run
    (event_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    losses = _scalars(event_file, "loss")
    expected = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)


def test_plot_command(run, tmp_path, capsys):
    workdir, _ = run
    out = tmp_path / "p.png"
    assert cli.main(["plot", str(workdir), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def _cli_losses(tmp_path, name, corpus, *overrides):
    workdir = tmp_path / name
    argv = ["train", "--config", "tiny", *SMALL, "steps=5", "log_every=1", "eval_every=0",
            f"workdir={workdir}", f"data.path={corpus}", *overrides]
    assert cli.main(argv) == 0
    return [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")]


def test_cli_losses_equal_across_meshes(tmp_path, corpus):
    a = _cli_losses(tmp_path, "fsdp_tp", corpus, "mesh.fsdp=4", "mesh.tensor=2",
                    "sharding.rules=fsdp_tp")
    b = _cli_losses(tmp_path, "dp", corpus, "mesh.fsdp=1", "mesh.data=8", "sharding.rules=dp")
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert a[-1] < a[0]


def test_the_mesh_alone_picks_the_parallelism(tmp_path, corpus, capsys):
    """No rules override: sharding.rules=auto makes mesh.fsdp=4 x mesh.tensor=2 tensor-parallel
    FSDP, with the losses of plain data parallelism."""
    a = _cli_losses(tmp_path, "auto_fsdp_tp", corpus, "mesh.fsdp=4", "mesh.tensor=2")
    b = _cli_losses(tmp_path, "auto_dp", corpus, "mesh.fsdp=1", "mesh.data=8")
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(a, b, rtol=1e-5)
    capsys.readouterr()
    assert cli.main(["inspect", "--config", "tiny", *SMALL, "mesh.fsdp=4", "mesh.tensor=2"]) == 0
    out = capsys.readouterr().out
    wi = next(line for line in out.splitlines() if "params/layers/mlp/wi_up/kernel" in line)
    assert "(None, 'fsdp', 'tensor')" in wi and "embed->fsdp, mlp->tensor" in wi, wi


@pytest.mark.parametrize("args, message", [
    (["stpes=5"], "unknown config key 'stpes' (did you mean 'steps'?)"),
    (["steps=abc"], "steps: Value 'abc' of type 'str' could not be converted to Integer"),
    (["mesh.fsdp=3"], "mesh axes data=1 x stage=1 x fsdp=3 x expert=1 x sequence=1 x tensor=1 "
                      "multiply to 3 but there are 8 devices"),
    (["batch_size=12"], "batch_size=12 is not divisible by the 8 devices that shard the batch "
                        "(mesh.data=1 x mesh.fsdp=8)"),
    (["batch_size=32", "optim.grad_accum=8"],
     "the microbatch (batch_size=32 / optim.grad_accum=8 = 4) is not divisible by the 8 devices"),
    (["seq_len=2048"], "seq_len=2048 is above model.max_seq_len=1024"),
    (["--config", "tinyy"], "--config 'tinyy' is neither a preset nor a YAML file"),
    (["model.remat=ful"], "model.remat='ful' is not valid"),
    (["optim.lr=-0.1"], "optim.lr=-0.1 must be positive"),
    (["mesh.data=-1"], "at most one axis may be -1"),
    (["sharding.rules=fsdpp"], "sharding.rules='fsdpp' is not valid"),
    (["optim.name=adamm"], "optim.name='adamm' is not valid"),
    (["model.num_heads=5"], "model.d_model=128 is not divisible by model.num_heads=5"),
    (["data.path=/nonexistent/*.txt"], "data.path='/nonexistent/*.txt' matches no file"),
    # (the fsdp preset: rules=auto would use the tensor axis)
    (["mesh.fsdp=4", "mesh.tensor=2", "sharding.rules=fsdp"],
     "mesh axis 'tensor' has size 2 but neither the batch nor any parameter is sharded over it"),
    (["sharding.rules=[[batch,[data,fdsp]]]"], "sharding rule 'batch' -> 'fdsp' names a mesh axis "
                                               "that does not exist"),
    (["model.vocab_size=100"], "model.vocab_size=100 is too small for data.tokenizer='byte'"),
])
def test_bad_settings_fail_in_one_line(args, message, tmp_path, capsys):
    argv = ["train"] + (args if args[0] == "--config" else ["--config", "tiny", *args])
    argv.append(f"workdir={tmp_path / 'w'}")
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def _subprocess_env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    return env


def test_cpu_devices_flag_in_a_fresh_process(tmp_path, corpus):
    """--cpu-devices sets the device count before jax starts (checked by the mesh it builds)."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", "train", "--config", "tiny", "--cpu-devices", "4",
         *SMALL, "steps=1", "eval_every=0", f"workdir={tmp_path}", f"data.path={corpus}"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "on 4 devices" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_readme_command_learns_python(tmp_path):
    """The README's train command: tiny on 8 simulated devices with FSDP, the stdlib as text,
    ends well below the uniform-byte baseline (ln 256 = 5.55) within 10 minutes."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", "train", "--config", "tiny", "--cpu-devices", "8",
         f"workdir={tmp_path}"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_eval_loss"] <= 2.5
    assert summary["wall_time_s"] < 600
