"""The config sections of ResNet and ViT, compound scaling, and the fields every CNN shares
(`ConvNetConfig`; the zoo's sections build on it in `jaxscale.zoo_config`).

Each model's section is its own frozen dataclass, selected by `model.name` (the registry below,
which `jaxscale.config` reads); like every section, each field has a one-line comment and the
constructor rejects a bad value with a one-line `ConfigError` naming the key. This module never
imports jax.

Compound scaling (Tan & Le 2019, "EfficientNet"): `model.scale.phi` grows depth by alpha^phi,
width by beta^phi and the input resolution by gamma^phi; with alpha * beta^2 * gamma^2 ~ 2 every
unit of phi about doubles the FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from jaxscale.config import AttentionImpl, DType, RematPolicy, register_model_config
from jaxscale.errors import ConfigError


@dataclass(frozen=True)
class ScaleConfig:
    """Compound scaling of a model's depth, width and input resolution by one coefficient."""

    phi: float = 0.0  # compound coefficient: 0 = the model as configured
    alpha: float = 1.2  # depth multiplier per unit of phi (EfficientNet's grid-searched 1.2)
    beta: float = 1.1  # width multiplier per unit of phi
    gamma: float = 1.15  # resolution multiplier per unit of phi
    width_divisor: int = 8  # scaled channel counts are rounded to a multiple of this

    def __post_init__(self):
        if self.phi < 0:
            raise ConfigError(f"model.scale.phi={self.phi} must be >= 0")
        for key in ("alpha", "beta", "gamma"):
            if getattr(self, key) < 1.0:
                raise ConfigError(f"model.scale.{key}={getattr(self, key)} must be >= 1 "
                                  "(a multiplier per unit of phi)")
        if self.width_divisor < 1:
            raise ConfigError(f"model.scale.width_divisor={self.width_divisor} must be >= 1")

    def depth(self, n: int) -> int:
        """`n` layers or blocks scaled by alpha^phi, rounded to the nearest (at least 1).

        Rounding up, as EfficientNet's per-stage repeats do, overshoots by up to a block per
        stage (a ResNet-34 at phi=1 would grow by 31% instead of 20%); `depths` shares the
        rounding out over a net's stages."""
        return n if self.phi == 0 else max(1, math.floor(n * self.alpha**self.phi + 0.5))

    def depths(self, stages: tuple[int, ...]) -> tuple[int, ...]:
        """Blocks per stage scaled together: the total scaled by alpha^phi and rounded, shared
        out in proportion (largest remainders first, every stage keeping at least 1), so that
        a net of short stages grows by alpha^phi and not by one block per stage."""
        if self.phi == 0:
            return tuple(stages)
        exact = [n * self.alpha**self.phi for n in stages]
        total = max(len(stages), math.floor(sum(exact) + 0.5))
        counts = [max(1, math.floor(x)) for x in exact]
        by_remainder = sorted(range(len(stages)), key=lambda i: counts[i] - exact[i])
        for i in by_remainder[:max(0, total - sum(counts))]:
            counts[i] += 1
        return tuple(counts)

    def width(self, channels: int, divisor: int = 0) -> int:
        """`channels` scaled by beta^phi, rounded to the nearest multiple of `divisor` (default
        `width_divisor`) and never more than 10% below the exact product."""
        if self.phi == 0:
            return channels
        divisor = divisor or self.width_divisor
        exact = channels * self.beta**self.phi
        rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
        return rounded + divisor if rounded < 0.9 * exact else rounded

    def resolution(self, size: int, multiple: int = 1) -> int:
        """An image side `size` scaled by gamma^phi, rounded to a multiple of `multiple`."""
        if self.phi == 0:
            return size
        return max(multiple, round(size * self.gamma**self.phi / multiple) * multiple)

    @property
    def flops_multiplier(self) -> float:
        """How much the FLOPs grow: (alpha * beta^2 * gamma^2)^phi, before rounding."""
        return (self.alpha * self.beta**2 * self.gamma**2) ** self.phi


# Choices of the CNN sections; jaxscale.models.norms.KINDS, resnet.BLOCKS and the STEMS tables of
# resnet, googlenet and densenet are keyed by the same names (tests/test_resnet.py,
# tests/test_cnn_zoo.py). Every CNN has an imagenet stem (strided, for 224x224 images) and a
# small one (unstrided, for CIFAR-sized or smaller images).
NormKind = Literal["batch", "group", "instance", "layer", "rms"]
ResNetBlock = Literal["auto", "basic", "bottleneck"]
CNNStem = Literal["imagenet", "small"]
NORM_KINDS: tuple[str, ...] = get_args(NormKind)
RESNET_DEPTHS: dict[int, tuple[int, ...]] = {  # depth -> residual blocks per stage (He et al.)
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
}


