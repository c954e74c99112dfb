"""From random-access records to global batches, with grain.

The data position is a pure function of (seed, step, global batch size): global row ``r`` of step
``s`` is record ``s * G + r`` of the shuffled, endlessly repeated record sequence (grain reshuffles
every epoch). Each process loads only the rows its devices hold, found from the batch sharding,
in background threads (grain's prefetch), and the global array is assembled with
`jax.make_array_from_process_local_data`. Resuming at step ``s`` therefore continues the exact
sample stream, whatever the number of processes or devices.

Elastic resumes. The iterator's state (`DataIterator.get_state`, JSON) names the step and what
defines the stream: the seed, the global batch, the number of records and a fingerprint of them.
Restoring it (`DataIterator.set_state`) into a run with another process or device count continues
the same stream. A run with another seed, another global batch or other data cannot continue it
exactly (step ``s`` would read other records) and fails with a message saying so, instead of
silently repeating or skipping data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxscale.errors import ConfigError

Batch = dict[str, Any]
Record = dict[str, np.ndarray]

# Enough steps for any run: the grain dataset of steps is lazy.
_MAX_STEPS = 1 << 40


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous range of batch rows that this process's devices hold."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*index[0].indices(global_shape[0])))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError(
            f"this process's devices hold batch rows {sorted(rows)}, which are not contiguous; "
            "order the mesh so that each process's devices are adjacent along the batch axes"
        )
    return slice(lo, hi)


def collate(records: list[Record]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


def row_hashes(local: dict[str, np.ndarray]) -> list[str]:
    """A short hash of every row of a batch (all fields, in key order)."""
    keys = sorted(local)
    rows = len(local[keys[0]])
    return [
        hashlib.blake2b(b"".join(np.ascontiguousarray(local[k][r]).tobytes() for k in keys),
                        digest_size=8).hexdigest()
        for r in range(rows)
    ]


def records_fingerprint(records: Any, shuffle: bool) -> str:
    """Identifies a record sequence cheaply: its length, a hash of three of its records and the
    records' `settings` string, if they have one."""
    n = len(records)
    h = hashlib.sha256(f"{n}:{shuffle}".encode())
    for i in sorted({0, n // 2, n - 1}):
        h.update("".join(row_hashes(collate([records[i]]))).encode())
    # What else defines the stream without showing in those records (e.g. augmentation settings,
    # or the list of image files); sources without it keep the fingerprints they always had.
    settings = getattr(records, "settings", None)
    if settings is not None:
        h.update(str(settings).encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class DataPipeline:
    """Global batches of one split, addressed by step.

    Attributes:
      records: random-access records (`len`, `[i]`): dicts of arrays of fixed shapes (e.g. T
        tokens, or an image and its label). Optional: `batch(ids)` reads many at once;
        `batch_at(positions, ids)` also receives the rows' positions in the stream (the reads
        then depend on both, e.g. augmentation); `settings`, a string hashed into `fingerprint`.
      global_batch: records per step, over all processes.
      sharding: the batch's sharding: one for every field, or a dict of one per field (from
        `sharding.batch_shardings` of the task's batch spec).
      seed: shuffles the records (reshuffled every epoch); the stream depends on nothing else.
      shuffle: False keeps the records' order (evaluation).
      num_threads, prefetch: background reader threads and batches read ahead.
      rows: this process's rows of each global batch; default: the rows its devices hold.
      row_log: a JSON-lines file to which the iterator appends, per step, the rows and stream
        records this process loaded and a hash of each row (to audit determinism and resumes).
    """

    records: Any
    global_batch: int
    sharding: NamedSharding | dict[str, NamedSharding]
    seed: int = 0
    shuffle: bool = True
    num_threads: int = 2
    prefetch: int = 4
    rows: slice | None = None
    row_log: str | None = None

    def __post_init__(self):
        if len(self.records) == 0:
            raise ValueError("the data source has no records (is the corpus shorter than seq_len?)")
        # The stream's record indices: grain's index shuffle (a new permutation every epoch, O(1)
        # memory), looked up per row; the records themselves are then read a batch at a time.
        indices = grain.MapDataset.range(len(self.records))
        if self.shuffle:
            indices = indices.shuffle(seed=self.seed)
        self._indices = indices.repeat(None)
        first = self.records[0]
        self.global_shapes = {k: (self.global_batch, *np.shape(v)) for k, v in first.items()}
        self.shardings = (dict(self.sharding) if isinstance(self.sharding, dict)
                          else dict.fromkeys(first, self.sharding))
        if self.rows is None:
            key = next(iter(first))
            self.rows = process_rows(self.shardings[key], self.global_shapes[key])
        self.fingerprint = records_fingerprint(self.records, self.shuffle)

    def record_indices(self, step: int) -> range:
        """Indices (into the shuffled, repeated stream) of this process's rows at `step`."""
        base = step * self.global_batch
        return range(base + self.rows.start, base + self.rows.stop)

    def record_ids(self, step: int) -> np.ndarray:
        """Which records (indices into `records`) this process's rows at `step` hold."""
        return np.array([self._indices[i] for i in self.record_indices(step)], np.int64)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch at `step`, as numpy arrays."""
        ids = self.record_ids(step)
        read_at = getattr(self.records, "batch_at", None)
        if read_at is not None:
            # Records whose rows depend on where they are in the stream (training augmentation:
            # an image read in two epochs gets two different crops), not only on which they are.
            positions = self.record_indices(step)
            return read_at(np.arange(positions.start, positions.stop, dtype=np.int64), ids)
        read_batch = getattr(self.records, "batch", None)
        if read_batch is not None:  # vectorised over the rows
            return read_batch(ids)
        return collate([self.records[int(i)] for i in ids])

    def to_global(self, local: dict[str, np.ndarray]) -> Batch:
        """Assemble the global jax arrays from every process's local rows."""
        return {
            k: jax.make_array_from_process_local_data(
                self.shardings[k], v, self.global_shapes[k])
            for k, v in local.items()
        }

    def batch(self, step: int) -> Batch:
        """The global batch at `step` (reads synchronously)."""
        return self.to_global(self.local_batch(step))

    def iterator(self, start_step: int = 0, state: dict[str, Any] | None = None) -> DataIterator:
        """Global batches from `start_step` (or from a saved `state`'s step), read ahead in threads.

        Raises:
          ConfigError: `state` describes a stream this pipeline cannot continue exactly.
        """
        if state is not None:
            self.check_state(state)
            start_step = int(state["step"])
        return DataIterator(self, start_step)

    def check_state(self, state: dict[str, Any]) -> None:
        """Check that this pipeline continues the stream a saved iterator state describes.

        Raises:
          ConfigError: the state's stream cannot be continued exactly by this pipeline.
        """
        step = int(state["step"])
        where = f"the data state saved at step {step}"
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ConfigError(
                f"{where} was shuffled with seed={state['seed']} but this run has seed="
                f"{self.seed}; the sample stream cannot continue exactly: resume with "
                f"seed={state['seed']}"
            )
        if "fingerprint" in state and (
            state["fingerprint"] != self.fingerprint or state["num_records"] != len(self.records)
        ):
            raise ConfigError(
                f"{where} reads {state['num_records']} records (fingerprint "
                f"{state['fingerprint']}) but this run's data has {len(self.records)} "
                f"({self.fingerprint}): data.source, data.path, data.tokenizer, data.pack, "
                "data.shuffle or seq_len changed, so the sample stream cannot continue exactly; "
                "resume with the same data (and image augmentation: data.crop_padding, data.flip, "
                "data.mixup), or start a new run from the parameters only "
                "(checkpoint.init_from)"
            )
        saved_batch = int(state.get("global_batch", self.global_batch))
        if saved_batch != self.global_batch:
            raise ConfigError(
                f"{where} read batch_size={saved_batch} sequences per step but this run reads "
                f"{self.global_batch}: step s reads records s*batch_size to (s+1)*batch_size-1 "
                "of the stream, so the sample stream cannot continue exactly; resume with "
                f"batch_size={saved_batch} (any process or device count is fine)"
            )


class DataIterator:
    """Yields the global batch of each step in turn.

    Its position is grain's: the iterator runs over the dataset of steps, so grain's own iterator
    state (``{"next_index": step}``) is the step, the same in every process. `get_state` adds what
    defines the stream, so that `set_state` can refuse a stream it cannot continue.
    """

    def __init__(self, pipeline: DataPipeline, start_step: int = 0):
        self.pipeline = pipeline
        self.step = start_step
        self._it = self._open(start_step)
        self._log = None
        if pipeline.row_log:
            path = pathlib.Path(pipeline.row_log)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "a")

    def _open(self, step: int):
        pipeline = self.pipeline
        steps = grain.MapDataset.range(_MAX_STEPS)
        locals_ = steps.map(pipeline.local_batch).to_iter_dataset(
            grain.ReadOptions(
                num_threads=pipeline.num_threads, prefetch_buffer_size=pipeline.prefetch
            )
        )
        it = iter(locals_)
        it.set_state({"next_index": step})
        return it

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        local = next(self._it)
        if self._log is not None:
            records = self.pipeline.record_indices(self.step)
            rows = self.pipeline.rows
            self._log.write(json.dumps({
                "step": self.step, "rows": [rows.start, rows.stop],
                "records": [records.start, records.stop], "hashes": row_hashes(local),
            }) + "\n")
            self._log.flush()
        self.step += 1
        return self.pipeline.to_global(local)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable: the next step, grain's iterator state, and the stream's definition."""
        return {
            "step": self.step,
            "seed": self.pipeline.seed,
            "global_batch": self.pipeline.global_batch,
            "num_records": len(self.pipeline.records),
            "fingerprint": self.pipeline.fingerprint,
            "grain": self._it.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue the stream a `get_state` dict describes (saved by any process count).

        Older states of just ``{"step", "seed", "global_batch"}`` are accepted.

        Raises:
          ConfigError: the stream cannot be continued exactly (see `DataPipeline.check_state`).
        """
        self.pipeline.check_state(state)
        self.step = int(state["step"])
        self._stop_reading()
        self._it = self._open(self.step)

    def _stop_reading(self) -> None:
        close = getattr(self._it, "close", None)  # grain >= 0.2.12
        if close is not None:
            close()

    def close(self) -> None:
        """Stop the reader threads and close the row log."""
        self._stop_reading()
        if self._log is not None:
            self._log.close()
            self._log = None
