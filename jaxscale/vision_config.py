"""The config sections of the image models: ResNet, ViT and the CNN zoo, and compound scaling.

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



# ---- VGG, GoogLeNet and DenseNet sections (jaxscale.models.vgg, .googlenet, .densenet) ----

VGG_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)  # channels of the five stages
VGG_DEPTHS: dict[int, tuple[int, ...]] = {  # depth -> 3x3 convs per stage (configs A, B, D, E
    11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4),
}  # of Simonyan & Zisserman 2014, table 1); depth = convs + the classifier's 3 dense layers
# Inception v1 (Szegedy et al. 2014, table 1): block -> channels of its branches (1x1, 3x3
# reduce, 3x3, "5x5" reduce, "5x5", pool proj); the output has 1x1 + 3x3 + 5x5 + pool proj
GOOGLENET_BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}
GOOGLENET_STAGES: tuple[tuple[str, ...], ...] = (  # inception blocks between the max-pools
    ("3a", "3b"), ("4a", "4b", "4c", "4d", "4e"), ("5a", "5b"))
GOOGLENET_STEM: tuple[int, int, int] = (64, 64, 192)  # channels of the stem's 7x7, 1x1, 3x3
DENSENET_DEPTHS: dict[int, tuple[int, ...]] = {  # depth -> dense layers per block (Huang et al.
    121: (6, 12, 24, 16), 169: (6, 12, 32, 32), 201: (6, 12, 48, 32),  # 2016, table 1; k = 32)
}


def _channels(channels: int, multiplier: float, divisor: int) -> int:
    """`channels` x `multiplier`, rounded to the nearest multiple of `divisor` (at least one
    divisor); unchanged at multiplier 1, so the published layouts keep their exact widths."""
    if multiplier == 1.0:
        return channels
    return max(divisor, int(channels * multiplier / divisor + 0.5) * divisor)


def _check_widths(cfg) -> None:
    """The checks VGG, GoogLeNet and DenseNet add for their width and dropout fields."""
    if cfg.width_divisor < 1:
        raise ConfigError(f"model.width_divisor={cfg.width_divisor} must be positive")
    if cfg.width_multiplier <= 0:
        raise ConfigError(f"model.width_multiplier={cfg.width_multiplier} must be positive")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class VGGConfig(ConvNetConfig):
    """A VGG image classifier (`jaxscale.models.vgg`), Simonyan & Zisserman 2014: stages of 3x3
    convs with 2x2 max-pools between, an adaptive average pool to `pool_size` x `pool_size` and
    three dense layers. Without a norm (the default, as published: convs with a bias) VGG-11 has
    132,863,336 parameters and VGG-16 138,357,544 at 1000 classes."""

    name: str = "vgg"  # model registry key (jaxscale.models.MODELS)
    depth: int = 16  # 11 | 13 | 16 | 19: the published layouts (VGG_DEPTHS)
    width_multiplier: float = 1.0  # scales every stage's channels (1/16: a tiny VGG for tests)
    width_divisor: int = 8  # scaled channel counts are rounded to a multiple of this
    head_width: int = 4096  # hidden width of the classifier's two hidden dense layers
    dropout: float = 0.5  # dropout after each hidden dense layer (training only)
    pool_size: int = 7  # side of the adaptive average pool before the classifier
    # false: the paper's VGG (convs with a bias, no norm) | true: `norm` after every conv, as
    # torchvision's vgg*_bn (convs without a bias)
    batch_norm: bool = False
    norm: NormKind = "batch"  # batch | group | instance | layer | rms: the norm batch_norm adds

    def __post_init__(self):
        if self.depth not in VGG_DEPTHS:
            raise ConfigError(f"model.depth={self.depth} has no published layout; choose one of "
                              f"{', '.join(map(str, VGG_DEPTHS))}")
        for key in ("head_width", "pool_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        _check_widths(self)
        super().__post_init__()

    @property
    def stage_convs(self) -> tuple[int, ...]:
        """3x3 convs in each of the five stages."""
        return VGG_DEPTHS[self.depth]

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Channels of each stage after `width_multiplier`."""
        return tuple(_channels(w, self.width_multiplier, self.width_divisor) for w in VGG_WIDTHS)


