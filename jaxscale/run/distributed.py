"""Multi-host start-up: find this process's place in the job, start JAX's multi-controller runtime.

Every host runs the same program; `initialize()` must run in each before any JAX computation. It
takes the job's layout from, in order:

  flags        ``--coordinator HOST:PORT --num-processes N --process-id I`` (all three)
  environment  JAXSCALE_COORDINATOR, JAXSCALE_NUM_PROCESSES, JAXSCALE_PROCESS_ID (all three)
  slurm        inside ``srun``: SLURM_NTASKS > 1, SLURM_PROCID; the coordinator is the first host
               of SLURM_STEP_NODELIST (port JAXSCALE_COORDINATOR_PORT, or derived from the job id)
  kubernetes   a JobSet pod: JOB_COMPLETION_INDEX (set by Kubernetes for indexed jobs) with
               JOBSET_NAME and JAXSCALE_NUM_PROCESSES (see scripts/jobset.yaml)
  tpu          a Cloud TPU VM (TPU_WORKER_* variables, or TPU device files and libtpu): JAX's own
               detection asks the TPU metadata for the rest

and none of these means a single process (nothing to start). ``JAXSCALE_DISTRIBUTED=0`` turns the
detection off. On CPU, the processes' devices exchange collectives through gloo
(``jax_cpu_collectives_implementation``), which is what lets several processes on one machine run
the multi-host code path.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from collections.abc import Callable, Mapping

from jaxscale.errors import ConfigError

ENV_COORDINATOR = "JAXSCALE_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSCALE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSCALE_PROCESS_ID"
ENV_PORT = "JAXSCALE_COORDINATOR_PORT"
ENV_SWITCH = "JAXSCALE_DISTRIBUTED"
DEFAULT_PORT = 8476


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process sits in a multi-process job.

    Fields left None are filled in by JAX's own cluster detection (TPU VMs).
    """

    method: str  # flags | env | slurm | kubernetes | tpu
    coordinator: str | None  # HOST:PORT of process 0's coordination service
    num_processes: int | None
    process_id: int | None

    def describe(self) -> str:
        if self.process_id is None:
            return f"{self.method} (layout from JAX's cluster detection)"
        return (f"process {self.process_id} of {self.num_processes} ({self.method}), coordinator "
                f"{self.coordinator}")


