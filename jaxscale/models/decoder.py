"""Decoder-only transformer language model, Llama-style or GPT-2-style by configuration.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and every activation
is constrained by logical names at block boundaries and inside attention and the MLP
(`sharding.constrain`); which mesh axes those names map to is decided by the sharding rules,
never here.

Shape legend for tensor names (``q_BTNH``):
  B batch            T query length      S key/value length
  D d_model          N query heads       K key/value heads      H head dim
  F MLP hidden       V vocabulary
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxscale.config import ModelConfig
from jaxscale.core import context, remat
from jaxscale.core.dtypes import dtype, weight_grad_dot, weight_grad_dtype
from jaxscale.core.sharding import constrain
from jaxscale.core.vocab import HeadInputs
from jaxscale.models.adapter import Stages
from jaxscale.models.moe import MoeMlp
from jaxscale.models.moe import summarize as summarize_moe


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _dense(cfg: ModelConfig, features, axes, *, name, axis=-1, std=None, bias=None):
    num_in = 1 if isinstance(axis, int) else len(axis)
    return nn.DenseGeneral(
        dot_general=weight_grad_dot(cfg.weight_grad_dtype, cfg.dtype),
        features=features,
        axis=axis,
        use_bias=cfg.use_bias if bias is None else bias,
        dtype=dtype(cfg.dtype),
        param_dtype=dtype(cfg.param_dtype),
        kernel_init=_init(cfg.init_std if std is None else std, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[num_in:]),
        name=name,
    )


def norm_layer(cfg: ModelConfig, name: str) -> nn.Module:
    """The block norm `cfg.norm` names (RMSNorm or LayerNorm), its parameters named "norm"."""
    common = dict(
        epsilon=cfg.norm_eps, dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), name=name,
    )
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(**common)
    return nn.LayerNorm(
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), **common
    )


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """The rotary inverse frequencies theta^(-2i/H), i < H/2, after `model.rope_scaling`.

    linear divides every frequency by rope_factor (positions stretched); llama3 divides only
    the low frequencies (wavelength above rope_original_max_len / rope_low_freq_factor), keeps
    the high ones (below rope_original_max_len / rope_high_freq_factor) and blends between.
    """
    half = cfg.head_size // 2
    inv_freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        wavelength = 2 * math.pi / inv_freq
        low = cfg.rope_original_max_len / cfg.rope_low_freq_factor
        high = cfg.rope_original_max_len / cfg.rope_high_freq_factor
        smooth = (cfg.rope_original_max_len / wavelength - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
        scaled = jnp.where(wavelength > low, inv_freq / cfg.rope_factor, inv_freq)
        middle = (wavelength <= low) & (wavelength >= high)
        return jnp.where(middle, blended, scaled)
    return inv_freq


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary position embedding (rotate-half form), computed in float32."""
    angle_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    sin = jnp.sin(angle_BTh)[:, :, None, :]
    cos = jnp.cos(angle_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def reference_attention(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array | None,
    *, causal: bool = True,
) -> jax.Array:
    """Attention written out (float32 softmax); the yardstick for the fused paths. Causal by
    slot unless `causal=False` (then `mask_BTS` alone says which keys a query sees)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH).astype(jnp.float32)
    scores_BKGTS = scores_BKGTS / math.sqrt(H)
    allowed = jnp.ones((1, T, k_BSKH.shape[1]), dtype=bool)
    if causal:
        allowed = jnp.tril(allowed)
    if mask_BTS is not None:
        allowed = allowed & mask_BTS
    scores_BKGTS = jnp.where(allowed[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    segment_ids_BT: jax.Array | None,
    implementation: str,
) -> jax.Array:
    """Causal (and, with segment ids, document-masked) attention with grouped-query heads.

    Args:
      implementation: "reference" (explicit einsums), "xla", "cudnn" (fused kernel, GPU), or
        "auto": cudnn on GPU for half-precision inputs, else xla. With segment ids cuDNN takes
        the document mask as an additive bias; XLA's path would materialise every [T, S] score
        and run at less than half the speed (benchmarks/RESULTS.md).
    """
    mask_BTS = None
    if segment_ids_BT is not None:
        mask_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    if implementation == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    impl = implementation
    if impl == "auto":
        fusable = jax.default_backend() == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
        impl = "cudnn" if fusable else "xla"
    mask = None if mask_BTS is None else mask_BTS[:, None]
    try:
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=True, implementation=impl
        )
    except (NotImplementedError, ValueError, RuntimeError):
        if implementation != "auto":
            raise
        # cuDNN rejects some shapes (e.g. head dims it has no kernel for): use XLA's.
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=True, implementation="xla"
        )


def attend(cfg: ModelConfig, q_BTNH, k_BSKH, v_BSKH, positions_BT, segment_ids_BT,
           attention_fn: Callable | None = None) -> jax.Array:
    """Projected queries, keys and values -> attention output: tagged for the remat policies,
    constrained by logical names, rotated (rope) and attended. Shared by both decoders.

    With `model.context_parallel` set the attention runs over the length-sharded sequence
    (`jaxscale.core.context`); for the load-balanced ring the batch arrives in
    `context.balanced_order` (the train step reorders it) and positions stay global."""
    q_BTNH = checkpoint_name(q_BTNH, remat.QUERY_PROJ)
    k_BSKH = checkpoint_name(k_BSKH, remat.KEY_PROJ)
    v_BSKH = checkpoint_name(v_BSKH, remat.VALUE_PROJ)
    q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", "act_head_dim"))
    k_BSKH = constrain(k_BSKH, ("batch", "length", "act_kv_heads", "act_head_dim"))
    v_BSKH = constrain(v_BSKH, ("batch", "length", "act_kv_heads", "act_head_dim"))
    if cfg.position == "rope":
        inv_freq = rope_frequencies(cfg)
        q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
        k_BSKH = apply_rope(k_BSKH, positions_BT, inv_freq)
    if attention_fn is None and cfg.context_parallel != "none":
        balanced = cfg.context_parallel == "ring" and cfg.context_load_balance

        def attention_fn(q, k, v, segment_ids, implementation):
            return context.context_attention(q, k, v, segment_ids, mode=cfg.context_parallel,
                                             balanced=balanced, implementation=implementation)
    out_BTNH = (attention_fn or attention)(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, cfg.attention)
    out_BTNH = constrain(out_BTNH, ("batch", "length", "act_heads", "act_head_dim"))
    return checkpoint_name(out_BTNH, remat.ATTN_OUT)


# Logical names of the key/value cache (`Attention` with decode=True): batch over the batch
# axes, kv heads over tensor; the cache length is never split.
CACHE_KV_NAMES = ("batch", None, "act_kv_heads", "act_head_dim")
CACHE_SLOT_NAMES = ("batch", None)


class Attention(nn.Module):
    cfg: ModelConfig
    deterministic: bool
    attention_fn: Callable | None = None  # replaces `attention` (e.g. a planning stand-in)
    decode: bool = False  # attend over a key/value cache (the "cache" collection)

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        cfg = self.cfg
        N = cfg.num_heads
        K, H = cfg.kv_heads, cfg.head_size
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        q_BTNH = _dense(cfg, (N, H), ("embed", "heads", "head_dim"), name="query",
                        bias=qkv_bias)(x_BTD)
        k_BSKH = _dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), name="key",
                        bias=qkv_bias)(x_BTD)
        v_BSKH = _dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), name="value",
                        bias=qkv_bias)(x_BTD)
        attention_fn = self.attention_fn
        if self.decode:
            attention_fn = self._cached_attention(positions_BT, segment_ids_BT)
        out_BTNH = attend(cfg, q_BTNH, k_BSKH, v_BSKH, positions_BT, segment_ids_BT,
                          attention_fn)
        out_BTD = _dense(
            cfg, cfg.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1), name="out",
            std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
        )(out_BTNH)
        return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(out_BTD)

    def _cached_attention(self, positions_BT, segment_ids_BT) -> Callable:
        """An attention function that appends this call's (rotated) keys and values to the
        cache and attends over all of it.

        The cache holds, per slot, the key, the value, the token's position and its segment id
        (0 = empty or padding): a query sees the keys of its own segment at positions up to its
        own, so left-padded prompts of different lengths share the slots. Its length is the
        token length of the `init` call; `index` is the next free slot.
        """

        def cached(q_BTNH, k_BTKH, v_BTKH, _segment_ids, _implementation):
            B, T, K, H = k_BTKH.shape
            segments_BT = (jnp.ones((B, T), jnp.int32) if segment_ids_BT is None
                           else segment_ids_BT.astype(jnp.int32))
            slots = lambda names: nn.with_logical_partitioning(jnp.zeros, names)
            key = self.variable("cache", "cached_key", slots(CACHE_KV_NAMES), k_BTKH.shape,
                                k_BTKH.dtype)
            value = self.variable("cache", "cached_value", slots(CACHE_KV_NAMES), v_BTKH.shape,
                                  v_BTKH.dtype)
            position = self.variable("cache", "positions", slots(CACHE_SLOT_NAMES), (B, T),
                                     jnp.int32)
            segment = self.variable("cache", "segments", slots(CACHE_SLOT_NAMES), (B, T),
                                    jnp.int32)
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            i = index.value
            key.value = jax.lax.dynamic_update_slice(key.value, k_BTKH, (0, i, 0, 0))
            value.value = jax.lax.dynamic_update_slice(value.value, v_BTKH, (0, i, 0, 0))
            position.value = jax.lax.dynamic_update_slice(
                position.value, positions_BT.astype(jnp.int32), (0, i))
            segment.value = jax.lax.dynamic_update_slice(segment.value, segments_BT, (0, i))
            index.value = i + T
            k_seg_B1S, k_pos_B1S = segment.value[:, None, :], position.value[:, None, :]
            mask_BTS = ((k_seg_B1S == segments_BT[:, :, None]) & (k_seg_B1S != 0)
                        & (k_pos_B1S <= positions_BT[:, :, None]))
            k_BSKH = constrain(key.value, CACHE_KV_NAMES)
            v_BSKH = constrain(value.value, CACHE_KV_NAMES)
            return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, causal=False)

        return cached


class Mlp(nn.Module):
    cfg: ModelConfig
    deterministic: bool
    d_ff: int = 0  # hidden width; 0 = cfg.d_ff

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        d_ff = self.d_ff or cfg.d_ff
        up_BTF = _dense(cfg, d_ff, ("embed", "mlp"), name="wi_up")(x_BTD)
        up_BTF = checkpoint_name(up_BTF, remat.MLP_IN)
        if cfg.mlp == "swiglu":
            gate_BTF = _dense(cfg, d_ff, ("embed", "mlp"), name="wi_gate")(x_BTD)
            gate_BTF = checkpoint_name(gate_BTF, remat.MLP_IN)
            h_BTF = nn.silu(gate_BTF) * up_BTF
        else:
            h_BTF = nn.gelu(up_BTF)
        h_BTF = constrain(h_BTF, ("batch", "length", "act_mlp"))
        out_BTD = _dense(
            cfg, cfg.d_model, ("mlp", "embed"), name="wo",
            std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
        )(h_BTF)
        out_BTD = checkpoint_name(out_BTD, remat.MLP_OUT)
        return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(out_BTD)


class Block(nn.Module):
    """Pre-norm transformer block. Returns (x, stats) so that nn.scan can carry x: stats are
    the MoE layer's (`moe.MoeMlp`) when `moe`, else None."""

    cfg: ModelConfig
    deterministic: bool
    attention_fn: Callable | None = None
    moe: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        cfg = self.cfg
        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
        h_BTD = norm_layer(cfg, "attn_norm")(x_BTD)
        x_BTD = x_BTD + Attention(cfg, self.deterministic, self.attention_fn, self.decode,
                                  name="attn")(
            h_BTD, positions_BT, segment_ids_BT
        )
        h_BTD = norm_layer(cfg, "mlp_norm")(x_BTD)
        stats = None
        if self.moe:
            mlp_BTD, stats = MoeMlp(cfg, self.deterministic, name="moe")(h_BTD)
        else:
            mlp_BTD = Mlp(cfg, self.deterministic, name="mlp")(h_BTD)
        x_BTD = constrain(x_BTD + mlp_BTD, ("batch", "length", "act_embed"))
        return x_BTD, stats


class BlockGroup(nn.Module):
    """`model.moe.every_n_layers` blocks, the last a MoE block: the unit nn.scan repeats when
    dense and MoE layers alternate. Returns (x, the MoE block's stats)."""

    cfg: ModelConfig
    deterministic: bool
    attention_fn: Callable | None = None
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        n = self.cfg.moe.every_n_layers
        stats = None
        for i in range(n):
            x_BTD, stats = Block(self.cfg, self.deterministic, self.attention_fn,
                                 moe=i == n - 1, decode=self.decode, name=f"block_{i}")(
                x_BTD, positions_BT, segment_ids_BT)
        return x_BTD, stats


def _embed(cfg: ModelConfig, tokens_BT, positions_BT, deterministic: bool):
    """Token (and learned position) embeddings, in the calling module's scope ("embed",
    "pos_embed"). Returns (x_BTD, the token embedding module)."""
    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=dtype(cfg.dtype),
        param_dtype=dtype(cfg.param_dtype),
        embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="embed",
    )
    x_BTD = embed(tokens_BT)
    if cfg.position == "learned":
        x_BTD = x_BTD + nn.Embed(
            cfg.max_seq_len, cfg.d_model, dtype=dtype(cfg.dtype),
            param_dtype=dtype(cfg.param_dtype),
            embedding_init=_init(cfg.init_std / 2, (None, "embed")), name="pos_embed",
        )(positions_BT)
    x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
    return nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BTD), embed