@dataclass(frozen=True)
class GoogLeNetConfig(ConvNetConfig):
    """GoogLeNet (Inception v1, `jaxscale.models.googlenet`), Szegedy et al. 2014, with a norm
    after every conv as torchvision's GoogLeNet and without the auxiliary classifiers: 6,624,904
    parameters at 1000 classes with the 3x3 "5x5" branch of torchvision's weights."""

    name: str = "googlenet"  # model registry key (jaxscale.models.MODELS)
    width_multiplier: float = 1.0  # scales every conv's channels (1/16: a tiny net for tests)
    width_divisor: int = 8  # scaled channel counts are rounded to a multiple of this
    # kernel of the branch the paper calls 5x5: 3 as torchvision's GoogLeNet | 5 as the paper
    wide_kernel: int = 3
    dropout: float = 0.2  # dropout before the head (torchvision's 0.2; the paper's 0.4)
    norm_groups: int = 8  # group: channel groups (must divide every conv's channels)
    norm_eps: float = 1e-3  # epsilon inside the norms (torchvision's 0.001)
    # imagenet: 7x7 stride-2 conv, 1x1, 3x3, a max-pool after the first and the last (the
    # image shrinks 8x before inception 3a) | small: a 3x3 stride-1 first conv and no max-pool
    # in the stem (CIFAR-sized or smaller images)
    stem: CNNStem = "imagenet"

    def __post_init__(self):
        if self.wide_kernel not in (3, 5):
            raise ConfigError(f"model.wide_kernel={self.wide_kernel} must be 3 (torchvision's "
                              "GoogLeNet) or 5 (the paper's 5x5)")
        _check_widths(self)
        super().__post_init__()

    def width(self, channels: int) -> int:
        """A published channel count after `width_multiplier`."""
        return _channels(channels, self.width_multiplier, self.width_divisor)

    @property
    def blocks(self) -> dict[str, tuple[int, ...]]:
        """Inception block -> its branches' channels (GOOGLENET_BLOCKS) after the multiplier."""
        return {k: tuple(map(self.width, v)) for k, v in GOOGLENET_BLOCKS.items()}


@dataclass(frozen=True)
class DenseNetConfig(ConvNetConfig):
    """A DenseNet-BC image classifier (`jaxscale.models.densenet`), Huang et al. 2016: dense
    blocks of BN-ReLU-1x1-BN-ReLU-3x3 layers, each adding `growth_rate` channels to the
    concatenation of all before it, with compressing transitions between the blocks.
    DenseNet-121 has 7,978,856 parameters at 1000 classes."""

    name: str = "densenet"  # model registry key (jaxscale.models.MODELS)
    depth: int = 121  # 121 | 169 | 201: the published layout (unless `blocks` is set)
    blocks: tuple[int, ...] = ()  # dense layers per block, e.g. [1, 1]; () = depth's layout
    growth_rate: int = 32  # k: channels each dense layer adds
    init_features: int = 64  # channels of the stem's conv (2k in the paper)
    bn_size: int = 4  # a dense layer's 1x1 bottleneck has bn_size x k channels
    compression: float = 0.5  # a transition keeps floor(compression x channels) channels
    width_multiplier: float = 1.0  # scales growth_rate and init_features
    width_divisor: int = 8  # scaled channel counts are rounded to a multiple of this
    dropout: float = 0.0  # dropout after every dense layer's 3x3 conv (torchvision's drop_rate)
    norm_groups: int = 8  # group: channel groups (must divide every norm's channels)
    # imagenet: 7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max-pool | small: one 3x3
    # stride-1 conv, as the paper's CIFAR nets (CIFAR-sized or smaller images)
    stem: CNNStem = "imagenet"

    def __post_init__(self):
        if not self.blocks and self.depth not in DENSENET_DEPTHS:
            raise ConfigError(f"model.depth={self.depth} has no published layout; choose one of "
                              f"{', '.join(map(str, DENSENET_DEPTHS))} or set model.blocks")
        if any(n < 1 for n in self.blocks):
            raise ConfigError(f"model.blocks={list(self.blocks)}: every block needs >= 1 layer")
        for key in ("growth_rate", "init_features", "bn_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        if not 0.0 < self.compression <= 1.0:
            raise ConfigError(f"model.compression={self.compression} must be in (0, 1]")
        _check_widths(self)
        super().__post_init__()

    @property
    def block_layers(self) -> tuple[int, ...]:
        """Dense layers per block: `blocks`, or the layout of `depth`."""
        return tuple(self.blocks) or DENSENET_DEPTHS[self.depth]

    @property
    def growth(self) -> int:
        """growth_rate after `width_multiplier`."""
        return _channels(self.growth_rate, self.width_multiplier, self.width_divisor)

    @property
    def stem_width(self) -> int:
        """init_features after `width_multiplier`."""
        return _channels(self.init_features, self.width_multiplier, self.width_divisor)



# ---- EfficientNet and RegNet sections (jaxscale.models.efficientnet, .regnet) ----

# The stems of EfficientNet and RegNet (CNNStem's choices): one 3x3 conv, strided for
# ImageNet-sized images and not for CIFAR-sized or smaller ones. Stem name -> the conv's stride.
STEM_STRIDES: dict[str, int] = {"imagenet": 2, "small": 1}

EfficientNetVariant = Literal["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"]
# variant -> (width multiplier, depth multiplier, input resolution, dropout before the head), the
# compound-scaled family of Tan & Le 2019 (table 2 and the reference implementation)
EFFICIENTNET_VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5),
}
# B0's MBConv stages: (expand ratio, kernel, stride, input channels, output channels, repeats)
EFFICIENTNET_B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
)
EFFICIENTNET_STEM, EFFICIENTNET_HEAD = 32, 1280  # B0's stem and head (1x1 conv) channels


