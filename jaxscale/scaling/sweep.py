"""Sweeps: many training runs of one base config, planned from a spec, run and resumed together.

    jaxscale sweep SPEC --dir SWEEP_DIR [--workers N] [--executor local|ray|slurm] [--dry-run]
        [key=value ...]

A spec is a YAML file (or the name of one shipped in `jaxscale/configs/sweeps/`):

    base: tiny                      # preset or config YAML every point starts from
    overrides: [steps=20]           # applied to every point (then the command line's key=value)
    grid: {model.d_model: [32, 64], model.num_layers: [2, 4]}  # the cross product, in order
    points: [[model.d_model=96], {model.d_model: 128}]         # explicit points, after the grid
    min_steps: 10                   # isoflop points planned with fewer steps are dropped

or, instead of grid and points, an isoflop plan: ``isoflop: {budgets: [C, ...], sizes: [[...],
...] or a grid-like dict}``. Every (budget, size) point trains for
``steps = round(C / (6 N batch_size seq_len))``, where N is the decoder's matmul parameter count
(`flops_per_token(...).matmul_params`: embeddings as lookups are free, the output projection is
not), so C is the 6ND estimate of its training FLOPs; attention FLOPs are left out, as in the
Chinchilla fits. Such a point also gets ``eval_every=steps`` (one evaluation, at the end, on the
same held-out batches for every size) and ``checkpoint.every=max(1, steps // 4)`` (an interrupted
point loses at most a quarter of its run).

Every point's config is loaded (and so validated) before anything runs. Point i (counted from 1)
is named by its own overrides (``d_model=32-num_layers=2``; isoflop: ``C=1e+11-d_model=32``) and
trains in ``SWEEP_DIR/<name>``, its output in ``<name>/train.log``. ``SWEEP_DIR/manifest.json``
holds the spec and every point's status (pending, running, done, failed), exit code, last log
lines and wall time; it is rewritten atomically as points start and finish.

A rerun skips the points whose summary.json records their planned steps and reruns the others,
which resume from their own checkpoints. The sweep runs every point it can; it exits 0 when all
are done and 1 when any failed (the manifest says which, and how).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from jaxscale import config as config_lib
from jaxscale.data.shards import write_atomic
from jaxscale.errors import ConfigError
from jaxscale.validation import did_you_mean

SWEEPS_DIR = pathlib.Path(config_lib.__file__).parent / "configs" / "sweeps"
SPEC_KEYS = ("base", "overrides", "grid", "points", "isoflop", "min_steps")
ISOFLOP_KEYS = ("budgets", "sizes")
EXECUTORS = ("local", "ray", "slurm")
LOG_TAIL_LINES = 20  # lines of a failed point's train.log kept in the manifest
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a child gets when its parent thread exits


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    name: str  # unique, filesystem-safe; the point's directory under SWEEP_DIR
    own: tuple[str, ...]  # the overrides that set this point apart (what names it)
    overrides: tuple[str, ...]  # everything given to `jaxscale train` after --config, in order
    steps: int  # planned optimizer steps: the point is done when summary.json records them
    flops: float | None  # 6ND training FLOPs (decoder models; None for others)
    budget: float | None = None  # an isoflop point's planned C, which `jaxscale fit` groups by


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A spec expanded into its points."""

    spec: dict  # the spec as read
    base: str  # --config of every point
    points: tuple[Point, ...]
    notes: tuple[str, ...]  # isoflop points dropped, one line each


def find_spec(name_or_path: str) -> pathlib.Path:
    """The spec file: a path, a shipped spec's name, or a missing `.../X.yaml` whose file name
    is a shipped spec (so ``configs/sweeps/tiny-grid.yaml`` works from any directory)."""
    path = pathlib.Path(name_or_path)
    shipped = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    for candidate in (path, SWEEPS_DIR / f"{name_or_path}.yaml", SWEEPS_DIR / path.name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"sweep spec {name_or_path!r} is neither a file nor a shipped spec; "
                      f"shipped: {', '.join(shipped)}" + did_you_mean(path.stem, shipped))


def load_spec(name_or_path: str) -> dict:
    """Read a spec (see `find_spec`); a base given as a relative YAML path is taken relative to
    the spec's directory when it is there."""
    path = find_spec(name_or_path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep spec {str(path)!r} is not valid YAML: "
                          f"{' '.join(str(e).split())}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep spec {str(path)!r} must be a mapping with keys: "
                          f"{', '.join(SPEC_KEYS)}")
    base = str(spec.get("base", ""))
    if base.endswith((".yaml", ".yml")) and (path.parent / base).is_file():
        spec["base"] = str((path.parent / base).resolve())
    return spec