def rematted(cfg: ModelConfig, cls):
    """The module class `cls` under `cfg.remat`'s policy (itself for remat=none)."""
    policy = remat.get_policy(cfg.remat)
    if policy is None:
        return cls
    return nn.remat(cls, policy=policy, prevent_cse=not cfg.scan_layers)


def _stack(cfg: ModelConfig, deterministic: bool, attention_fn: Callable | None, length: int,
           x_BTD, positions_BT, segment_ids_BT, decode: bool = False):
    """`length` scanned units ("layers", leading dimension named "layers"): blocks, or groups of
    dense blocks ending in a MoE block. Returns (x_BTD, the MoE stats or None)."""
    moe = cfg.moe.num_experts > 0
    grouped = moe and cfg.moe.every_n_layers > 1
    keywords = {"decode": decode} if grouped else {"moe": moe, "decode": decode}
    stack = nn.scan(
        rematted(cfg, BlockGroup if grouped else Block),
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        unroll=min(cfg.scan_unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    layers = stack(cfg, deterministic, attention_fn, name="layers", **keywords)
    return layers(x_BTD, positions_BT, segment_ids_BT)


def _logits(cfg: ModelConfig, x_BTD, embed: nn.Embed | None = None, *, hidden: bool = False):
    """The final norm and the vocabulary projection (the token embedding's, when tied); with
    `hidden`, the normed states and the projection's weights (`HeadInputs`) instead of the
    logits, for a loss that projects a chunk of positions at a time."""
    x_BTD = norm_layer(cfg, "final_norm")(x_BTD)
    if cfg.tie_embeddings:
        embed = embed or nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dtype(cfg.dtype),
            param_dtype=dtype(cfg.param_dtype),
            embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="embed",
        )
        if hidden:
            return HeadInputs(x_BTD, embed.embedding, None, tied=True, dtype=dtype(cfg.dtype),
                              grad_dtype=weight_grad_dtype(cfg.weight_grad_dtype, cfg.dtype))
        logits_BTV = embed.attend(x_BTD)
    elif hidden:
        return _VocabProjection(cfg, name="lm_head")(x_BTD)
    else:
        logits_BTV = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="lm_head")(x_BTD)
    return constrain(logits_BTV, ("batch", "length", "act_vocab"))


