"""`jaxscale ckpt verify DIR` and `jaxscale ckpt list DIR`: a checkpoint directory's steps.

DIR is a run's workdir (its ``checkpoints/`` is used) or a checkpoint directory. `verify` checks
every committed step against its manifest (one line per step; exit 0 when all verify, else the
checkpoint exit code 6); `list` prints a table of the steps with their size, whether they verify,
the mesh and the config hash from their meta item. Neither imports jax or orbax.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from jaxscale.checkpoint import verify
from jaxscale.errors import CheckpointError

EXIT_CHECKPOINT = 6  # the CLI's code for a checkpoint that cannot be used (jaxscale/cli.py)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the `ckpt` subcommand (verify, list) to the main CLI's subparsers."""
    p = sub.add_parser("ckpt", help="verify or list a run's checkpoints",
                       description="Check checkpoint steps against their manifests, or list them.")
    actions = p.add_subparsers(dest="action", required=True)
    for name, func, what in (("verify", cmd_verify, "check every step against its manifest"),
                             ("list", cmd_list, "a table of the steps")):
        q = actions.add_parser(name, help=what, description=what)
        q.add_argument("dir", help="a run's workdir or a checkpoint directory")
        q.set_defaults(func=func, parser=q)
    return p


def resolve_dir(path: str) -> str:
    """The checkpoint directory of `path`: a workdir's checkpoints/, or `path` itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) and not verify.committed_steps(path) else path


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def step_status(directory: str, step: int, verified: bool) -> tuple[str, str]:
    """(verified column, the `verify` line) of one step: yes/no, or "-" without manifests."""
    step_dir = os.path.join(directory, str(step))
    if not verified:
        return "-", f"step {step}: unverified (no step in {directory} has a manifest)"
    problem = verify.verify_step(step_dir)
    if problem is not None:
        return "no", f"step {step}: CORRUPT {problem}"
    files, size = verify.step_size(step_dir)
    return "yes", f"step {step}: ok ({files} files, {_mib(size)})"


def _steps(directory: str) -> list[int]:
    steps = verify.committed_steps(directory)
    if not steps:
        raise CheckpointError(f"{directory} holds no committed checkpoint step")
    return steps


def cmd_verify(args: argparse.Namespace) -> int:
    """`jaxscale ckpt verify DIR`: one line per step; 0 when every step verifies."""
    directory = resolve_dir(args.dir)
    steps = _steps(directory)
    verified = verify.has_manifests(directory, steps)
    statuses = [step_status(directory, s, verified) for s in steps]
    for _, line in statuses:
        print(line)
    return 0 if all(v == "yes" for v, _ in statuses) else EXIT_CHECKPOINT


def _meta(step_dir: str) -> dict[str, Any]:
    """The step's meta item (orbax's JSON handler writes it as meta/metadata), or {}."""
    try:
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def cmd_list(args: argparse.Namespace) -> int:
    """`jaxscale ckpt list DIR`: step, size, verified (yes/no/-), mesh and config hash."""
    directory = resolve_dir(args.dir)
    steps = _steps(directory)
    verified = verify.has_manifests(directory, steps)
    rows = [("step", "size", "verified", "mesh", "config")]
    for step in steps:
        step_dir = os.path.join(directory, str(step))
        meta = _meta(step_dir)
        mesh = "x".join(f"{k}={v}" for k, v in meta.get("mesh", {}).items() if v != 1) or (
            "1 device" if "mesh" in meta else "-")
        digest = meta.get("config_hash") or (verify.config_hash(meta["config"]) if "config" in meta
                                             else "-")
        rows.append((str(step), _mib(verify.step_size(step_dir)[1]),
                     step_status(directory, step, verified)[0], mesh, digest))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"checkpoints in {directory}")
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
