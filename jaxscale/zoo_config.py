"""The config sections of the CNN zoo: VGG, GoogLeNet, DenseNet, EfficientNet and RegNet.

Each reproduces its published layout by default (the parameter counts of
tests/test_cnn_zoo.py and tests/test_efficientnet_regnet.py) and shares the head, norm and dtype
fields of `vision_config.ConvNetConfig`. Like every section, each field has a one-line comment
and the constructor rejects a bad value with a one-line `ConfigError` naming the key. This
module never imports jax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from jaxscale.config import register_model_config
from jaxscale.errors import ConfigError
from jaxscale.vision_config import CNNStem, ConvNetConfig, NormKind

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


# model.name -> its config section, registered with jaxscale.config when it first loads a config
SECTIONS: dict[str, type] = {"vgg": VGGConfig, "googlenet": GoogLeNetConfig,
                             "densenet": DenseNetConfig, "efficientnet": EfficientNetConfig,
                             "regnet": RegNetConfig}
for _name, _section in SECTIONS.items():
    register_model_config(_name, _section)
