"""The decoder LM of `jaxscale.models.decoder`, written in Flax NNX: its twin for the NNX path.

Same config (`jaxscale.config.ModelConfig`), same parameter tree and logical names as the Linen
decoder ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"; a leading "layers"
axis on stacked layers), and the Linen module's `attend` (remat tags, activation constraints,
rope and attention), so from the same parameters (`params_from_linen`) both give the same
logits. No mesh axis names here: the sharding rules map the names.

``scan_layers=True`` stacks the layers' variables on a leading "layers" axis (built under
`jax.vmap`) and runs them with `jax.lax.scan` over that axis; ``scan_layers=False`` keeps a list
of layers run by a Python loop. `model.remat` wraps each layer in `jax.checkpoint`.

Shape legend for tensor names (``q_BTNH``):
  B batch            T query length      S key/value length
  D d_model          N query heads       K key/value heads      H head dim
  F MLP hidden       V vocabulary        L layers
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxscale.config import ModelConfig
from jaxscale.core import remat
from jaxscale.core.dtypes import dtype, weight_grad_dot
from jaxscale.core.sharding import constrain
from jaxscale.models.decoder import attend
from jaxscale.models.nnx import nnx_factory

Names = tuple[str | None, ...]
_List = getattr(nnx, "List", list)  # flax >= 0.12 wants lists of modules wrapped


def _init(std: float, names: Names):
    return nnx.with_partitioning(nnx.initializers.normal(std), names)


class Dense(nnx.Module):
    """Linen's `nn.DenseGeneral` over the last ``len(in_shape)`` axes, kernel in_shape + out_shape.

    `lead` names are prepended to the parameters' names (the "layers" axis of stacked layers).
    """

    def __init__(self, cfg: ModelConfig, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 names: Names, *, rngs: nnx.Rngs, lead: Names = (), std: float | None = None,
                 bias: bool | None = None):
        param_dtype = dtype(cfg.param_dtype)
        init = _init(cfg.init_std if std is None else std, lead + names)
        self.kernel = nnx.Param(init(rngs.params(), in_shape + out_shape, param_dtype))
        if cfg.use_bias if bias is None else bias:
            bias_init = nnx.with_partitioning(nnx.initializers.zeros,
                                              lead + names[len(in_shape):])
            self.bias = nnx.Param(bias_init(rngs.params(), out_shape, param_dtype))
        else:
            self.bias = None
        self.num_in = len(in_shape)
        self.dtype = dtype(cfg.dtype)
        self.dot_general = weight_grad_dot(cfg.weight_grad_dtype, cfg.dtype)

    def __call__(self, x):
        kernel = jnp.asarray(self.kernel[...], self.dtype)
        x = jnp.asarray(x, self.dtype)
        contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
        y = self.dot_general(x, kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + jnp.asarray(self.bias[...], self.dtype)
        return y


def _norm(cfg: ModelConfig, rngs: nnx.Rngs, lead: Names = ()) -> nnx.Module:
    common = dict(
        epsilon=cfg.norm_eps, dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype),
        scale_init=nnx.with_partitioning(nnx.initializers.ones, lead + ("norm",)), rngs=rngs,
    )
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.d_model, **common)
    return nnx.LayerNorm(
        cfg.d_model, bias_init=nnx.with_partitioning(nnx.initializers.zeros, lead + ("norm",)),
        **common,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lead: Names = (),
                 attention_fn: Callable | None = None):
        N, K, H, D = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.d_model
        self.cfg = cfg
        self.attention_fn = attention_fn
        qkv = dict(rngs=rngs, lead=lead, bias=cfg.use_bias or cfg.qkv_bias)
        self.query = Dense(cfg, (D,), (N, H), ("embed", "heads", "head_dim"), **qkv)
        self.key = Dense(cfg, (D,), (K, H), ("embed", "kv_heads", "head_dim"), **qkv)
        self.value = Dense(cfg, (D,), (K, H), ("embed", "kv_heads", "head_dim"), **qkv)
        self.out = Dense(cfg, (N, H), (D,), ("heads", "head_dim", "embed"), rngs=rngs, lead=lead,
                         std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, deterministic: bool):
        out_BTNH = attend(self.cfg, self.query(x_BTD), self.key(x_BTD), self.value(x_BTD),
                          positions_BT, segment_ids_BT, self.attention_fn)
        return self.dropout(self.out(out_BTNH), deterministic=deterministic)


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lead: Names = ()):
        D, F = cfg.d_model, cfg.d_ff
        self.swiglu = cfg.mlp == "swiglu"
        self.wi_up = Dense(cfg, (D,), (F,), ("embed", "mlp"), rngs=rngs, lead=lead)
        if self.swiglu:
            self.wi_gate = Dense(cfg, (D,), (F,), ("embed", "mlp"), rngs=rngs, lead=lead)
        self.wo = Dense(cfg, (F,), (D,), ("mlp", "embed"), rngs=rngs, lead=lead,
                        std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x_BTD, deterministic: bool):
        up_BTF = checkpoint_name(self.wi_up(x_BTD), remat.MLP_IN)
        if self.swiglu:
            gate_BTF = checkpoint_name(self.wi_gate(x_BTD), remat.MLP_IN)
            h_BTF = nnx.silu(gate_BTF) * up_BTF
        else:
            h_BTF = nnx.gelu(up_BTF)
        h_BTF = constrain(h_BTF, ("batch", "length", "act_mlp"))
        out_BTD = checkpoint_name(self.wo(h_BTF), remat.MLP_OUT)
        return self.dropout(out_BTD, deterministic=deterministic)


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lead: Names = (),
                 attention_fn: Callable | None = None):
        self.attn_norm = _norm(cfg, rngs, lead)
        self.attn = Attention(cfg, rngs=rngs, lead=lead, attention_fn=attention_fn)
        self.mlp_norm = _norm(cfg, rngs, lead)
        self.mlp = Mlp(cfg, rngs=rngs, lead=lead)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, deterministic: bool):
        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
        h_BTD = self.attn_norm(x_BTD)
        x_BTD = x_BTD + self.attn(h_BTD, positions_BT, segment_ids_BT, deterministic)
        h_BTD = self.mlp_norm(x_BTD)
        x_BTD = x_BTD + self.mlp(h_BTD, deterministic)
        return constrain(x_BTD, ("batch", "length", "act_embed"))


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, attention_fn: Callable | None) -> Block:
    """One Block whose variables carry a leading layer axis, layer i drawn from its own keys."""
    params_L = jax.random.split(rngs.params(), cfg.num_layers)
    dropout_L = jax.random.split(rngs.dropout(), cfg.num_layers)

    def make(params, dropout):
        return Block(cfg, rngs=nnx.Rngs(params=params, dropout=dropout), lead=("layers",),
                     attention_fn=attention_fn)

    graphdef = nnx.graphdef(nnx.eval_shape(make, params_L[0], dropout_L[0]))
    state_L = jax.vmap(lambda p, d: nnx.state(make(p, d)))(params_L, dropout_L)
    return nnx.merge(graphdef, state_L)


class DecoderNnx(nnx.Module):
    """The decoder LM in NNX. Follows the jaxscale model interface:

    ``logits_BTV = model(tokens_BT, positions_BT=None, segment_ids_BT=None, deterministic=True)``

    Args:
      cfg: the model config (the Linen decoder's).
      rngs: "params" initialises the parameters, "dropout" seeds the dropout streams.
      attention_fn: replaces `jaxscale.models.decoder.attention` (same signature), e.g. a
        planning stand-in.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, attention_fn: Callable | None = None):
        self.cfg = cfg
        common = dict(dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype), rngs=rngs)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                               embedding_init=_init(cfg.init_std, ("vocab", "embed")), **common)
        if cfg.position == "learned":
            self.pos_embed = nnx.Embed(cfg.max_seq_len, cfg.d_model,
                                       embedding_init=_init(cfg.init_std / 2, (None, "embed")),
                                       **common)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs, attention_fn)
        else:
            self.layers = _List([Block(cfg, rngs=rngs, attention_fn=attention_fn)
                                 for _ in range(cfg.num_layers)])
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = Dense(cfg, (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"),
                                 rngs=rngs)

    @staticmethod
    def factory(cfg: ModelConfig, attention_fn: Callable | None = None) -> Callable:
        """The ``rngs -> DecoderNnx`` factory `NnxAdapter` takes (its ``cfg`` is the config)."""
        fn = nnx_factory(lambda rngs: DecoderNnx(cfg, rngs=rngs, attention_fn=attention_fn))
        fn.cfg = cfg
        return fn

    def _layer(self, graphdef, positions_BT, segment_ids_BT, deterministic) -> Callable:
        """``(layer state, x_BTD) -> x_BTD``: one layer as a pure function of its variables, so
        that `jax.lax.scan` and `jax.checkpoint` (model.remat) can take it."""

        def layer(state, x_BTD):
            return nnx.merge(graphdef, state)(x_BTD, positions_BT, segment_ids_BT, deterministic)

        policy = remat.get_policy(self.cfg.remat)
        if policy is None:
            return layer
        return jax.checkpoint(layer, policy=policy, prevent_cse=not self.cfg.scan_layers)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, deterministic=True):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = self.embed(tokens_BT)
        if cfg.position == "learned":
            x_BTD = x_BTD + self.pos_embed(positions_BT)
        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
        x_BTD = self.dropout(x_BTD, deterministic=deterministic)

        if cfg.scan_layers:
            graphdef, state_L = nnx.split(self.layers)
            step = self._layer(graphdef, positions_BT, segment_ids_BT, deterministic)
            x_BTD, _ = jax.lax.scan(lambda x, state: (step(state, x), None), x_BTD, state_L,
                                    unroll=min(cfg.scan_unroll, cfg.num_layers))
        else:
            for block in self.layers:
                graphdef, state = nnx.split(block)
                x_BTD = self._layer(graphdef, positions_BT, segment_ids_BT, deterministic)(
                    state, x_BTD)

        x_BTD = self.final_norm(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            logits_BTV = self.lm_head(x_BTD)
        return constrain(logits_BTV, ("batch", "length", "act_vocab"))


def params_from_linen(linen_params: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """The Linen decoder's parameters as `DecoderNnx`'s (what `NnxAdapter.init` returns, unboxed).

    The trees are the same but for the layers: Linen names unscanned layers ``layers_<i>`` and
    scanned ones ``layers`` (a leading layer axis); the twin keeps ``layers`` stacked when
    ``cfg.scan_layers``, else ``layers/<i>``. Either Linen layout converts to either twin layout.
    Arrays are passed through (sliced or stacked where the layouts differ).
    """
    params = _plain(nn.unbox(linen_params))
    L = cfg.num_layers
    stacked = params.pop("layers", None)  # scanned Linen layers: one tree, a leading [L] axis
    layers = None if stacked is not None else [params.pop(f"layers_{i}") for i in range(L)]
    if cfg.scan_layers:
        params["layers"] = stacked if layers is None else jax.tree_util.tree_map(
            lambda *xs: jnp.stack(xs), *layers)
    else:
        if layers is None:
            layers = [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(L)]
        params["layers"] = {str(i): layer for i, layer in enumerate(layers)}
    return params


def _plain(tree: Any) -> Any:
    """Nested Mappings (FrozenDicts included) as plain dicts."""
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree
