"""Checkpoints on orbax: async saves, exact resume, reshard-on-restore, verified steps, and the
restore checks.

The names below load `manager` (and so jax and orbax) on first use, so `verify` and the `ckpt`
command import without them.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Checkpointer", "Resumed", "checkpoint_dir", "load_params", "read_meta", "save_params"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("jaxscale.checkpoint.manager"), name)
    raise AttributeError(f"module 'jaxscale.checkpoint' has no attribute {name!r}")
