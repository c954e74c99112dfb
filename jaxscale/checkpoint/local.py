"""The local checkpoint tier: frequent, cheap saves to node-local disk (`checkpoint.local_dir`).

The durable tier (`checkpoint.dir`, orbax, every `checkpoint.every` steps) survives the loss of
a node; the local tier (every `checkpoint.local_every` steps, on a node's own disk or /dev/shm)
bounds what a crash of the process costs. Each process writes only the shards it holds:

    <local_dir>/<step>/process_<i>/shards.bin   every addressable shard's bytes, one after another
                                   index.json   per leaf: key path, global shape, dtype, and per
                                                distinct shard its index, offset and size
                                   state.json   the data iterator's state, the run's RNG, mesh,
                                                process count and config hash
                                   jaxscale_manifest.json   sizes and digests (verify.py)

A process writes its directory as ``.process_<i>.tmp`` and renames it when the manifest is in,
so ``process_<i>`` exists only whole; the write runs in a background thread after the shards
have been copied to host memory. A restore takes the newest step that every process holds
complete and verified (the processes agree on it through the distributed runtime: an
all-gather of each one's verified steps), and only when the mesh, process count and every
shard's index are those of the current run; otherwise the durable tier decides. The newest
`checkpoint.local_keep` steps are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxscale.checkpoint import verify
from jaxscale.core.state import TrainState, unbox
from jaxscale.core.trees import path_str
from jaxscale.errors import CheckpointError

SHARDS, INDEX, STATE = "shards.bin", "index.json", "state.json"


class OtherLayout(CheckpointError):
    """A local step saved on another mesh or process layout: not readable as this run's shards."""


def _index(shard: Any, shape: tuple[int, ...]) -> list[list[int]]:
    """A shard's index as [[start, stop], ...] per dimension (slices resolved)."""
    return [[s.start or 0, dim if s.stop is None else s.stop] for s, dim in zip(
        shard.index, shape, strict=True)]


