"""jaxscale.core.mesh: axis sizes, the -1 axis, device layout and errors for impossible meshes."""

import re

import jax
import numpy as np
import pytest

from jaxscale.config import ConfigError, MeshConfig
from jaxscale.core.mesh import make_mesh, resolve_sizes

AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")


@pytest.mark.parametrize(
    "cfg, sizes",
    [
        # sizes in axis order: data, stage, fsdp, expert, sequence, tensor
        (MeshConfig(), (1, 1, 1, 1, 1, 1)),
        (MeshConfig(data=8), (8, 1, 1, 1, 1, 1)),
        (MeshConfig(fsdp=4, tensor=2), (1, 1, 4, 1, 1, 2)),
        (MeshConfig(fsdp=-1, tensor=2), (1, 1, 4, 1, 1, 2)),
        (MeshConfig(data=2, fsdp=-1), (2, 1, 4, 1, 1, 1)),
        (MeshConfig(data=2, sequence=2, tensor=-1), (2, 1, 1, 1, 2, 2)),
    ],
)
def test_mesh_shape_and_axis_order(cfg, sizes):
    n = 1 if cfg == MeshConfig() else 8
    mesh = make_mesh(cfg, devices=jax.devices()[:n])
    assert mesh.axis_names == AXES == cfg.axis_names
    assert dict(mesh.shape) == dict(zip(AXES, sizes, strict=True))
    assert mesh.devices.shape == sizes
    # Every device appears exactly once.
    ids = sorted(d.id for d in mesh.devices.ravel())
    assert ids == sorted(d.id for d in jax.devices()[:n])


def test_default_devices_are_all_devices():
    mesh = make_mesh(MeshConfig(fsdp=-1))
    assert mesh.shape["fsdp"] == jax.device_count() == 8


def test_resolve_sizes_multiplies_ici_and_dcn():
    sizes = resolve_sizes(MeshConfig(fsdp=-1, dcn_data=2), 8)
    # 2 slices of 4 devices: fsdp fills the slice (4), data spans the slices (2).
    assert sizes == dict(data=2, stage=1, fsdp=4, expert=1, sequence=1, tensor=1)
    assert np.prod(list(sizes.values())) == 8


def test_product_not_matching_device_count():
    msg = (
        "mesh axes data=1 x stage=1 x fsdp=4 x expert=1 x sequence=1 x tensor=1 multiply to 4 "
        "but there are 8 devices; change the sizes or set one axis to -1"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        make_mesh(MeshConfig(fsdp=4))
    with pytest.raises(ConfigError, match=re.escape("tensor=16 multiply to 32 but there are 8")):
        make_mesh(MeshConfig(data=2, tensor=16))


def test_two_auto_axes():
    msg = "mesh axes mesh.data, mesh.fsdp are all -1; at most one axis may be -1"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}"):
        make_mesh(MeshConfig(data=-1, fsdp=-1))


@pytest.mark.parametrize(
    "cfg, name, value",
    [
        (MeshConfig(fsdp=0), "fsdp", 0),
        (MeshConfig(tensor=-2), "tensor", -2),
        (MeshConfig(dcn_data=0), "dcn_data", 0),
        (MeshConfig(dcn_fsdp=-1), "dcn_fsdp", -1),
    ],
)
def test_non_positive_sizes(cfg, name, value):
    with pytest.raises(ConfigError, match=f"^mesh.{name}={value} must be a positive size$"):
        make_mesh(cfg)


def test_auto_axis_that_cannot_fill():
    msg = (
        "mesh.fsdp=-1 cannot fill the mesh: the other axes (data=1 x stage=1 x expert=1 x "
        "sequence=1 x tensor=3) multiply to 3, which does not divide the 8 devices per slice"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        make_mesh(MeshConfig(fsdp=-1, tensor=3))


def test_dcn_sizes_not_dividing_devices():
    msg = "the dcn_* sizes (dcn_data=3) multiply to 3, which does not divide the 8 devices"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        make_mesh(MeshConfig(fsdp=-1, dcn_data=3))


def test_dcn_axis_needs_that_many_slices_or_processes():
    msg = ("the dcn_* sizes (dcn_data=2) ask for 2 slices or processes but the devices come "
           "from 1 slice(s) and 1 process(es); dcn_* > 1 is for multi-slice or multi-host runs")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        make_mesh(MeshConfig(fsdp=4, dcn_data=2))
