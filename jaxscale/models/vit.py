"""Vision Transformer image classifiers (Dosovitskiy et al. 2020, "An Image is Worth 16x16
Words").

The image is cut into p x p patches, each embedded to a token of width D (a strided conv, or a
reshape and a dense layer: the same linear map); positions are added (a learned table, or fixed
2D sine-cosine), a learned class token is prepended when `model.pool=cls`, and pre-norm
transformer blocks run over all tokens with bidirectional attention. The blocks are the
decoder's own `Attention` and `Mlp` (`jaxscale.models.decoder`) under a decoder config built
from the ViT section (`decoder_config`), so parameter names, logical axis names, remat tags and
the attention implementations are shared with the language model. Stochastic depth (Huang et al.
2016) drops a block's residual branches per example, more often in later blocks.

With learned positions the table has one row per patch of a `model.image_size` image, kept
apart from the class token's own position ("cls_pos_embed"), so that the table stays a
[grid, grid, D] image that `jax.image.resize` interpolates for inputs of another size
(fine-tuning at a higher resolution); the class token's position is the same at every size.
Together they are the published ViT-B/16's 197 positions (86,567,656 parameters).

Parameters are named by logical axes ("embed", "heads", "mlp", ...) and activations
``("batch", "length", "act_embed")``; the sharding rules decide the mesh axes.

Shape legend for tensor names (``patches_BPD``):
  B batch     H height     W width     C channels     p patch side
  P patches   T tokens (P, +1 with the class token)   D width (d_model)
  G grid side (H / p, W / p)     K classes
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscale.config import ModelConfig
from jaxscale.core.dtypes import dtype
from jaxscale.core.sharding import constrain
from jaxscale.errors import ConfigError
from jaxscale.models.conv import head
from jaxscale.models.decoder import Attention, Mlp, norm_layer, reference_attention, rematted
from jaxscale.vision_config import ViTConfig

TOKENS = ("batch", "length", "act_embed")  # logical names of an activation x_BTD
POS_STD = 0.02  # stddev of the learned position table and of the decoder's dense kernels
SINCOS_TEMPERATURE = 10_000.0  # the base of the sine-cosine frequencies (as in the 1D original)


def decoder_config(cfg: ViTConfig) -> ModelConfig:
    """The decoder config whose `Attention` and `Mlp` are this ViT's: bias everywhere, GELU,
    layer norms, multi-head attention and no rotary positions (the ViT adds its own)."""
    return ModelConfig(
        num_layers=cfg.depth, d_model=cfg.width, num_heads=cfg.heads, num_kv_heads=cfg.heads,
        d_ff=cfg.mlp_width, norm="layernorm", mlp="gelu", position="learned", use_bias=True,
        norm_eps=cfg.norm_eps, dropout=cfg.dropout, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, attention=cfg.attention, remat=cfg.remat,
        scan_layers=False,  # blocks differ in their drop-path rate, so they are unrolled
    )


def bidirectional_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array,
                            segment_ids_BT: jax.Array | None, implementation: str) -> jax.Array:
    """Attention in which every token sees every token (the decoder's `attention` signature;
    images carry no segments). "auto" takes cuDNN's fused kernel on GPU for half-precision
    inputs and XLA's otherwise, and falls back to XLA where cuDNN has no kernel for the shape
    (197 tokens of ViT-B/16, say)."""
    del segment_ids_BT
    if implementation == "reference":
        return reference_attention(q_BTNH, k_BTNH, v_BTNH, None, causal=False)
    impl = implementation
    if impl == "auto":
        fusable = jax.default_backend() == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
        impl = "cudnn" if fusable else "xla"
    try:
        return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=False,
                                            implementation=impl)
    except (NotImplementedError, ValueError, RuntimeError):
        if implementation != "auto":
            raise
        return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=False,
                                            implementation="xla")


def grid(cfg: ViTConfig, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Patches per column and per row of an image [H, W, C] (or a batch [B, H, W, C]).

    Raises:
      ConfigError: H or W is not a multiple of the patch size.
    """
    h, w, c = input_shape[-3:]
    p = cfg.patch_size
    if h % p or w % p:
        raise ConfigError(f"images of shape {h}x{w}x{c} do not divide into model.patch_size={p} "
                          f"patches; give inputs whose height and width are multiples of {p}")
    return h // p, w // p


# ---- patch embedding: images_BHWC -> patches_BPD (model.patch_embed) ----

def _embed_init():
    # LeCun normal over the p*p*C inputs of a patch, for either form (the same linear map).
    return nn.initializers.lecun_normal()