def _int(env: Mapping[str, str], name: str, method: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ConfigError(f"{method} job detected but {name} is not set") from None
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} must be an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'node[003-005,9],gpu1' -> 'node003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"SLURM node list {nodelist!r} is not understood")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def _from_env(env: Mapping[str, str]) -> Cluster | None:
    if not all(n in env for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        return None  # a part may be completed by another detector (Kubernetes), see `detect`
    return Cluster("env", env[ENV_COORDINATOR], _int(env, ENV_NUM_PROCESSES, "env"),
                   _int(env, ENV_PROCESS_ID, "env"))


def _slurm(env: Mapping[str, str]) -> Cluster | None:
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return None
    count = _int(env, "SLURM_NTASKS", "SLURM")
    if count <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise ConfigError("SLURM job detected but neither SLURM_STEP_NODELIST nor "
                          "SLURM_JOB_NODELIST is set; launch with srun")
    # The same port on every process without talking: from the job id, like JAX's own detection.
    port = env.get(ENV_PORT) or str(int(env["SLURM_JOB_ID"]) % 4096 + 61440)
    return Cluster("slurm", f"{first_host(nodes)}:{port}", count,
                   _int(env, "SLURM_PROCID", "SLURM"))


def _kubernetes(env: Mapping[str, str]) -> Cluster | None:
    if "JOB_COMPLETION_INDEX" not in env or "JOBSET_NAME" not in env:
        return None
    count = _int(env, ENV_NUM_PROCESSES, "Kubernetes JobSet")
    replicas = int(env.get("REPLICATED_JOB_REPLICAS", "1"))
    if count % replicas:
        raise ConfigError(f"{ENV_NUM_PROCESSES}={count} is not divisible by "
                          f"REPLICATED_JOB_REPLICAS={replicas}")
    process = (int(env.get("JOB_INDEX", "0")) * (count // replicas)
               + _int(env, "JOB_COMPLETION_INDEX", "Kubernetes JobSet"))
    name, job = env["JOBSET_NAME"], env.get("REPLICATED_JOB_NAME", "workers")
    # JobSet gives pod <jobset>-<replicated job>-<job index>-<pod index> the DNS name
    # <pod>.<jobset> (its headless service): process 0 is job 0, pod 0.
    port = env.get(ENV_PORT, DEFAULT_PORT)
    coordinator = env.get(ENV_COORDINATOR) or f"{name}-{job}-0-0.{name}:{port}"
    return Cluster("kubernetes", coordinator, count, process)


def _has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _tpu(
    env: Mapping[str, str],
    paths: Callable[[str], list[str]] = glob.glob,
    has_libtpu: Callable[[], bool] = _has_libtpu,
) -> Cluster | None:
    markers = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS")
    if any(m in env for m in markers):
        return Cluster("tpu", None, None, None)
    # TPU chips appear as /dev/accel* (v2-v4) or VFIO groups (v5e and later); VFIO groups exist on
    # other machines too, so also ask for the TPU runtime.
    if (paths("/dev/accel*") or paths("/dev/vfio/[0-9]*")) and has_libtpu():
        return Cluster("tpu", None, None, None)
    return None


# Tried in order; the first that recognises the environment wins.
DETECTORS: dict[str, Callable[[Mapping[str, str]], Cluster | None]] = {
    "env": _from_env,
    "slurm": _slurm,
    "kubernetes": _kubernetes,
    "tpu": _tpu,
}


def detect(env: Mapping[str, str] | None = None) -> Cluster | None:
    """The multi-process layout the environment describes, or None for a single process."""
    env = os.environ if env is None else env
    if env.get(ENV_SWITCH, "1").lower() in ("0", "false", "off", "no"):
        return None
    for detector in DETECTORS.values():
        cluster = detector(env)
        if cluster is not None:
            return cluster
    partial = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if n in env]
    if partial:
        raise ConfigError(f"{', '.join(partial)} set without the rest of {ENV_COORDINATOR}, "
                          f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}: set all three or none")
    return None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Cluster | None:
    """The layout from explicit flags (all three or none), else from the environment."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be given with "
                              f"{' and '.join(k for k in given if k not in missing)}")
        cluster = Cluster("flags", coordinator, num_processes, process_id)
    else:
        cluster = detect(env)
    if cluster is None or cluster.process_id is None:
        return cluster
    if cluster.num_processes < 1 or not 0 <= cluster.process_id < cluster.num_processes:
        raise ConfigError(f"process id {cluster.process_id} is not in [0, {cluster.num_processes})"
                          f" (from {cluster.method})")
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", cluster.coordinator or ""):
        raise ConfigError(f"coordinator {cluster.coordinator!r} must be HOST:PORT "
                          f"(from {cluster.method})")
    return cluster


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu: bool | None = None,
    timeout_s: int = 300,
) -> Cluster | None:
    """Start JAX's multi-controller runtime when this is a multi-process job.

    Call it in every process before any other JAX work (the CLI does, from its flags).

    Args:
      coordinator, num_processes, process_id: the explicit layout (all three or none); none means
        detect it (see the module docstring).
      cpu: the processes compute on CPU devices (collectives through gloo); None: when
        ``JAX_PLATFORMS`` is "cpu".
      timeout_s: how long to wait for every process to reach the coordinator.

    Returns:
      The layout, or None when this is a single-process run (nothing is started).

    Example: two processes of 4 simulated CPU devices each on one machine::

        jaxscale train --cpu-devices 4 --coordinator localhost:8476 --num-processes 2 --process-id 0
        jaxscale train --cpu-devices 4 --coordinator localhost:8476 --num-processes 2 --process-id 1
    """
    cluster = resolve(coordinator, num_processes, process_id)
    if cluster is None:
        return None
    import jax

    if cpu is None:
        cpu = os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    if cpu and "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict = {"initialization_timeout": timeout_s}
    if cluster.process_id is not None:
        # Everything is given: keep JAX's detection from overriding it (on a SLURM node it would
        # also pin each process to one local device).
        kwargs.update(coordinator_address=cluster.coordinator,
                      num_processes=cluster.num_processes, process_id=cluster.process_id,
                      cluster_detection_method="deactivate")
    jax.distributed.initialize(**kwargs)
    return cluster
