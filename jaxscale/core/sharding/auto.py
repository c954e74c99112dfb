"""The auto rule set: every mesh axis named for every logical name it fits.

With ``sharding.rules=auto`` (the default) the mesh is the only knob: ``mesh.fsdp=8`` alone is
FSDP, ``mesh.tensor=2`` alone is tensor parallelism, ``mesh.data=8`` alone is data parallelism,
and any mix of them composes. `auto_rules(mesh)` drops the axes of size 1 (and any the mesh does
not have) from every target, so a no-op axis never appears in a PartitionSpec.

This module is a leaf: `rules.py` imports it, never the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jax.sharding import Mesh

if TYPE_CHECKING:
    from jaxscale.core.sharding.rules import LogicalRules, MeshAxes

# Every mesh axis that carries examples: the batch is split over all of them (an expert axis
# holds different examples outside the expert layers, like data parallelism).
AUTO_BATCH_AXES = ("data", "fsdp", "expert")

AUTO_RULES: LogicalRules = (
    # activations
    ("batch", AUTO_BATCH_AXES),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_exp", "expert"),
    ("act_expert", "expert"),
    # the batch dimension of expert-major buffers [E, B, C, D]: the expert axis holds experts
    ("act_expert_batch", ("data", "fsdp")),
    # images: spatial dimensions and (input) channels stay whole on every device
    ("height", None),
    ("width", None),
    ("channels", None),
    # parameters
    ("layers", "stage"),  # the scanned layer stack: pipeline stages
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("exp", "expert"),
    ("expert", "expert"),
    # convolution kernels [kh, kw, conv_in, conv_out], like embed and mlp. A stem conv whose
    # input is an image's 3 channels should name that dimension "channels" (no axis divides 3).
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
)


# The batch keeps both data-parallel axes whatever their sizes, as the presets do, so that its
# sharding and the errors about it always name the two (a size-1 axis in a spec is a no-op).
ALWAYS_KEPT = ("data", "fsdp")


def _live_axes(target: MeshAxes, sizes: dict[str, int], keep: tuple[str, ...] = ()) -> MeshAxes:
    """`target` without the mesh axes of size 1 (or absent) other than `keep`: a str, a tuple
    of 2+, or None."""
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    live = tuple(a for a in axes if sizes.get(a, 1) > 1 or (a in keep and a in sizes))
    if not live:
        return None
    return live[0] if len(live) == 1 else live


def auto_rules(mesh: Mesh | None = None) -> LogicalRules:
    """`AUTO_RULES` for `mesh`: every target without the mesh's size-1 axes.

    Args:
      mesh: the device mesh; None keeps every axis (the full table, e.g. for documentation).

    Returns:
      The rules, in `AUTO_RULES`' order. With ``mesh.fsdp=4, mesh.tensor=2`` an ``("embed",
      "mlp")`` kernel gets ``PartitionSpec("fsdp", "tensor")`` and the batch ``"fsdp"``.
    """
    if mesh is None:
        return AUTO_RULES
    sizes = dict(mesh.shape)
    return tuple((name, _live_axes(target, sizes, ALWAYS_KEPT if name == "batch" else ()))
                  for name, target in AUTO_RULES)