def _as_overrides(item: Any, where: str) -> list[str]:
    """A list of ``key=value`` strings or a {key: value} mapping, as ``key=value`` strings."""
    if isinstance(item, dict):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in item.items()]
    if isinstance(item, list) and all(isinstance(s, str) and "=" in s for s in item):
        return list(item)
    raise ConfigError(f"sweep spec: {where} must be a list of key=value strings or a mapping, "
                      f"got {item!r}")


def _grid(grid: Any, where: str) -> list[list[str]]:
    """The cross product of a {key: [values]} mapping, the last key varying fastest."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"sweep spec: {where} is empty; give each key a non-empty list of "
                          "values, e.g. {model.d_model: [32, 64]}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep spec: {where} key '{key}' needs a non-empty list of "
                              f"values, got {values!r}")
    return [_as_overrides(dict(zip(grid, combo, strict=True)), where)
            for combo in itertools.product(*grid.values())]


def _name(own: Sequence[str]) -> str:
    """``model.d_model=32, seq_len=64`` -> ``d_model=32-seq_len=64`` (keys by their last part;
    characters other than letters, digits and ``.=+_`` become ``_``)."""
    parts = [f"{k.rpartition('.')[2]}={v}" for k, _, v in (s.partition("=") for s in own)]
    return re.sub(r"[^A-Za-z0-9.=+_-]", "_", "-".join(parts)) or "base"


def _decoder_flops_per_step(cfg: config_lib.Config) -> float | None:
    """6 N x tokens per step for the decoder (None for other models)."""
    if not isinstance(cfg.model, config_lib.ModelConfig):
        return None
    from jaxscale.analysis.metrics import flops_per_token  # imports jax: only when needed

    n_params = flops_per_token(cfg.model, cfg.seq_len).matmul_params
    return 6.0 * n_params * cfg.batch_size * cfg.seq_len


def _load_point(base: str, overrides: Sequence[str], index: int,
                own: Sequence[str]) -> config_lib.Config:
    try:
        return config_lib.load(base, overrides)
    except ConfigError as e:
        raise ConfigError(f"sweep point {index} ({' '.join(own) or 'base'}): {e}") from None


def expand(spec: dict, extra_overrides: Sequence[str] = ()) -> Sweep:
    """Check a spec and plan its points (loading every point's config, which validates it).

    Args:
      spec: the parsed spec (see the module docstring).
      extra_overrides: ``key=value`` strings applied to every point after the spec's.

    Returns:
      The Sweep, points in order: the grid's, then the listed points (or the isoflop plan,
      budget by budget).

    Raises:
      ConfigError: one line: an unknown spec key, an empty grid, a bad point (its index and
        overrides, then the config's own message), or an isoflop plan with no point left.
    """
    for key in spec:
        if key not in SPEC_KEYS:
            raise ConfigError(f"sweep spec: unknown key '{key}'" + did_you_mean(key, SPEC_KEYS)
                              + f"; valid keys: {', '.join(SPEC_KEYS)}")
    if "base" not in spec:
        raise ConfigError("sweep spec: 'base' is missing: name a preset or a config YAML")
    base = str(spec["base"])
    common = _as_overrides(spec.get("overrides", []), "overrides") + list(extra_overrides)
    if any(s.partition("=")[0] == "workdir" for s in common):
        raise ConfigError("sweep spec: workdir is set per point (SWEEP_DIR/<name>); drop the "
                          "workdir override and pass --dir")
    if "isoflop" in spec:
        if "grid" in spec or "points" in spec:
            raise ConfigError("sweep spec: isoflop takes the place of grid and points; give one")
        return _expand_isoflop(spec, base, common)
    owns = _grid(spec["grid"], "grid") if "grid" in spec else []
    owns += [_as_overrides(p, f"points[{i}]") for i, p in enumerate(spec.get("points", []))]
    if not owns:
        raise ConfigError("sweep spec: no points: give grid, points or isoflop")
    points = []
    for i, own in enumerate(owns, 1):
        cfg = _load_point(base, common + own, i, own)
        per_step = _decoder_flops_per_step(cfg)
        points.append(Point(_name(own), tuple(own), tuple(common + own), cfg.steps,
                            None if per_step is None else per_step * cfg.steps))
    return Sweep(spec, base, _unique(points), ())


def _expand_isoflop(spec: dict, base: str, common: list[str]) -> Sweep:
    iso = spec["isoflop"]
    if not isinstance(iso, dict):
        raise ConfigError(f"sweep spec: isoflop must be a mapping with keys "
                          f"{', '.join(ISOFLOP_KEYS)}, got {iso!r}")
    for key in iso:
        if key not in ISOFLOP_KEYS:
            raise ConfigError(f"sweep spec: unknown key 'isoflop.{key}'"
                              + did_you_mean(key, ISOFLOP_KEYS)
                              + f"; valid keys: {', '.join(ISOFLOP_KEYS)}")
    budgets = iso.get("budgets")
    if not (isinstance(budgets, list) and budgets
            and all(isinstance(c, (int, float)) and c > 0 for c in budgets)):
        raise ConfigError(f"sweep spec: isoflop.budgets must be a non-empty list of positive "
                          f"FLOP counts, got {budgets!r}")
    sizes = iso.get("sizes")
    if isinstance(sizes, dict):
        sizes = _grid(sizes, "isoflop.sizes")
    elif isinstance(sizes, list) and sizes:
        sizes = [_as_overrides(s, f"isoflop.sizes[{i}]") for i, s in enumerate(sizes)]
    else:
        raise ConfigError(f"sweep spec: isoflop.sizes must be a non-empty list of override "
                          f"lists or a grid mapping, got {sizes!r}")
    min_steps = int(spec.get("min_steps", 10))
    per_step = []
    for i, size in enumerate(sizes, 1):
        cfg = _load_point(base, common + size, i, size)
        flops = _decoder_flops_per_step(cfg)
        if flops is None:
            raise ConfigError(f"sweep spec: isoflop needs the decoder model (6ND); "
                              f"size {i} has model.name={cfg.model.name!r}")
        per_step.append(flops)
    points, notes = [], []
    for budget, (size, flops) in itertools.product(budgets, zip(sizes, per_step, strict=True)):
        steps = round(budget / flops)
        name = _name([f"C={budget:g}", *size])
        if steps < min_steps:
            notes.append(f"dropped {name}: {steps} steps < min_steps={min_steps}")
            continue
        plan = [f"steps={steps}", f"eval_every={steps}", f"checkpoint.every={max(1, steps // 4)}"]
        _load_point(base, common + size + plan, len(points) + 1, size + plan)
        points.append(Point(name, tuple(size), tuple(common + size + plan), steps,
                            flops * steps, float(budget)))
    if not points:
        raise ConfigError(f"sweep spec: every isoflop point has fewer than min_steps={min_steps} "
                          "steps; raise the budgets or shrink the sizes")
    return Sweep(spec, base, _unique(points), tuple(notes))


def _unique(points: list[Point]) -> tuple[Point, ...]:
    """Names made unique by a -2, -3, ... suffix on repeats (in order)."""
    seen: dict[str, int] = {}
    out = []
    for p in points:
        seen[p.name] = seen.get(p.name, 0) + 1
        name = p.name if seen[p.name] == 1 else f"{p.name}-{seen[p.name]}"
        out.append(dataclasses.replace(p, name=name))
    return tuple(out)


def command(sweep: Sweep, point: Point, sweep_dir: pathlib.Path,
            program: Sequence[str] = (sys.executable, "-m", "jaxscale.cli")) -> list[str]:
    """The `jaxscale train` command line of a point."""
    return [*program, "train", "--config", sweep.base, *point.overrides,
            f"workdir={sweep_dir / point.name}"]


def is_done(point: Point, sweep_dir: pathlib.Path) -> bool:
    """Whether the point's summary.json records its planned steps."""
    try:
        summary = json.loads((sweep_dir / point.name / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("steps") == point.steps


def point_env() -> dict[str, str]:
    """The environment of a point's process: one simulated CPU device unless XLA_FLAGS already
    sets a count (each point is its own process; N of them share the host's cores)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
    return env


# Run as `python -c _DIE_WITH_PARENT PARENT_PID PROGRAM ARGS...` (Linux): ask for SIGKILL when
# the thread that started it exits, give up if that parent is already gone, then become PROGRAM.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_parent(cmd: Sequence[str]) -> list[str]:
    """`cmd`, on Linux behind a tiny exec wrapper that makes it die with the thread that starts
    it: a sweep killed with -9 then leaves no point training on in a workdir its rerun resumes
    in. (A wrapper, not `preexec_fn`: forking a threaded process to run Python code before exec
    is unsafe.) Elsewhere `cmd` as it is: a killed sweep's points run to their end there."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


def run_point(cmd: Sequence[str], log_path: str, env: dict[str, str],
              cwd: str) -> tuple[int, float]:
    """Run one point in `cwd`, appending its stdout and stderr to `log_path` (the cwd is explicit
    because a Ray worker's differs from the sweep's); (exit code, wall seconds). The point's
    process dies with the calling thread (`dying_with_parent`), which waits on it throughout."""
    start = time.monotonic()
    with open(log_path, "ab") as log:
        rc = subprocess.run(dying_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd).returncode
    return rc, time.monotonic() - start


class Manifest:
    """SWEEP_DIR/manifest.json, rewritten atomically (under a lock) on every change, and the
    progress lines on stderr. A point found done keeps the exit code and wall time that the
    previous manifest recorded for it."""

    def __init__(self, sweep: Sweep, sweep_dir: pathlib.Path):
        self.path, self.lock = sweep_dir / "manifest.json", threading.Lock()
        try:
            before = {e["name"]: e for e in json.loads(self.path.read_text())["points"]}
        except (OSError, ValueError, KeyError, TypeError):
            before = {}
        self.doc = {"spec": sweep.spec, "base": sweep.base, "points": []}
        for p in sweep.points:
            done = is_done(p, sweep_dir)
            last = before.get(p.name, {}) if done else {}
            self.doc["points"].append({
                "name": p.name, "overrides": list(p.overrides), "workdir": str(sweep_dir / p.name),
                "steps": p.steps, "flops": p.flops, "budget": p.budget,
                "status": "done" if done else "pending",
                "exit_code": last.get("exit_code"), "error_tail": "", "wall_s": last.get("wall_s")})
        self.write()

    def entry(self, i: int) -> dict:
        return self.doc["points"][i]

    def update(self, i: int, **fields: Any) -> None:
        with self.lock:
            self.doc["points"][i].update(fields)
            self.write()
            counts = {s: sum(e["status"] == s for e in self.doc["points"])
                      for s in ("done", "failed", "running")}
            print(f"sweep: {counts['done']}/{len(self.doc['points'])} done, {counts['failed']} "
                  f"failed, {counts['running']} running", file=sys.stderr, flush=True)

    def write(self) -> None:
        write_atomic(self.path, (json.dumps(self.doc, indent=2) + "\n").encode())

    def finish(self, i: int, rc: int, wall_s: float) -> None:
        log = pathlib.Path(self.entry(i)["workdir"]) / "train.log"
        tail = "" if rc == 0 else "\n".join(
            log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        self.update(i, status="done" if rc == 0 else "failed", exit_code=rc, error_tail=tail,
                    wall_s=round(wall_s, 3))


def _run_local(jobs: list[tuple[int, list[str]]], manifest: Manifest,
               args: argparse.Namespace) -> None:
    """At most --workers points at once, each a subprocess."""
    env = point_env()

    def one(i: int, cmd: list[str]) -> None:
        manifest.update(i, status="running")
        manifest.finish(i, *run_point(cmd, str(_log(manifest, i)), env, os.getcwd()))

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
        for future in [pool.submit(one, i, cmd) for i, cmd in jobs]:
            future.result()


def _run_ray(jobs: list[tuple[int, list[str]]], manifest: Manifest,
             args: argparse.Namespace) -> None:
    """Each point a Ray task running the same subprocess; a task is 'running' once handed to
    Ray (it may wait there for free CPUs or GPUs)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor=ray needs ray: pip install 'jaxscale[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=args.ray_address)  # None: attach to a running local cluster or start one
    task = ray.remote(num_cpus=args.cpus_per_point, num_gpus=args.gpus_per_point)(run_point)
    env = point_env()
    refs = {}
    for i, cmd in jobs:
        refs[task.remote(cmd, str(_log(manifest, i)), env, os.getcwd())] = i
        manifest.update(i, status="running")
    while refs:
        (ready,), _ = ray.wait(list(refs), num_returns=1)
        manifest.finish(refs.pop(ready), *ray.get(ready))


def _log(manifest: Manifest, i: int) -> pathlib.Path:
    workdir = pathlib.Path(manifest.entry(i)["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir / "train.log"


def write_slurm(sweep: Sweep, jobs: list[tuple[int, list[str]]], sweep_dir: pathlib.Path,
                args: argparse.Namespace) -> pathlib.Path:
    """SWEEP_DIR/points.txt (one shell command per pending point) and SWEEP_DIR/sweep.sbatch, an
    array job whose task k runs line k+1. Like scripts/launch_slurm.sh: `jaxscale train` from
    the submit directory, and SIGTERM 120 s before the time limit so a point checkpoints and
    exits 4; rerun the sweep to resubmit what is not done."""
    lines = [f"{shlex.join(cmd)} >> {shlex.quote(str(sweep_dir / sweep.points[i].name))}"
             f"/train.log 2>&1" for i, cmd in jobs]
    write_atomic(sweep_dir / "points.txt", "".join(line + "\n" for line in lines).encode())
    gpus = f"#SBATCH --gpus-per-task={args.gpus_per_point}\n" if args.gpus_per_point else ""
    script = sweep_dir / "sweep.sbatch"
    write_atomic(script, (
        "#!/usr/bin/env bash\n"
        f"# {len(jobs)} points of the sweep {sweep_dir}: array task k runs line k+1 of "
        "points.txt.\n"
        "#SBATCH --job-name=jaxscale-sweep\n"
        f"#SBATCH --array=0-{len(jobs) - 1}\n"
        "#SBATCH --ntasks=1\n"
        f"#SBATCH --cpus-per-task={args.cpus_per_point}\n{gpus}"
        "#SBATCH --signal=TERM@120\n"
        f"#SBATCH --output={sweep_dir.resolve()}/slurm-%A_%a.log\n"
        "set -euo pipefail\n"
        'cd "${SLURM_SUBMIT_DIR:-.}"\n'
        f'eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" '
        f'{shlex.quote(str((sweep_dir / "points.txt").resolve()))})"\n').encode())
    return script


def format_plan(sweep: Sweep, sweep_dir: pathlib.Path) -> str:
    """One line per point: index, status, name, steps, 6ND FLOPs, overrides."""
    rows = [f"{i:>3} {'done' if is_done(p, sweep_dir) else 'pending':<8} {p.name:<40} "
            f"steps {p.steps:>7}  FLOPs {'n/a' if p.flops is None else f'{p.flops:.3g}':>9}  "
            f"{' '.join(p.overrides)}" for i, p in enumerate(sweep.points, 1)]
    return "\n".join([*sweep.notes, *rows])


EXECUTE: dict[str, Callable[[list, Manifest, argparse.Namespace], None]] = {
    "local": _run_local, "ray": _run_ray,
}


def cmd_sweep(args: argparse.Namespace) -> int:
    """`jaxscale sweep`: 0 when every point is done, 1 when any failed (all are tried)."""
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be at least 1")
    sweep = expand(load_spec(args.spec), getattr(args, "overrides", ()))
    sweep_dir = pathlib.Path(args.dir)
    if args.dry_run:
        print(format_plan(sweep, sweep_dir))
        return 0
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(sweep, sweep_dir)
    for note in sweep.notes:
        print(f"sweep: {note}", file=sys.stderr)
    jobs = [(i, command(sweep, p, sweep_dir)) for i, p in enumerate(sweep.points)
            if manifest.entry(i)["status"] != "done"]
    print(f"sweep: {len(sweep.points) - len(jobs)} of {len(sweep.points)} points already done",
          file=sys.stderr, flush=True)
    if not jobs:
        return 0
    if args.executor == "slurm":
        jobs = [(i, command(sweep, sweep.points[i], sweep_dir, ("jaxscale",))) for i, _ in jobs]
        script = write_slurm(sweep, jobs, sweep_dir, args)
        if args.submit and shutil.which("sbatch"):
            return subprocess.run(["sbatch", str(script)]).returncode
        missing = "sbatch is not on PATH; " if args.submit else ""
        print(f"{missing}submit with: sbatch {script}")
        return 0
    EXECUTE[args.executor](jobs, manifest, args)
    return 1 if any(e["status"] == "failed" for e in manifest.doc["points"]) else 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the `sweep` subcommand to the main CLI's subparsers."""
    p = sub.add_parser(
        "sweep", help="train every point of a sweep spec (grid, points or isoflop), resumably",
        epilog="example: jaxscale sweep tiny-isoflop --dir runs/isoflop --workers 2\n"
               f"shipped specs: {', '.join(sorted(s.stem for s in SWEEPS_DIR.glob('*.yaml')))}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="a sweep YAML or the name of a shipped one")
    p.add_argument("--dir", required=True, metavar="SWEEP_DIR",
                   help="manifest.json and one workdir per point (rerun to resume)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="local: points run at once (default: 1)")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local subprocesses, Ray tasks, or a SLURM array job (default: local)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the points with their steps and FLOPs; run nothing")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="ray: cluster to join (default: a running local one, or start one)")
    p.add_argument("--cpus-per-point", type=int, default=1, metavar="N",
                   help="ray, slurm: CPUs reserved per point (default: 1)")
    p.add_argument("--gpus-per-point", type=int, default=0, metavar="N",
                   help="ray, slurm: GPUs reserved per point (default: 0)")
    p.add_argument("--submit", action="store_true",
                   help="slurm: submit sweep.sbatch with sbatch (default: print the command)")
    p.set_defaults(func=cmd_sweep, parser=p, overrides=[])
    return p
