"""Checkpoints on orbax: async saves, exact resume, reshard-on-restore, and the restore checks."""

from jaxscale.checkpoint.manager import (
    Checkpointer,
    Resumed,
    checkpoint_dir,
    load_params,
    read_meta,
    save_params,
)

__all__ = ["Checkpointer", "Resumed", "checkpoint_dir", "load_params", "read_meta", "save_params"]