class _VocabProjection(nn.Module):
    """lm_head's parameters as `_dense` makes them (same names, shapes, initialisers and so
    values), returned with the states as `HeadInputs` rather than applied."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        axes = ("embed", "vocab")
        kernel = self.param("kernel", _init(cfg.init_std, axes), (cfg.d_model, cfg.vocab_size),
                            dtype(cfg.param_dtype))
        bias = (self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                           (cfg.vocab_size,), dtype(cfg.param_dtype)) if cfg.use_bias else None)
        return HeadInputs(x_BTD, kernel, bias, tied=False, dtype=dtype(cfg.dtype),
                          grad_dtype=weight_grad_dtype(cfg.weight_grad_dtype, cfg.dtype))


def _positions(tokens_BT, positions_BT):
    if positions_BT is not None:
        return positions_BT
    B, T = tokens_BT.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


class Decoder(nn.Module):
    """The decoder LM. Follows the jaxscale model interface:

    ``logits_BTV = model.apply(variables, tokens_BT, positions_BT=None, segment_ids_BT=None,
    deterministic=True, rngs={"dropout": key})``

    `pipeline_stages()` splits it for pipeline parallelism into the embedding, runs of the
    scanned layers and the head, over the same parameter tree. With ``decode=True`` every
    attention layer keeps a key/value cache in the "cache" collection (`jaxscale.generate`):
    ``init`` with tokens as long as the cache, then ``apply(..., mutable=["cache"])`` on the
    prompt and on each new token.
    """

    cfg: ModelConfig
    # replaces the attention function (same signature as `attention`); plan passes a stand-in
    attention_fn: Callable | None = None
    decode: bool = False
    # return `HeadInputs` (hidden states and the vocabulary projection) instead of the logits,
    # for a loss that computes them a chunk at a time (loss.chunked; `core.vocab`)
    hidden_head: bool = False

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, deterministic=True):
        cfg = self.cfg
        positions_BT = _positions(tokens_BT, positions_BT)
        x_BTD, embed = _embed(cfg, tokens_BT, positions_BT, deterministic)
        moe = cfg.moe.num_experts > 0
        if cfg.scan_layers:
            units = cfg.num_layers // (cfg.moe.every_n_layers if moe else 1)
            x_BTD, stats = _stack(cfg, deterministic, self.attention_fn, units, x_BTD,
                                  positions_BT, segment_ids_BT, self.decode)
        else:
            per_layer = []
            layer = rematted(cfg, Block)
            for i in range(cfg.num_layers):
                is_moe = moe and (i + 1) % cfg.moe.every_n_layers == 0
                x_BTD, layer_stats = layer(cfg, deterministic, self.attention_fn, moe=is_moe,
                                           decode=self.decode, name=f"layers_{i}")(
                    x_BTD, positions_BT, segment_ids_BT
                )
                if layer_stats is not None:
                    per_layer.append(layer_stats)
            stats = (jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer
                     else None)
        if stats is not None:
            summarize_moe(self, cfg, stats)
        return _logits(cfg, x_BTD, embed, hidden=self.hidden_head)

    def pipeline_stages(self) -> Stages:
        """The decoder as embedding -> scanned layers -> head, for `jaxscale.core.pipeline`.

        The parameter tree is the decoder's own: the embedding reads "embed" (and "pos_embed"),
        a run of n layers reads "layers" with a leading dimension of n, the head "final_norm"
        and "lm_head" (or "embed", tied). Dropout draws its own streams per stage, so its masks
        differ from an unpipelined call's.
        """
        cfg, attention_fn = self.cfg, self.attention_fn
        if not cfg.scan_layers or cfg.moe.num_experts:
            raise ValueError("the decoder is pipelined with model.scan_layers=true and no "
                             "mixture-of-experts layers")

        def rngs(rng):
            return {} if rng is None else {"dropout": rng}

        def embed(params, inputs, rng, train):
            return _Embedding(cfg).apply({"params": params}, inputs["inputs"],
                                         inputs.get("positions"), deterministic=not train,
                                         rngs=rngs(rng))

        def layers(stack_params, x_BTD, inputs, rng, train):
            tokens = inputs["inputs"]
            length = jax.tree.leaves(stack_params)[0].shape[0]
            return _Layers(cfg, length, attention_fn).apply(
                {"params": {"layers": stack_params}}, x_BTD,
                _positions(tokens, inputs.get("positions")), inputs.get("segment_ids"),
                deterministic=not train, rngs=rngs(rng))

        def head(params, x_BTD, inputs):
            return _Head(cfg, self.hidden_head).apply({"params": params}, x_BTD)

        head_keys = ("final_norm", "embed" if cfg.tie_embeddings else "lm_head")
        return Stages("layers", embed, layers, head, head_keys)


class _Embedding(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, *, deterministic=True):
        return _embed(self.cfg, tokens_BT, _positions(tokens_BT, positions_BT), deterministic)[0]


class _Layers(nn.Module):
    cfg: ModelConfig
    length: int
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, deterministic=True):
        return _stack(self.cfg, deterministic, self.attention_fn, self.length, x_BTD,
                      positions_BT, segment_ids_BT)[0]


class _Head(nn.Module):
    cfg: ModelConfig
    hidden: bool = False

    @nn.compact
    def __call__(self, x_BTD):
        return _logits(self.cfg, x_BTD, hidden=self.hidden)
