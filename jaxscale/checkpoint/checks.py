"""What makes a checkpoint unusable for a run, as errors that say what and what to do.

`check_tree` lists every array whose shape or presence differs between a checkpoint and the model;
`check_resumable` refuses a resume that a changed model or sample stream makes meaningless (a
changed mesh is fine: restoring reshards); `corrupt_error` names the unreadable file of a damaged
step and the previous complete one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from jaxscale import config as config_lib
from jaxscale.config import Config
from jaxscale.errors import CheckpointError

# Model settings that may differ between a checkpoint and the run resuming it: they change how the
# model computes, not what its parameters are. Every other model.* setting must match.
FREE_MODEL_KEYS = ("dtype", "remat", "attention", "dropout", "init_std", "max_seq_len")


def check_tree(saved: Mapping[str, tuple], expected: Mapping[str, tuple], where: str) -> None:
    """Raise CheckpointError listing every path whose presence or shape differs."""
    lines = []
    for path in sorted(set(saved) | set(expected)):
        s, e = saved.get(path), expected.get(path)
        if s != e:
            lines.append(f"  {path}: saved {'nothing' if s is None else s}, expected "
                         f"{'nothing' if e is None else e}")
    if lines:
        raise CheckpointError(
            f"{where} does not fit the model: {len(lines)} of {len(set(saved) | set(expected))} "
            "arrays differ in shape or presence (saved vs expected):\n" + "\n".join(lines)
        )


def check_resumable(saved: Mapping[str, Any], data: Mapping[str, Any], cfg: Config,
                    where: str) -> None:
    """Refuse a resume that a changed model or sample stream makes meaningless.

    A changed mesh, sharding, schedule, step count or compute dtype is fine. The sample stream is
    defined by the seed, the global batch and the sequence length (the data pipeline's own
    `set_state` checks the data itself when the iterator is rebuilt).
    """
    current = config_lib.to_dict(cfg)
    changed = [
        f"model.{k}: {v!r} in the checkpoint, {current['model'][k]!r} now"
        for k, v in saved.get("model", {}).items()
        if k not in FREE_MODEL_KEYS and k in current["model"] and current["model"][k] != v
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume from {where}: the model changed ({'; '.join(changed)}). Restore "
            "those settings, or start a new run in another workdir (checkpoint.init_from loads "
            "parameters of the same shapes)"
        )
    stream = {"seed": (data.get("seed"), cfg.seed),
              "batch_size": (data.get("global_batch"), cfg.batch_size),
              "seq_len": (saved.get("seq_len"), cfg.seq_len)}
    changed = [f"{k}: {a!r} in the checkpoint, {b!r} now"
               for k, (a, b) in stream.items() if a is not None and a != b]
    if changed:
        raise CheckpointError(
            f"cannot resume from {where}: the sample stream changed ({'; '.join(changed)}), so "
            "the batches after it would not continue the run. Restore those settings, or start a "
            "new run in another workdir (checkpoint.init_from loads the parameters)"
        )


def _bad_json(directory: epath.Path) -> str | None:
    """The first JSON file under `directory` (orbax's metadata files) that does not parse."""
    pending = [directory]
    while pending:
        folder = pending.pop()
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if path.is_dir():
                pending.append(path)
            elif path.name.startswith("_") or path.name == "metadata":
                try:
                    json.loads(path.read_text())
                except (ValueError, UnicodeDecodeError):
                    return str(path)
    return None


def corrupt_error(directory, step: int, steps: Sequence[int], items: str,
                  e: BaseException) -> CheckpointError:
    """The error for a step that cannot be read: names the file and the previous step."""
    step_dir = epath.Path(directory) / str(step)
    files = [f for f in re.findall(r'file "([^"]+)"', str(e)) if not f.endswith("/")]
    bad = files[-1] if files else None
    if bad is None and isinstance(e, ValueError):
        bad = next(filter(None, (_bad_json(step_dir / i) for i in items.split(","))), None)
    reason = " ".join(str(e).split())[:300]
    earlier = [s for s in steps if s < step]
    offer = (
        f"The previous complete step is {earlier[-1]}: resume from it with "
        f"checkpoint.restore_step={earlier[-1]} (later steps are then deleted)"
        if earlier else f"There is no earlier complete step; move {step_dir} away to start over"
    )
    return CheckpointError(
        f"checkpoint step {step} in {directory} is corrupted or truncated: cannot read "
        f"{bad or step_dir / items} ({type(e).__name__}: {reason}). {offer}"
    )
