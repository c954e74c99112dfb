"""Small helpers for pytrees that are not about any one concern (sharding, checkpoints, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["path_str"]


def path_str(path: Sequence[Any]) -> str:
    """The "/"-joined form of a jax key path, e.g. 'params/layers/attn/query/kernel'.

    Dict keys, attribute names and sequence indices all print bare (no brackets or quotes), so
    the same string names a leaf in configs (regexes), error messages and reports.
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)
