"""The launcher's GPU XLA flags: added only where wanted, never over the user's, and every one
of them parsed by this jaxlib (an unknown flag aborts the process)."""

import os
import subprocess
import sys

from jaxscale import xla_flags


def test_adds_every_flag_for_a_gpu_run():
    env = {}
    added = xla_flags.apply_gpu_flags(env)
    assert len(added) == len(xla_flags.GPU_FLAGS)
    assert env["XLA_FLAGS"].split() == added
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in added


def test_user_flags_win():
    env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d"}
    added = xla_flags.apply_gpu_flags(env)
    flags = env["XLA_FLAGS"].split()
    assert flags[:2] == ["--xla_gpu_enable_latency_hiding_scheduler=false", "--xla_dump_to=/tmp/d"]
    assert not any("latency_hiding" in f for f in added)
    assert len(added) == len(xla_flags.GPU_FLAGS) - 1


def test_no_op_for_cpu_runs_and_when_disabled():
    for env in ({"JAX_PLATFORMS": "cpu"}, {"JAX_PLATFORMS": "tpu"},
                {"JAXSCALE_NO_XLA_FLAGS": "1"}):
        before = dict(env)
        assert xla_flags.apply_gpu_flags(env) == []
        assert env == before
    assert xla_flags.gpu_flags_wanted({"JAX_PLATFORMS": "cuda,cpu"})


def test_this_jaxlib_parses_every_flag():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f"--{k}={v}" for k, v in xla_flags.GPU_FLAGS.items())
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.strip() == "3.0"
