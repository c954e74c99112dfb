"""jaxscale.run.distributed: the job layout from flags, JAXSCALE_* variables, SLURM, JobSet
and TPU VMs, and one-line errors for incomplete or inconsistent layouts. (The runtime itself is
started in tests/test_multiprocess.py.)"""

from __future__ import annotations

import pytest

from jaxscale import cli
from jaxscale.config import ConfigError
from jaxscale.run import distributed as dist
from jaxscale.run.distributed import Cluster

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
         "SLURM_STEP_NODELIST": "gpu[017-018,020],login1"}
JOBSET = {"JOBSET_NAME": "llama", "REPLICATED_JOB_NAME": "workers", "JOB_INDEX": "1",
          "JOB_COMPLETION_INDEX": "3", "REPLICATED_JOB_REPLICAS": "2",
          "JAXSCALE_NUM_PROCESSES": "8"}


def no_tpu(env):
    return dist._tpu(env, paths=lambda pattern: [], has_libtpu=lambda: False)


@pytest.fixture(autouse=True)
def _no_tpu_files(monkeypatch):
    monkeypatch.setitem(dist.DETECTORS, "tpu", no_tpu)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"HOME": "/root"}, None),
    ({"JAXSCALE_COORDINATOR": "10.0.0.1:1234", "JAXSCALE_NUM_PROCESSES": "2",
      "JAXSCALE_PROCESS_ID": "1"}, Cluster("env", "10.0.0.1:1234", 2, 1)),
    (SLURM, Cluster("slurm", "gpu017:61586", 4, 2)),
    (SLURM | {"JAXSCALE_COORDINATOR_PORT": "7000"}, Cluster("slurm", "gpu017:7000", 4, 2)),
    (SLURM | {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),  # one task: one process
    (JOBSET, Cluster("kubernetes", "llama-workers-0-0.llama:8476", 8, 7)),
    (JOBSET | {"JAXSCALE_COORDINATOR": "head:99"}, Cluster("kubernetes", "head:99", 8, 7)),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, Cluster("tpu", None, None, None)),
    (SLURM | {"JAXSCALE_DISTRIBUTED": "0"}, None),
])
def test_detect(env, expected):
    assert dist.detect(env) == expected


def test_tpu_device_files_need_the_tpu_runtime():
    accel = lambda pattern: ["/dev/accel0"] if "accel" in pattern else []  # noqa: E731
    assert dist._tpu({}, paths=accel, has_libtpu=lambda: True) == Cluster("tpu", None, None, None)
    assert dist._tpu({}, paths=accel, has_libtpu=lambda: False) is None


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("node001,node002", "node001"), ("gpu[3-5]", "gpu3"),
    ("gpu[007,010-012],cpu1", "gpu007"), ("a-b.c[1]", "a-b.c1"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert dist.first_host(nodelist) == host


def test_explicit_flags_win_over_the_environment(monkeypatch):
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    assert dist.resolve("localhost:5000", 2, 0) == Cluster("flags", "localhost:5000", 2, 0)
    assert dist.resolve().method == "slurm"


@pytest.mark.parametrize("args, env, message", [
    (("localhost:1", None, 0), {}, "--num-processes must be given with --coordinator and "
                                   "--process-id"),
    ((None, 2, None), {}, "--coordinator and --process-id must be given with --num-processes"),
    (("localhost:1", 2, 2), {}, "process id 2 is not in [0, 2) (from flags)"),
    (("localhost", 2, 0), {}, "coordinator 'localhost' must be HOST:PORT (from flags)"),
    ((None, None, None), {"JAXSCALE_COORDINATOR": "h:1"},
     "JAXSCALE_COORDINATOR set without the rest of JAXSCALE_COORDINATOR, JAXSCALE_NUM_PROCESSES, "
     "JAXSCALE_PROCESS_ID: set all three or none"),
    ((None, None, None), {"JOBSET_NAME": "x", "JOB_COMPLETION_INDEX": "0"},
     "Kubernetes JobSet job detected but JAXSCALE_NUM_PROCESSES is not set"),
    ((None, None, None), JOBSET | {"JAXSCALE_NUM_PROCESSES": "7"},
     "JAXSCALE_NUM_PROCESSES=7 is not divisible by REPLICATED_JOB_REPLICAS=2"),
    ((None, None, None), {"JAXSCALE_COORDINATOR": "h:1", "JAXSCALE_NUM_PROCESSES": "two",
                          "JAXSCALE_PROCESS_ID": "0"}, "JAXSCALE_NUM_PROCESSES='two' must be an "
                                                      "integer"),
])
def test_bad_layouts_fail_with_one_line(args, env, message):
    with pytest.raises(ConfigError) as info:
        dist.resolve(*args, env=env)
    assert str(info.value) == message


def test_cli_reports_a_bad_layout_before_starting(tmp_path, capsys):
    code = cli.main(["train", "--config", "tiny", "--coordinator", "localhost:1234",
                     "--process-id", "0", f"workdir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG and err.count("\n") == 1
    assert "--num-processes must be given with --coordinator and --process-id" in err


def test_single_process_starts_nothing(monkeypatch):
    for k in list(SLURM) + list(JOBSET) + ["JAXSCALE_COORDINATOR", "TPU_WORKER_HOSTNAMES"]:
        monkeypatch.delenv(k, raising=False)
    assert dist.initialize() is None