@dataclass(frozen=True)
class ConvNetConfig:
    """The fields every CNN section shares, the ones `jaxscale.models.conv` reads: the head,
    the normalisation and the dtypes. A section redeclares a field to change its default."""

    name: str = ""  # model registry key (jaxscale.models.MODELS)
    num_classes: int = 1000  # logits of the dense head (set it to task.num_classes)
    norm: NormKind = "batch"  # batch | group | instance | layer | rms (jaxscale.models.norms)
    norm_groups: int = 32  # group: channel groups (must divide every norm's channels)
    norm_eps: float = 1e-5  # epsilon inside the norms
    bn_momentum: float = 0.9  # batch: running <- momentum x running + (1 - momentum) x batch
    bn_group_size: int = 0  # batch: examples per ghost-BN group (0 = the whole global batch)
    dtype: DType = "float32"  # compute dtype of convolutions (norm statistics stay float32)
    param_dtype: DType = "float32"  # storage dtype of parameters

    def __post_init__(self):
        for key in ("num_classes", "norm_groups"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps={self.norm_eps} must be positive")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ConfigError(f"model.bn_momentum={self.bn_momentum} must be in [0, 1)")
        if self.bn_group_size < 0:
            raise ConfigError(f"model.bn_group_size={self.bn_group_size} must be >= 0 "
                              "(0 = statistics over the global batch)")


@dataclass(frozen=True)
class ResNetConfig(ConvNetConfig):
    """A ResNet image classifier (`jaxscale.models.resnet`), He et al. 2015 in the v1.5 form
    (a bottleneck strides in its 3x3 conv). Checked on construction; the error names the key."""

    name: str = "resnet"  # model registry key (jaxscale.models.MODELS)
    depth: int = 18  # 18 | 34 | 50 | 101 | 152: the published layout (unless `blocks` is set)
    blocks: tuple[int, ...] = ()  # residual blocks per stage, e.g. [1, 1]; () = depth's layout
    # basic (two 3x3 convs) | bottleneck (1x1, 3x3, 1x1 with 4x outputs) | auto: bottleneck
    # from depth 50 on, else basic
    block: ResNetBlock = "auto"
    width: int = 64  # channels of the first stage; stage i has width x 2^i (x4 after bottleneck)
    width_multiplier: float = 1.0  # scales every stage's width (2.0: a wide ResNet)
    # imagenet: 7x7 stride-2 conv and 3x3 stride-2 max-pool | small: one 3x3 stride-1 conv
    # (CIFAR-sized or smaller images, e.g. 8x8 digits)
    stem: CNNStem = "imagenet"
    scale: ScaleConfig = field(default_factory=ScaleConfig)  # compound scaling (model.scale.phi)

    def __post_init__(self):
        if not self.blocks and self.depth not in RESNET_DEPTHS:
            raise ConfigError(f"model.depth={self.depth} has no published layout; choose one of "
                              f"{', '.join(map(str, RESNET_DEPTHS))} or set model.blocks")
        if any(n < 1 for n in self.blocks):
            raise ConfigError(f"model.blocks={list(self.blocks)}: every stage needs >= 1 block")
        if self.width < 1:
            raise ConfigError(f"model.width={self.width} must be positive")
        if self.width_multiplier <= 0:
            raise ConfigError(f"model.width_multiplier={self.width_multiplier} must be positive")
        super().__post_init__()

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        """Residual blocks per stage: `blocks` (or the layout of `depth`) after `scale`."""
        return self.scale.depths(tuple(self.blocks) or RESNET_DEPTHS[self.depth])

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Channels inside the blocks of each stage (before a bottleneck's expansion): `width` x
        `width_multiplier` x 2^stage, after `scale`."""
        base = self.width * self.width_multiplier
        return tuple(self.scale.width(max(1, round(base * 2**i)))
                     for i in range(len(self.stage_blocks)))

    @property
    def block_kind(self) -> str:
        """basic | bottleneck: `block`, or by depth when it is auto."""
        if self.block != "auto":
            return self.block
        return "bottleneck" if not self.blocks and self.depth >= 50 else "basic"


# Choices of the ViT section; jaxscale.models.vit's tables are keyed by the same names.
ViTSize = Literal["Ti", "S", "B", "L", "H"]
ViTPool = Literal["cls", "gap"]
ViTPosition = Literal["learned", "sincos"]
ViTPatchEmbed = Literal["conv", "dense"]
# size -> (d_model, num_layers, num_heads, d_ff) of the published models (Dosovitskiy et al. 2020;
# Ti and S from Touvron et al. 2021)
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096), "H": (1280, 32, 16, 5120),
}


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer (`jaxscale.models.vit`): patches -> pre-norm bidirectional
    transformer blocks -> class token or mean pool -> dense head."""

    name: str = "vit"  # model registry key (jaxscale.models.MODELS)
    size: ViTSize = "B"  # Ti | S | B | L | H: the published widths and depths below default to it
    d_model: int = 0  # width of the tokens; 0 = size's
    num_layers: int = 0  # transformer blocks; 0 = size's
    num_heads: int = 0  # attention heads (must divide d_model); 0 = size's
    d_ff: int = 0  # MLP hidden width; 0 = size's (4 x d_model)
    patch_size: int = 16  # side of the square patches (must divide the image side)
    # side of the square images the position table is made for (after `scale`); inputs of
    # another size interpolate the table (bilinear), as when fine-tuning at a higher resolution
    image_size: int = 224
    num_classes: int = 1000  # logits of the dense head (set it to task.num_classes)
    pool: ViTPool = "cls"  # cls: a learned class token's output | gap: the mean of the patches
    position: ViTPosition = "learned"  # learned table | sincos: fixed 2D sine-cosine
    patch_embed: ViTPatchEmbed = "conv"  # conv: a strided conv | dense: reshape + dense
    dropout: float = 0.0  # dropout after attention, MLP and the embedding
    drop_path: float = 0.0  # stochastic depth: the last block's drop rate (linear from 0)
    norm_eps: float = 1e-6  # epsilon of the layer norms
    attention: AttentionImpl = "auto"  # auto | xla | cudnn | reference (as the decoder's)
    remat: RematPolicy = "none"  # rematerialisation policy of each block (jaxscale.core.remat)
    dtype: DType = "float32"  # compute dtype (softmax and norm statistics stay float32)
    param_dtype: DType = "float32"  # storage dtype of parameters
    scale: ScaleConfig = field(default_factory=ScaleConfig)  # compound scaling (model.scale.phi)

    def __post_init__(self):
        for key in ("d_model", "num_layers", "num_heads", "d_ff"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0 (0 = "
                                  f"model.size={self.size}'s)")
        for key in ("patch_size", "image_size", "num_classes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        if self.width % self.heads:
            raise ConfigError(f"model.num_heads={self.heads} must divide model.d_model="
                              f"{self.width}")
        if self.resolution % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.resolution} is not divisible by model.patch_size="
                f"{self.patch_size}; choose an image size that is a multiple of the patch size")
        for key in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be in [0, 1)")
        if self.position == "sincos" and self.width % 4:
            raise ConfigError(f"model.position=sincos needs model.d_model={self.width} to be a "
                              "multiple of 4 (a quarter each for sin and cos of row and column)")

    @property
    def heads(self) -> int:
        return self.num_heads or VIT_SIZES[self.size][2]

    @property
    def width(self) -> int:
        """d_model after `scale` (a multiple of 8 x heads, so the head width stays whole)."""
        return self.scale.width(self.d_model or VIT_SIZES[self.size][0], 8 * self.heads)

    @property
    def depth(self) -> int:
        """Transformer blocks after `scale`."""
        return self.scale.depth(self.num_layers or VIT_SIZES[self.size][1])

    @property
    def mlp_width(self) -> int:
        """MLP hidden width: d_ff (or size's), grown with the width under `scale`."""
        base = self.d_model or VIT_SIZES[self.size][0]
        return round((self.d_ff or VIT_SIZES[self.size][3]) * self.width / base)

    @property
    def resolution(self) -> int:
        """image_size after `scale`, a multiple of patch_size."""
        return self.scale.resolution(self.image_size, self.patch_size)


def scaled_input_shape(model_cfg, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """An example's shape [H, W, C] with H and W grown by the model's compound scaling (a
    multiple of the model's patch size, if it has one); other models' shapes are unchanged."""
    scale = getattr(model_cfg, "scale", None)
    if scale is None or scale.phi == 0 or len(input_shape) != 3:
        return tuple(input_shape)
    multiple = getattr(model_cfg, "patch_size", 1)
    h, w, c = input_shape
    return scale.resolution(h, multiple), scale.resolution(w, multiple), c


# model.name -> its config section, registered with jaxscale.config when it first loads a config
SECTIONS: dict[str, type] = {"resnet": ResNetConfig, "vit": ViTConfig}
for _name, _section in SECTIONS.items():
    register_model_config(_name, _section)