def round_filters(channels: float, divisor: int = 8) -> int:
    """`channels` rounded to the nearest multiple of `divisor`, and up by one more where that
    lost over 10% (EfficientNet's and RegNet's rule: a narrow layer never shrinks much)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


@dataclass(frozen=True)
class EfficientNetConfig(ConvNetConfig):
    """An EfficientNet (`jaxscale.models.efficientnet`), Tan & Le 2019: MBConv stages with
    squeeze-excitation, B0 grown by compound scaling into B1..B7."""

    name: str = "efficientnet"  # model registry key (jaxscale.models.MODELS)
    variant: EfficientNetVariant = "b0"  # b0..b7: width and depth multipliers, dropout
    width_mult: float = 0.0  # channel multiplier of every layer; 0 = the variant's
    depth_mult: float = 0.0  # multiplier of each stage's repeats (rounded up); 0 = the variant's
    # the first n stages of the table (0 = all 7; fewer: a shallower net, e.g. for tiny images)
    num_stages: int = 0
    dropout: float = -1.0  # dropout before the head; -1 = the variant's
    # stochastic depth of the residual MBConv blocks: block i of N is dropped with probability
    # drop_connect x i / N (per example, during training only)
    drop_connect: float = 0.2
    stem: CNNStem = "imagenet"  # imagenet: a 3x3 stride-2 conv | small: stride 1 (tiny images)
    norm_groups: int = 8  # group: channel groups (must divide every layer's channels)
    norm_eps: float = 1e-3  # epsilon inside the norms (the reference implementation's)
    bn_momentum: float = 0.99  # batch: running <- momentum x running + (1 - momentum) x batch

    def __post_init__(self):
        for key in ("width_mult", "depth_mult"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0 (0 = "
                                  f"model.variant={self.variant}'s)")
        if not 0 <= self.num_stages <= len(EFFICIENTNET_B0_STAGES):
            raise ConfigError(f"model.num_stages={self.num_stages} must be in [0, "
                              f"{len(EFFICIENTNET_B0_STAGES)}] (0 = all)")
        if not (self.dropout == -1.0 or 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1) (or -1: "
                              f"model.variant={self.variant}'s)")
        if not 0.0 <= self.drop_connect < 1.0:
            raise ConfigError(f"model.drop_connect={self.drop_connect} must be in [0, 1)")
        super().__post_init__()

    @property
    def resolution(self) -> int:
        """The image side the variant was designed for (the task's input_shape decides)."""
        return EFFICIENTNET_VARIANTS[self.variant][2]

    @property
    def head_dropout(self) -> float:
        return self.dropout if self.dropout >= 0 else EFFICIENTNET_VARIANTS[self.variant][3]

    def filters(self, channels: int) -> int:
        """B0's `channels` times the width multiplier, rounded to a multiple of 8."""
        return round_filters(channels * (self.width_mult or EFFICIENTNET_VARIANTS[self.variant][0]))

    @property
    def stem_width(self) -> int:
        return self.filters(EFFICIENTNET_STEM)

    @property
    def head_width(self) -> int:
        return self.filters(EFFICIENTNET_HEAD)

    @property
    def stages(self) -> tuple[tuple[int, int, int, int, int, int], ...]:
        """The scaled stage table: (expand ratio, kernel, stride, input channels, output
        channels, repeats), channels by `filters` and repeats rounded up."""
        depth = self.depth_mult or EFFICIENTNET_VARIANTS[self.variant][1]
        return tuple((e, k, s, self.filters(c_in), self.filters(c_out), math.ceil(n * depth))
                     for e, k, s, c_in, c_out, n in
                     EFFICIENTNET_B0_STAGES[:self.num_stages or len(EFFICIENTNET_B0_STAGES)])


    @property
    def drop_rates(self) -> tuple[float, ...]:
        """Each block's stochastic depth rate: drop_connect x (block index) / (blocks), from 0
        for the first block (as the reference implementation)."""
        total = sum(stage[-1] for stage in self.stages)
        return tuple(self.drop_connect * i / total for i in range(total))


RegNetVariant = Literal["regnetx_400mf", "regnetx_800mf", "regnety_400mf", "regnety_800mf"]
# variant -> (depth, w0, wa, wm, group width, squeeze-excitation) of Radosavovic et al. 2020
# (the published RegNetX / RegNetY models, as pycls and torchvision build them)
REGNET_VARIANTS: dict[str, tuple[int, int, float, float, int, bool]] = {
    "regnetx_400mf": (22, 24, 24.48, 2.54, 16, False),
    "regnetx_800mf": (16, 56, 35.73, 2.28, 16, False),
    "regnety_400mf": (16, 48, 27.89, 2.09, 8, True),
    "regnety_800mf": (14, 56, 38.84, 2.40, 16, True),
}
REGNET_STEM = 32  # channels of the stem conv
REGNET_QUANT = 8  # block widths are quantised to multiples of this
REGNET_SE_RATIO = 0.25  # a Y block's squeeze width / the block's input width


@dataclass(frozen=True)
class RegNetConfig(ConvNetConfig):
    """A RegNet (`jaxscale.models.regnet`), Radosavovic et al. 2020: stages of X blocks (1x1,
    grouped 3x3, 1x1 residual bottlenecks) or Y blocks (X with squeeze-excitation), whose widths
    follow a quantised linear rule of depth, w0, wa and wm."""

    name: str = "regnet"  # model registry key (jaxscale.models.MODELS)
    variant: RegNetVariant = "regnety_400mf"  # the published model the fields below default to
    depth: int = 0  # blocks in all; 0 = the variant's
    w0: int = 0  # width of the first block (a multiple of 8); 0 = the variant's
    wa: float = 0.0  # slope of the linear widths u_j = w0 + wa x j; 0 = the variant's
    wm: float = 0.0  # ratio between the quantised widths of consecutive stages; 0 = the variant's
    group_width: int = 0  # channels per group of the 3x3 convs; 0 = the variant's
    se: bool | None = None  # squeeze-excitation after the 3x3 (a Y block); None = the variant's
    stem: CNNStem = "imagenet"  # imagenet: a 3x3 stride-2 conv | small: stride 1 (tiny images)
    norm_groups: int = 8  # group: channel groups (must divide every stage's width)

    def __post_init__(self):
        for key in ("depth", "w0", "wa", "wm", "group_width"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0 (0 = "
                                  f"model.variant={self.variant}'s)")
        if self.block_w0 % REGNET_QUANT:
            raise ConfigError(f"model.w0={self.block_w0} must be a multiple of {REGNET_QUANT} "
                              "(the widths are quantised to multiples of it)")
        if self.block_wm <= 1.0:
            raise ConfigError(f"model.wm={self.block_wm} must be above 1 (each stage is wider "
                              "than the last)")
        super().__post_init__()

    def _published(self, index: int):
        return REGNET_VARIANTS[self.variant][index]

    @property
    def block_w0(self) -> int:
        return self.w0 or self._published(1)

    @property
    def block_wm(self) -> float:
        return self.wm or self._published(3)

    @property
    def se_ratio(self) -> float:
        """The squeeze width over the block's input width; 0 for an X block."""
        se = self._published(5) if self.se is None else self.se
        return REGNET_SE_RATIO if se else 0.0

    @property
    def block_widths(self) -> tuple[int, ...]:
        """Each block's width by the quantised linear rule: u_j = w0 + wa x j, s_j = round(
        log(u_j / w0) / log(wm)), w_j = w0 x wm^s_j rounded to a multiple of 8."""
        depth, wa = self.depth or self._published(0), self.wa or self._published(2)
        w0, wm = self.block_w0, self.block_wm
        steps = [round(math.log((w0 + wa * j) / w0) / math.log(wm)) for j in range(depth)]
        return tuple(round(w0 * wm**s / REGNET_QUANT) * REGNET_QUANT for s in steps)

    @property
    def stage_layout(self) -> tuple[tuple[int, int, int], ...]:
        """(width, blocks, group width) per stage: the runs of equal block widths, each width
        then made a multiple of its group width (the group width capped at the width)."""
        runs: list[list[int]] = []
        for w in self.block_widths:
            if runs and runs[-1][0] == w:
                runs[-1][1] += 1
            else:
                runs.append([w, 1])
        g = self.group_width or self._published(4)
        return tuple((round_filters(w, min(g, w)), n, min(g, w)) for w, n in runs)

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(w for w, _, _ in self.stage_layout)

    @property
    def stage_depths(self) -> tuple[int, ...]:
        return tuple(n for _, n, _ in self.stage_layout)


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
SECTIONS: dict[str, type] = {"resnet": ResNetConfig, "vit": ViTConfig,
                             "vgg": VGGConfig, "googlenet": GoogLeNetConfig,
                             "densenet": DenseNetConfig,
                             "efficientnet": EfficientNetConfig, "regnet": RegNetConfig}
for _name, _section in SECTIONS.items():
    register_model_config(_name, _section)