def _write_synced(path: pathlib.Path, data: bytes) -> None:
    """Write `data` and flush it to disk (the directory's rename is what makes it appear)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalTier:
    """Saves and restores the local tier of one process (see the module docstring)."""

    def __init__(self, directory: str, every: int, keep: int, *, process: int | None = None):
        self.directory = pathlib.Path(directory)
        self.every, self.keep = every, keep
        self.process = jax.process_index() if process is None else process
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"*/.process_{self.process}.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # a write a crash cut short

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def _own(self, step: int) -> pathlib.Path:
        return self.directory / str(step) / f"process_{self.process}"

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, data_state: Mapping[str, Any],
             extra: Mapping[str, Any]) -> None:
        """Copy this process's shards of `state` to host memory (waiting for the step to finish
        computing) and write them in the background; `extra` (rng, meta) goes to state.json."""
        self.wait()
        leaves, datas = [], []
        for path, x in jax.tree_util.tree_flatten_with_path(unbox(state))[0]:
            shards: dict[str, Any] = {}
            for shard in x.addressable_shards:
                shards.setdefault(json.dumps(_index(shard, x.shape)), shard.data)
            leaves.append({"path": path_str(path), "shape": list(x.shape),
                           "dtype": str(x.dtype), "shards": list(shards)})
            datas.extend(shards.values())
        host = jax.device_get(datas)
        doc = {"step": step, "data": dict(data_state), **extra}
        self._writer = threading.Thread(target=self._write, args=(step, leaves, host, doc),
                                        daemon=True, name=f"jaxscale-local-{step}")
        self._writer.start()

    def _write(self, step: int, leaves: list[dict], host: list[np.ndarray], doc: dict) -> None:
        try:
            final = self._own(step)
            tmp = final.parent / f".process_{self.process}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            offset, arrays = 0, iter(host)
            with open(tmp / SHARDS, "wb") as f:
                for leaf in leaves:
                    placed = []
                    for index in leaf["shards"]:
                        data = np.ascontiguousarray(next(arrays)).tobytes()
                        f.write(data)
                        placed.append({"index": json.loads(index), "offset": offset,
                                       "nbytes": len(data)})
                        offset += len(data)
                    leaf["shards"] = placed
                f.flush()
                os.fsync(f.fileno())
            _write_synced(tmp / INDEX, json.dumps({"leaves": leaves}).encode())
            _write_synced(tmp / STATE, json.dumps(doc).encode())
            verify.write_manifest(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._retain()
        except BaseException as e:  # noqa: BLE001 - raised by wait() on the training thread
            self._error = e

    def _delete(self, step: int) -> None:
        """Remove this process's directory of `step` (and the step's, once no process has one)."""
        shutil.rmtree(self._own(step), ignore_errors=True)
        with contextlib.suppress(OSError):  # another process's directory is still in it
            (self.directory / str(step)).rmdir()

    def _retain(self) -> None:
        """Delete this process's directories beyond the newest `keep` steps."""
        mine = [s for s in self.steps() if self._own(s).is_dir()]
        for step in mine[:-self.keep]:
            self._delete(step)

    def drop_after(self, step: int) -> None:
        """Delete this process's steps after `step` (the run continues from it)."""
        for later in (s for s in self.steps() if s > step):
            self._delete(later)

    def writing(self) -> bool:
        """Whether a write is still running in the background."""
        return self._writer is not None and self._writer.is_alive()

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise CheckpointError if it failed."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        error, self._error = self._error, None
        if error is not None:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise CheckpointError(f"saving a local checkpoint to {self.directory} failed: "
                                  f"{type(error).__name__}: {reason[:500]}")

    # -- restore -------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(int(p.name) for p in self.directory.glob("[0-9]*") if p.name.isdigit())

    def verified_steps(self, log: Callable[[str], None]) -> list[int]:
        """This process's complete steps whose files match their manifests (a corrupt one is
        said, by step and file, and left out)."""
        good = []
        for step in self.steps():
            own = self._own(step)
            if not own.is_dir():
                continue
            problem = verify.verify_step(str(own))
            if problem is None:
                good.append(step)
            else:
                log(f"checkpoint: local step {step} in {own} is corrupt ({problem}); not used")
        return good

    def read_doc(self, step: int) -> dict:
        """state.json of this process's `step`: data state, rng, meta."""
        return json.loads((self._own(step) / STATE).read_text())

    def read(self, step: int, target: Any) -> Any:
        """This process's shards of `step` as global arrays on `target`'s shardings (a pytree
        of ShapeDtypeStruct with shardings, unboxed like the saved state).

        Raises:
          OtherLayout: a shard's index is not the one `target` puts on a device (another mesh):
            the caller falls back to the durable tier.
          CheckpointError: the leaves, a shape or a dtype differ from `target`'s (another model).
        """
        own = self._own(step)
        index = json.loads((own / INDEX).read_text())["leaves"]
        flat, treedef = jax.tree_util.tree_flatten_with_path(target)
        if [leaf["path"] for leaf in index] != [path_str(p) for p, _ in flat]:
            raise CheckpointError(f"local checkpoint step {step} in {own} holds other parameters "
                                  f"than this run's model; move {self.directory} away to start "
                                  "over")
        blob = np.memmap(own / SHARDS, dtype=np.uint8, mode="r")
        arrays = []
        for (_, t), leaf in zip(flat, index, strict=True):
            if list(t.shape) != leaf["shape"] or str(t.dtype) != leaf["dtype"]:
                raise CheckpointError(f"local checkpoint step {step} in {own}: {leaf['path']} is "
                                      f"{leaf['dtype']}{leaf['shape']}, this run's "
                                      f"{t.dtype}{list(t.shape)}; move {self.directory} away "
                                      "to start over")
            by_index = {json.dumps(s["index"]): s for s in leaf["shards"]}
            per_device = []
            for device, idx in t.sharding.addressable_devices_indices_map(t.shape).items():
                key = json.dumps([[s.start or 0, dim if s.stop is None else s.stop]
                                  for s, dim in zip(idx, t.shape, strict=True)])
                if key not in by_index:
                    raise OtherLayout(f"local step {step} in {own}: {leaf['path']} was "
                                      f"sharded otherwise (another mesh)")
                s = by_index[key]
                shape = [b - a for a, b in s["index"]]
                data = np.frombuffer(blob[s["offset"]:s["offset"] + s["nbytes"]],
                                     dtype=np.dtype(t.dtype)).reshape(shape)
                per_device.append(jax.device_put(data, device))
            arrays.append(jax.make_array_from_single_device_arrays(t.shape, t.sharding,
                                                                   per_device))
        return jax.tree_util.tree_unflatten(treedef, arrays)


def agreed_step(mine: list[int]) -> int | None:
    """The newest step in every process's `mine` (None when they share none): an all-gather of
    the processes' verified local steps, so every process picks the same one."""
    if jax.process_count() == 1:
        return max(mine, default=None)
    from jax.experimental import multihost_utils

    width = int(multihost_utils.process_allgather(np.int32(len(mine))).max())
    padded = np.full((max(width, 1),), -1, np.int64)
    padded[:len(mine)] = sorted(mine)
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    common = set.intersection(*(set(row[row >= 0].tolist()) for row in everyone))
    return max(common, default=None)
