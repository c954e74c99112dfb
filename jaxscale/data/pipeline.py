"""From random-access records to global batches, with grain.

The data position is a pure function of (seed, step, global batch size): global row ``r`` of step
``s`` is record ``s * G + r`` of the shuffled, endlessly repeated record sequence (grain reshuffles
every epoch). Each process loads only the rows its devices hold, found from the batch sharding,
in background threads (grain's prefetch), and the global array is assembled with
`jax.make_array_from_process_local_data`. Resuming at step ``s`` therefore continues the exact
sample stream, whatever the number of processes or devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

Batch = dict[str, Any]
Record = dict[str, np.ndarray]


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


@dataclasses.dataclass
class DataPipeline:
    """Global batches of one split, addressed by step.

    Attributes:
      records: random-access records (`len`, `[i]`) of T tokens each.
      global_batch: sequences per step, over all processes.
      sharding: the batch's sharding (from `sharding.batch_sharding`).
      seed: shuffles the records (reshuffled every epoch); the stream depends on nothing else.
      shuffle: False keeps the records' order (evaluation).
      num_threads, prefetch: background reader threads and batches read ahead.
    """

    records: Any
    global_batch: int
    sharding: NamedSharding
    seed: int = 0
    shuffle: bool = True
    num_threads: int = 2
    prefetch: int = 4

    def __post_init__(self):
        if len(self.records) == 0:
            raise ValueError("the data source has no records (is the corpus shorter than seq_len?)")
        dataset = grain.MapDataset.source(self.records)
        if self.shuffle:
            dataset = dataset.shuffle(seed=self.seed)
        self._dataset = dataset.repeat(None)
        seq_len = len(self.records[0]["inputs"])
        self.global_shape = (self.global_batch, seq_len)
        self.rows = process_rows(self.sharding, self.global_shape)

    def record_indices(self, step: int) -> range:
        """Indices (into the shuffled, repeated stream) of this process's rows at `step`."""
        base = step * self.global_batch
        return range(base + self.rows.start, base + self.rows.stop)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch at `step`, as numpy arrays."""
        return collate([self._dataset[i] for i in self.record_indices(step)])

    def to_global(self, local: dict[str, np.ndarray]) -> Batch:
        """Assemble the global jax arrays from every process's local rows."""
        return {
            k: jax.make_array_from_process_local_data(self.sharding, v, self.global_shape)
            for k, v in local.items()
        }

    def batch(self, step: int) -> Batch:
        """The global batch at `step` (reads synchronously)."""
        return self.to_global(self.local_batch(step))

    def iterator(self, start_step: int = 0) -> DataIterator:
        """Global batches from `start_step` on, read ahead in background threads."""
        return DataIterator(self, start_step)


class DataIterator:
    """Yields the global batch of each step in turn; its state is the next step."""

    def __init__(self, pipeline: DataPipeline, start_step: int):
        self.pipeline = pipeline
        self.step = start_step
        steps = grain.MapDataset.range(start_step, start_step + (1 << 40))
        locals_ = steps.map(pipeline.local_batch).to_iter_dataset(
            grain.ReadOptions(
                num_threads=pipeline.num_threads, prefetch_buffer_size=pipeline.prefetch
            )
        )
        self._it = iter(locals_)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        local = next(self._it)
        self.step += 1
        return self.pipeline.to_global(local)

    def get_state(self) -> dict[str, int]:
        """What resuming needs: the next step, and the stream's defining numbers (to check)."""
        return {
            "step": self.step,
            "seed": self.pipeline.seed,
            "global_batch": self.pipeline.global_batch,
        }
