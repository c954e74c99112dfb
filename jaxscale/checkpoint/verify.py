"""Checkpoint manifests: the size and digest of every file of a committed step, and the check.

Once orbax has committed a step (its directory renamed into place), `write_manifest` hashes every
file under ``<dir>/<step>/`` and writes ``<dir>/<step>/jaxscale_manifest.json`` last, atomically
(a temporary file, then ``os.replace``)::

    {"version": 1, "hash": "xxh3_128", "files": {"state/d/1a2b...": [size, "hexdigest"], ...}}

`verify_step` reads it back and returns None, or the first problem as a `Problem` naming the file
relative to the step directory: a file smaller or larger than listed (truncated), a different
digest (a flipped byte), a listed file that is gone, or no manifest at all. A directory in which
no step has a manifest predates them (or was copied without them): `has_manifests` tells the
caller, which then restores unverified instead of calling every step corrupt.

Files are hashed in chunks of 4 MiB on a small thread pool: hashlib and xxhash release the GIL
on large buffers, so several files hash at once. xxhash's xxh3_128 is used when the package is
importable (several GB/s), else stdlib blake2b; the manifest records which, so a step written
with one is checked with the same one. This module imports neither jax nor orbax, so
`jaxscale ckpt verify` starts in a fraction of a second.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import NamedTuple

MANIFEST = "jaxscale_manifest.json"
CHUNK = 4 << 20  # bytes read and hashed at a time
_WORKERS = min(8, os.cpu_count() or 1)


def _hashers() -> dict:
    table = {"blake2b": lambda: hashlib.blake2b(digest_size=16)}
    try:
        import xxhash  # optional: an order of magnitude faster than blake2b

        table["xxh3_128"] = xxhash.xxh3_128
    except ImportError:
        pass
    return table


HASHERS = _hashers()  # name -> constructor of a hashlib-like object
DEFAULT_HASH = "xxh3_128" if "xxh3_128" in HASHERS else "blake2b"


class Problem(NamedTuple):
    file: str  # relative to the step directory (the manifest itself for a missing manifest)
    why: str  # what is wrong with it, a few words

    def __str__(self) -> str:
        return f"{self.file}: {self.why}"


def _files(step_dir: str) -> list[str]:
    """Every file under `step_dir`, relative to it, sorted; the manifest and its temp excluded."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if not rel.startswith(MANIFEST):
                found.append(rel)
    return sorted(found)


def file_digest(path: str, algorithm: str = DEFAULT_HASH) -> str:
    """The hex digest of one file, read in CHUNK-sized pieces."""
    h = HASHERS[algorithm]()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def _digests(step_dir: str, files: list[str], algorithm: str) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        return list(pool.map(lambda f: file_digest(os.path.join(step_dir, f), algorithm), files))


def write_manifest(step_dir: str, algorithm: str = DEFAULT_HASH) -> dict:
    """Hash every file of a committed step and write its manifest, atomically; return it."""
    files = _files(step_dir)
    sizes = [os.path.getsize(os.path.join(step_dir, f)) for f in files]
    digests = _digests(step_dir, files, algorithm)
    manifest = {"version": 1, "hash": algorithm,
                "files": {f: [s, d] for f, s, d in zip(files, sizes, digests, strict=True)}}
    tmp = os.path.join(step_dir, f"{MANIFEST}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))
    return manifest


def read_manifest(step_dir: str) -> dict | None:
    """The step's manifest, or None if it has none (raises ValueError if it does not parse)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("not a jaxscale manifest")
    return manifest


def has_manifests(directory: str, steps) -> bool:
    """Whether any of `steps` in checkpoint `directory` has a manifest (verification applies)."""
    return any(os.path.exists(os.path.join(directory, str(s), MANIFEST)) for s in steps)


def verify_step(step_dir: str) -> Problem | None:
    """None if every file of the step matches its manifest, else the first problem found.

    Sizes are compared first (cheap: a truncated file is found without reading it), then the
    digests of the files whose size matches.
    """
    try:
        manifest = read_manifest(step_dir)
    except (OSError, ValueError) as e:
        return Problem(MANIFEST, f"unreadable ({type(e).__name__}: {' '.join(str(e).split())})")
    if manifest is None:
        return Problem(MANIFEST, "missing (the step committed, its manifest was never written)")
    algorithm = manifest.get("hash", "blake2b")
    if algorithm not in HASHERS:
        return Problem(MANIFEST, f"hashed with {algorithm}, which is not installed here")
    listed = sorted(manifest["files"].items())
    for rel, (size, _) in listed:
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return Problem(rel, "missing")
        actual = os.path.getsize(path)
        if actual != size:
            return Problem(rel, f"{actual} bytes, the manifest says {size}")
    digests = _digests(step_dir, [rel for rel, _ in listed], algorithm)
    for (rel, (_, digest)), actual in zip(listed, digests, strict=True):
        if actual != digest:
            return Problem(rel, f"contents differ from the manifest ({algorithm})")
    return None


def step_size(step_dir: str) -> tuple[int, int]:
    """(number of files, total bytes) of a step directory, its manifest excluded."""
    files = _files(step_dir)
    return len(files), sum(os.path.getsize(os.path.join(step_dir, f)) for f in files)


def config_hash(config: dict) -> str:
    """A short sha256 of a resolved config (its YAML, keys sorted): equal hashes, equal configs."""
    import yaml

    return hashlib.sha256(yaml.safe_dump(dict(config), sort_keys=True).encode()).hexdigest()[:12]


def committed_steps(directory: str) -> list[int]:
    """The committed step directories of a checkpoint directory (orbax's temporaries excluded)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
