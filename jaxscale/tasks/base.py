"""The task protocol: everything that is specific to one kind of training.

A task says what a batch holds (`batch_spec`: keys, global shapes, dtypes and the logical name of
every dimension), which of its fields the model is called with (`model_inputs`), the loss and the
evaluation sums (`loss`, a `LossOutput` of sums), how many FLOPs one example costs when it knows
the model (`flops_per_example`), and what throughput counts (`unit`: tokens or examples).

Nothing outside a task reads a batch's fields by name: the step, the builder, inspection and the
loop go through these methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.core.step import Batch, LossOutput


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of a global batch."""

    shape: tuple[int, ...]  # global shape, batch dimension first
    dtype: Any  # numpy dtype
    logical: tuple[str | None, ...]  # logical axis name of every dimension (None = replicated)

    def __post_init__(self):
        if len(self.logical) != len(self.shape):
            raise ValueError(
                f"Field of shape {self.shape} names {len(self.logical)} logical axes "
                f"{self.logical}; give one per dimension"
            )


BatchSpec = Mapping[str, Field]


@runtime_checkable
class Task(Protocol):
    """What jaxscale needs to know about a kind of training (see the module docstring)."""

    name: str  # the task's config name (task.name)
    unit: str  # what throughput counts: "tokens" or "examples"

    def batch_spec(self, batch_size: int) -> BatchSpec:
        """The fields of a global batch of `batch_size` examples."""

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array]:
        """The batch fields the model is called with, by role ("inputs", "positions", ...)."""

    def loss(self, outputs: Any, batch: Batch) -> LossOutput:
        """Sums of the loss (and of what to report) over the batch, and the weight they run
        over; evaluation reports every sum divided by the weight."""

    def units_per_example(self) -> int:
        """Tokens per example for token tasks, 1 for example-counted ones."""

    def flops_per_example(self, model_cfg: Any) -> float | None:
        """Training FLOPs (forward + backward) of one example when the task knows the model
        `model_cfg` describes, else None (the compiled step's cost analysis is used)."""


def batch_axes(spec: BatchSpec) -> dict[str, tuple[str | None, ...]]:
    """The logical names of every field of a batch spec."""
    return {k: f.logical for k, f in spec.items()}


def example_batch(task: Task) -> dict[str, jax.Array]:
    """A one-example batch of zeros: what models are initialised with."""
    return {k: jnp.zeros((1, *f.shape[1:]), f.dtype) for k, f in task.batch_spec(1).items()}


def abstract_batch(spec: BatchSpec, shardings: Mapping[str, Any] | None = None) -> dict:
    """ShapeDtypeStructs of a global batch (with its shardings when given)."""
    return {
        k: jax.ShapeDtypeStruct(f.shape, np.dtype(f.dtype),
                                sharding=None if shardings is None else shardings[k])
        for k, f in spec.items()
    }


def batch_bytes(spec: BatchSpec) -> int:
    """Bytes of a whole global batch."""
    return sum(int(np.prod(f.shape)) * np.dtype(f.dtype).itemsize for f in spec.values())