def _patch_conv(cfg: ViTConfig, x_BHWC: jax.Array) -> jax.Array:
    p = cfg.patch_size
    x_BGGD = nn.Conv(
        cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype(cfg.dtype),
        param_dtype=dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(_embed_init(), (None, None, "channels", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="patch_embed",
    )(x_BHWC)
    B, gh, gw, D = x_BGGD.shape
    return x_BGGD.reshape(B, gh * gw, D)


def patchify(x_BHWC: jax.Array, p: int) -> jax.Array:
    """Images -> their p x p patches, row-major over the grid, each flattened in (row, col,
    channel) order: [B, P, p*p*C], the order of a [p, p, C, D] conv kernel reshaped."""
    B, H, W, C = x_BHWC.shape
    x = x_BHWC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def _patch_dense(cfg: ViTConfig, x_BHWC: jax.Array) -> jax.Array:
    pixels_BPX = patchify(x_BHWC, cfg.patch_size)  # X = p*p*C
    return nn.Dense(
        cfg.width, dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(_embed_init(), (None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="patch_embed",
    )(pixels_BPX)


# patch_embed name -> fn(cfg, images) -> patches_BPD; keyed like vision_config.ViTPatchEmbed
PATCH_EMBEDS: dict[str, Callable[[ViTConfig, jax.Array], jax.Array]] = {
    "conv": _patch_conv, "dense": _patch_dense,
}


# ---- positions: (module, cfg, gh, gw) -> pos_PD (model.position) ----

def sincos_positions(gh: int, gw: int, width: int) -> jax.Array:
    """Fixed 2D sine-cosine positions [gh * gw, width] (float32), row-major over the grid.

    A quarter of the width each: sin(col w_i), cos(col w_i), sin(row w_i), cos(row w_i) with
    w_i = 10000^(-i / (q - 1)), i < q = width / 4 (big_vision's `posemb_sincos_2d`).
    """
    quarter = width // 4
    exponent = jnp.arange(quarter, dtype=jnp.float32) / max(1, quarter - 1)
    omega = SINCOS_TEMPERATURE ** (-exponent)
    rows, cols = jnp.meshgrid(jnp.arange(gh, dtype=jnp.float32),
                              jnp.arange(gw, dtype=jnp.float32), indexing="ij")
    col_Pq = cols.reshape(-1, 1) * omega
    row_Pq = rows.reshape(-1, 1) * omega
    return jnp.concatenate([jnp.sin(col_Pq), jnp.cos(col_Pq), jnp.sin(row_Pq),
                            jnp.cos(row_Pq)], axis=1)


def interpolate(table_PD: jax.Array, gh: int, gw: int) -> jax.Array:
    """A square position table [G * G, D] resized to a gh x gw grid (bilinear, on its
    [G, G, D] image view); unchanged when the grid is the same."""
    side = round(table_PD.shape[0] ** 0.5)
    if (side, side) == (gh, gw):
        return table_PD
    table_GGD = table_PD.reshape(side, side, -1).astype(jnp.float32)
    resized = jax.image.resize(table_GGD, (gh, gw, table_PD.shape[-1]), method="bilinear")
    return resized.reshape(gh * gw, -1).astype(table_PD.dtype)


def _learned(module: nn.Module, cfg: ViTConfig, gh: int, gw: int) -> jax.Array:
    side = cfg.resolution // cfg.patch_size
    table_PD = module.param(
        "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(POS_STD),
                                                  (None, "embed")),
        (side * side, cfg.width), dtype(cfg.param_dtype))
    return interpolate(table_PD, gh, gw)


def _sincos(module: nn.Module, cfg: ViTConfig, gh: int, gw: int) -> jax.Array:
    del module
    return sincos_positions(gh, gw, cfg.width)


# position name -> fn(module, cfg, gh, gw) -> pos_PD; keyed like vision_config.ViTPosition
POSITIONS: dict[str, Callable[..., jax.Array]] = {"learned": _learned, "sincos": _sincos}


# ---- pooling: x_BTD -> x_BD (model.pool) ----

# pool name -> fn(normed tokens) -> x_BD; keyed like vision_config.ViTPool. The class token is
# token 0; the mean is in float32 (a bf16 sum over the patches loses digits).
POOLS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "cls": lambda x_BTD: x_BTD[:, 0],
    "gap": lambda x_BTD: jnp.mean(x_BTD.astype(jnp.float32), axis=1),
}


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a `rate` fraction of the examples and scale
    the rest by 1 / (1 - rate), so the expected output is unchanged; the identity at eval."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x_BTD
        keep = 1.0 - self.rate
        mask_B11 = jax.random.bernoulli(self.make_rng("dropout"), keep, (x_BTD.shape[0], 1, 1))
        return jnp.where(mask_B11, x_BTD / keep, jnp.zeros_like(x_BTD))


class Block(nn.Module):
    """A pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x)), each branch under
    stochastic depth with the block's `drop_path` rate."""

    cfg: ModelConfig  # the decoder config of the ViT (`decoder_config`)
    drop_path: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg, det = self.cfg, self.deterministic
        x_BTD = constrain(x_BTD, TOKENS)
        h_BTD = norm_layer(cfg, "attn_norm")(x_BTD)
        h_BTD = Attention(cfg, det, bidirectional_attention, name="attn")(h_BTD, None, None)
        x_BTD = x_BTD + DropPath(self.drop_path, det, name="attn_drop_path")(h_BTD)
        h_BTD = Mlp(cfg, det, name="mlp")(norm_layer(cfg, "mlp_norm")(x_BTD))
        x_BTD = x_BTD + DropPath(self.drop_path, det, name="mlp_drop_path")(h_BTD)
        return constrain(x_BTD, TOKENS)


def drop_rates(cfg: ViTConfig) -> list[float]:
    """Each block's drop rate: linear from 0 (the first block) to `model.drop_path` (the last),
    so the early blocks, whose features everything after builds on, are kept most."""
    return [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]


class ViT(nn.Module):
    """A Vision Transformer of `cfg`: images_BHWC (float) -> logits_BK.

    Raises:
      ConfigError: the image height or width is not a multiple of `model.patch_size`.
    """

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images_BHWC: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        gh, gw = grid(cfg, images_BHWC.shape)
        x_BHWC = images_BHWC.astype(dtype(cfg.dtype))
        patches_BPD = PATCH_EMBEDS[cfg.patch_embed](cfg, x_BHWC)
        pos_PD = POSITIONS[cfg.position](self, cfg, gh, gw)
        x_BTD = patches_BPD + pos_PD.astype(patches_BPD.dtype)
        if cfg.pool == "cls":
            x_BTD = jnp.concatenate([self._class_token(x_BTD), x_BTD], axis=1)
        x_BTD = constrain(x_BTD, TOKENS)
        x_BTD = nn.Dropout(cfg.dropout, deterministic=not train)(x_BTD)
        dcfg = decoder_config(cfg)
        block = rematted(dcfg, Block)
        for i, rate in enumerate(drop_rates(cfg)):
            x_BTD = block(dcfg, rate, not train, name=f"block_{i}")(x_BTD)
        # big_vision's order: the final norm over every token, then the pool.
        x_BTD = norm_layer(dcfg, "final_norm")(x_BTD)
        x_BD = constrain(POOLS[cfg.pool](x_BTD), ("batch", "act_embed"))
        return head(cfg, x_BD)

    def _class_token(self, x_BPD: jax.Array) -> jax.Array:
        """The learned class token (zeros at init, as big_vision's), plus its own position with
        learned positions: x_B1D."""
        cfg = self.cfg
        names = nn.with_logical_partitioning
        token_D = self.param("cls_token", names(nn.initializers.zeros, ("embed",)),
                             (cfg.width,), dtype(cfg.param_dtype))
        if cfg.position == "learned":
            token_D = token_D + self.param(
                "cls_pos_embed", names(nn.initializers.normal(POS_STD), ("embed",)),
                (cfg.width,), dtype(cfg.param_dtype))
        token_D = token_D.astype(x_BPD.dtype)
        return jnp.broadcast_to(token_D, (x_BPD.shape[0], 1, cfg.width))


def forward_macs(cfg: ViTConfig, input_shape: tuple[int, int, int]) -> float:
    """Multiply-accumulates of one example's forward pass [H, W, C].

    With P = (H / p)(W / p) patches, T = P tokens (P + 1 with the class token), width D, MLP
    width F, L blocks and K classes:

        P p^2 C D                              patch embedding
      + L (4 T D^2 + 2 T^2 D + 2 T D F)        q, k, v and out projections; scores and their
                                               weighted sum; the MLP's two layers
      + D K                                    head

    Norms, softmax, GELU and residual adds (a few operations per activation) are left out.
    ViT-B/16 at 224 x 224 comes to 17.56 G (the paper's "17.6" GFLOPs, counted as MACs).

    Raises:
      ConfigError: H or W is not a multiple of the patch size.
    """
    gh, gw = grid(cfg, input_shape)
    channels = input_shape[-1]
    P = gh * gw
    T = P + (cfg.pool == "cls")
    D, F, p = cfg.width, cfg.mlp_width, cfg.patch_size
    per_layer = 4 * T * D * D + 2 * T * T * D + 2 * T * D * F
    return float(P * p * p * channels * D + cfg.depth * per_layer + D * cfg.num_classes)
