"""MeshConfig -> jax.sharding.Mesh.

The axis names and their order come from `MeshConfig`'s fields (outermost first), so this module
never spells a mesh axis itself. One axis may be -1 and takes the remaining devices. With any
`dcn_*` size above 1 the mesh is a hybrid one: the DCN part of each axis spans slices (or hosts,
where devices carry no slice index) and the ICI part stays within one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxscale.config import ConfigError, MeshConfig

__all__ = ["MeshConfig", "make_mesh", "resolve_sizes"]


def _describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{name}={size}" for name, size in sizes.items())


def resolve_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Total size of every mesh axis (ICI x DCN) for `num_devices`, with the -1 axis filled.

    Raises:
      ConfigError: two -1 axes, a non-positive size, or sizes whose product is not `num_devices`.
    """
    ici, dcn = cfg.ici_sizes(), cfg.dcn_sizes()
    auto = [name for name, size in ici.items() if size == -1]
    if len(auto) > 1:
        raise ConfigError(
            f"mesh axes {', '.join('mesh.' + n for n in auto)} are all -1; at most one axis may be"
            " -1 (it takes the remaining devices)"
        )
    for name, size in {**ici, **{"dcn_" + k: v for k, v in dcn.items()}}.items():
        if size == 0 or size < -1 or (name.startswith("dcn_") and size < 1):
            raise ConfigError(f"mesh.{name}={size} must be a positive size")
    num_slices = math.prod(dcn.values())
    if num_devices % num_slices:
        raise ConfigError(
            f"the dcn_* sizes ({_describe({'dcn_' + k: v for k, v in dcn.items() if v > 1})}) "
            f"multiply to {num_slices}, which does not divide the {num_devices} devices"
        )
    per_slice = num_devices // num_slices
    known = math.prod(size for size in ici.values() if size != -1)
    if auto:
        if per_slice % known:
            raise ConfigError(
                f"mesh.{auto[0]}=-1 cannot fill the mesh: the other axes "
                f"({_describe({k: v for k, v in ici.items() if v != -1})}) multiply to {known}, "
                f"which does not divide the {per_slice} devices per slice"
            )
        ici[auto[0]] = per_slice // known
    elif known != per_slice:
        raise ConfigError(
            f"mesh axes {_describe(ici)} multiply to {known} but there are {per_slice} devices"
            + (f" per slice ({num_devices} in all)" if num_slices > 1 else "")
            + "; change the sizes or set one axis to -1"
        )
    return {name: ici[name] * dcn[name] for name in ici}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the device mesh described by `cfg`.

    Args:
      cfg: axis sizes (see MeshConfig).
      devices: the devices to lay out; default all of `jax.devices()` (every process's).

    Returns:
      A Mesh whose axis names are MeshConfig's axes in order, outermost first.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(cfg, len(devices))
    names = tuple(sizes)
    dcn = cfg.dcn_sizes()
    if math.prod(dcn.values()) == 1:
        shape = tuple(sizes.values())
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError, AssertionError):
            # Backends without a known physical topology: keep the given order.
            grid = np.asarray(devices, dtype=object).reshape(shape)
    else:
        # The DCN granules: slices (TPU pods), else processes (hosts of GPUs or CPUs).
        num_slices = math.prod(dcn.values())
        slices = {getattr(d, "slice_index", 0) for d in devices}
        processes = {d.process_index for d in devices}
        by_process = len(slices) != num_slices
        if by_process and len(processes) != num_slices:
            raise ConfigError(
                f"the dcn_* sizes ({_describe({'dcn_' + k: v for k, v in dcn.items() if v > 1})})"
                f" ask for {num_slices} slices or processes but the devices come from "
                f"{len(slices)} slice(s) and {len(processes)} process(es); dcn_* > 1 is for "
                "multi-slice or multi-host runs"
            )
        ici_shape = tuple(sizes[n] // dcn[n] for n in names)
        dcn_shape = tuple(dcn[n] for n in names)
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices,
            process_is_granule=by_process,
            allow_split_physical_axes=True,
        )
    return Mesh(grid, names)
