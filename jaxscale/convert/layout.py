"""How one jaxscale parameter is laid out in a Hugging Face tensor, and the slices between them.

A `Tensor` says where one parameter (one layer's, for the layer stack) lives: the tensor's name
and how its axes relate to the parameter's. The parameter's dimensions are grouped by the Hugging
Face axis they come from, taken in the parameter's order: ``groups=(1, 2)`` for a query kernel
``[D, N, H]`` read from ``q_proj.weight`` ``[N*H, D]`` says the first HF axis (in parameter order,
after the transpose) is D and the second is N*H, split into [N, H]. Head-major flattening means a
run of whole heads is a contiguous range of the flat axis, so a slice of heads reads a slice of
the tensor. GPT-2 fuses query, key and value into one ``c_attn`` tensor: each is one block of its
last axis (``block``/``blocks``).

A parameter the checkpoint has no tensor for (the lm_head bias of an untied model with
model.use_bias) is `absent`: read as zeros, and it must still be zero to be written.

Numpy only: `read` maps a requested index of the parameter back to the tensor's index, so a
sharded load reads only the slice each device holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where one jaxscale parameter lives in a Hugging Face checkpoint."""

    name: str  # the tensor's name; "{i}" stands for the layer index; "" = none (zeros, below)
    groups: tuple[int, ...]  # parameter dims per HF axis, HF axes in parameter order (see above)
    transpose: bool = False  # HF stores the two axes reversed (torch nn.Linear: [out, in])
    block: int = 0  # fused tensors: this parameter is block `block` of `blocks` of the last axis
    blocks: int = 1

    @property
    def absent(self) -> bool:
        """No tensor holds this parameter: it is zero (the output bias jaxscale's use_bias adds
        and Hugging Face's lm_head lacks)."""
        return not self.name

    def __post_init__(self):
        if self.blocks > 1 and self.transpose:
            raise ValueError(f"{self.name}: fused blocks of a transposed tensor are not supported")

    def axis_sizes(self, shape: Sequence[int]) -> list[int]:
        """The HF axes' sizes, in parameter order, for this parameter's block only."""
        if sum(self.groups) != len(shape):
            raise ValueError(f"{self.name}: groups {self.groups} do not cover shape {tuple(shape)}")
        sizes, d = [], 0
        for g in self.groups:
            sizes.append(math.prod(shape[d:d + g]))
            d += g
        return sizes

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The HF tensor's shape (all blocks, HF axis order) for a parameter of `shape`."""
        sizes = self.axis_sizes(shape)
        sizes[-1] *= self.blocks
        return tuple(reversed(sizes)) if self.transpose else tuple(sizes)

    def read(self, shape: Sequence[int], index: Index,
             read_hf: Callable[[Index], np.ndarray]) -> np.ndarray:
        """The parameter's `index` (slices over `shape`), read through `read_hf(hf_index)`.

        A split axis [N*H] -> [N, H] reads the whole heads the index touches and slices the
        head dimension afterwards (the head dimension is never split by the sharding rules, so
        this reads exactly the slice).
        """
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
        hf_index, split_shape, after, d = [], [], [], 0
        for axis, g in enumerate(self.groups):
            dims, (lo, hi) = shape[d:d + g], bounds[d]
            inner = math.prod(dims[1:])
            offset = self.block * math.prod(dims) if axis == len(self.groups) - 1 else 0
            hf_index.append(slice(offset + lo * inner, offset + hi * inner))
            split_shape += [hi - lo, *dims[1:]]
            after += [slice(None)] + [slice(a, b) for a, b in bounds[d + 1:d + g]]
            d += g
        x = read_hf(tuple(reversed(hf_index)) if self.transpose else tuple(hf_index))
        if self.transpose:
            x = x.T
        return x.reshape(split_shape)[tuple(after)]

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """One layer's parameter in the HF layout (this block only; see `join`)."""
        y = x.reshape(self.axis_sizes(x.shape))
        return np.ascontiguousarray(y.T if self.transpose else y)


def join(parts: Sequence[tuple[Tensor, np.ndarray]]) -> np.ndarray:
    """The HF tensor made of its parameters' `to_hf` layouts: one, or a fused tensor's blocks
    concatenated along the last axis in block order."""
    ordered = sorted(parts, key=lambda p: p[0].block)
    if [t.block for t, _ in ordered] != list(range(ordered[0][0].blocks)):
        raise ValueError(f"{ordered[0][0].name}: blocks {[t.block for t, _ in ordered]} of "
                         f"{ordered[0][0].blocks}")
    arrays = [t.to_hf(x) for t, x in ordered]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
