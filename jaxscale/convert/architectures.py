"""The Hugging Face architectures jaxscale reads and writes, as a table.

Each entry of `ARCHITECTURES` (keyed by config.json's ``architectures`` name) says how its
config.json becomes `ModelConfig` fields (`from_hf`), the way back (`to_hf`), why a ModelConfig
does not fit it (`misfit`), and where every parameter lives (`tensors`: jaxscale parameter path
-> `layout.Tensor`, top-level and per layer).

    Llama, Mistral   rmsnorm, rope, swiglu; q/k/v/o and gate/up/down nn.Linear ([out, in])
    Qwen2            Llama's layout with q/k/v biases (model.qkv_bias)
    GPT-2            layernorm, learned positions, gelu_new, biases, tied; Conv1D ([in, out]),
                     query/key/value fused in c_attn

No jax here: the CLI derives and validates a config before jax starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

from jaxscale.config import DTYPES, ModelConfig
from jaxscale.convert.layout import Tensor
from jaxscale.errors import ConfigError

Tables = tuple[dict[str, Tensor], dict[str, Tensor]]  # (top-level, per layer) path -> Tensor


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # config.json "architectures" entry
    model_type: str  # config.json "model_type"
    from_hf: Callable[[dict, str], dict[str, Any]]  # (config.json, where) -> ModelConfig fields
    to_hf: Callable[[ModelConfig, dict], dict[str, Any]]  # (model, base config.json) -> fields
    misfit: Callable[[ModelConfig], str | None]  # what a ModelConfig lacks to be this, or None
    tensors: Callable[[ModelConfig, Collection[str]], Tables]  # (model, checkpoint names)


def _get(hf: dict, key: str, default: Any) -> Any:
    value = hf.get(key)
    return default if value is None else value


def _unsupported(where: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={value!r} is not supported ({why})")


def param_dtype(hf: dict, where: str) -> str:
    """The checkpoint's storage dtype (config.json dtype / torch_dtype), as a jaxscale name."""
    name = str(_get(hf, "dtype", _get(hf, "torch_dtype", "float32"))).removeprefix("torch.")
    if name not in DTYPES:
        raise _unsupported(where, "dtype", name, f"jaxscale stores {', '.join(DTYPES)}")
    return name


# --------------------------------------------------------------------------------------------
# Rotary scaling: config.json's rope type -> ModelConfig fields.


def _rope_params(hf: dict) -> dict:
    # transformers >= 5 writes rope_parameters (with rope_theta inside); earlier versions write
    # rope_theta and rope_scaling at the top level.
    return dict(_get(hf, "rope_parameters", None) or _get(hf, "rope_scaling", None) or {})


ROPE_TYPES: dict[str, Callable[[dict], dict[str, Any]]] = {
    "default": lambda p: {"rope_scaling": "none"},
    "linear": lambda p: {"rope_scaling": "linear", "rope_factor": float(p["factor"])},
    "llama3": lambda p: {
        "rope_scaling": "llama3", "rope_factor": float(p["factor"]),
        "rope_low_freq_factor": float(p["low_freq_factor"]),
        "rope_high_freq_factor": float(p["high_freq_factor"]),
        "rope_original_max_len": int(p["original_max_position_embeddings"]),
    },
}


def _rope(hf: dict, where: str) -> dict[str, Any]:
    params = _rope_params(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise _unsupported(where, "rope_type", kind, f"supported: {', '.join(ROPE_TYPES)}")
    try:
        fields = ROPE_TYPES[kind](params)
    except KeyError as e:
        raise ConfigError(f"{where}: rope_type={kind!r} needs {e.args[0]!r}") from None
    theta = params.get("rope_theta", _get(hf, "rope_theta", 10000.0))
    return {"rope_theta": float(theta), **fields}


def _rope_to_hf(m: ModelConfig, base: dict) -> dict[str, Any]:
    scaling = None
    if m.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": m.rope_factor}
    elif m.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": m.rope_factor,
                   "low_freq_factor": m.rope_low_freq_factor,
                   "high_freq_factor": m.rope_high_freq_factor,
                   "original_max_position_embeddings": m.rope_original_max_len}
    if "rope_parameters" in base:  # keep the base's (transformers >= 5) style
        return {"rope_parameters": {**(scaling or {"rope_type": "default"}),
                                    "rope_theta": m.rope_theta}}
    return {"rope_theta": m.rope_theta, "rope_scaling": scaling}


# --------------------------------------------------------------------------------------------
# Llama, Mistral, Qwen2.


def _llama_family(hf: dict, where: str) -> dict[str, Any]:
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
        raise _unsupported(where, "hidden_act", act, "jaxscale's swiglu MLP is silu-gated")
    heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    head_dim = int(_get(hf, "head_dim", d_model // heads))
    return {
        "num_layers": int(hf["num_hidden_layers"]), "d_model": d_model, "num_heads": heads,
        "num_kv_heads": int(_get(hf, "num_key_value_heads", heads)),
        "head_dim": 0 if head_dim * heads == d_model else head_dim,
        "d_ff": int(hf["intermediate_size"]), "vocab_size": int(hf["vocab_size"]),
        "max_seq_len": int(hf["max_position_embeddings"]), "norm": "rmsnorm", "mlp": "swiglu",
        "position": "rope", "tie_embeddings": bool(_get(hf, "tie_word_embeddings", False)),
        "norm_eps": float(_get(hf, "rms_norm_eps", 1e-6)), **_rope(hf, where),
    }


def _llama_from_hf(hf: dict, where: str) -> dict[str, Any]:
    attention, mlp = bool(_get(hf, "attention_bias", False)), bool(_get(hf, "mlp_bias", False))
    if attention != mlp:
        key = "attention_bias" if attention else "mlp_bias"
        raise _unsupported(where, key, True, "jaxscale has biases in every dense layer "
                           "(attention_bias and mlp_bias both true) or in none")
    return {**_llama_family(hf, where), "use_bias": attention}


def _mistral_from_hf(hf: dict, where: str) -> dict[str, Any]:
    window = hf.get("sliding_window")
    if window is not None and window < hf["max_position_embeddings"]:
        raise _unsupported(where, "sliding_window", window,
                           f"below max_position_embeddings={hf['max_position_embeddings']}; "
                           "jaxscale attends over the whole context")
    return _llama_family(hf, where)


def _qwen2_from_hf(hf: dict, where: str) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise _unsupported(where, "use_sliding_window", True,
                           "jaxscale attends over the whole context")
    return {**_llama_family(hf, where), "qkv_bias": True}


def _llama_to_hf(m: ModelConfig, base: dict) -> dict[str, Any]:
    # head_dim, unless the base config leaves it implicit and it still is d_model / num_heads
    implicit = bool(base) and not base.get("head_dim") and m.head_size * m.num_heads == m.d_model
    return {
        "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads,
        **({} if implicit else {"head_dim": m.head_size}),
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "vocab_size": m.vocab_size, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu", **_rope_to_hf(m, base),
    }


def _with_biases(m: ModelConfig, base: dict) -> dict[str, Any]:
    return {**_llama_to_hf(m, base), "attention_bias": m.use_bias, "mlp_bias": m.use_bias}


def _llama_family_misfit(m: ModelConfig) -> str | None:
    wants = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope"}
    for key, value in wants.items():
        if getattr(m, key) != value:
            return f"needs model.{key}={value}"
    return "has no mixture-of-experts layers" if m.moe.num_experts else None


def _llama_misfit(m: ModelConfig) -> str | None:
    if m.qkv_bias and not m.use_bias:
        return "has no q/k/v-only biases (model.qkv_bias)"
    return _llama_family_misfit(m)


def _mistral_misfit(m: ModelConfig) -> str | None:
    return "has no biases" if m.use_bias or m.qkv_bias else _llama_family_misfit(m)


def _qwen2_misfit(m: ModelConfig) -> str | None:
    if not m.qkv_bias or m.use_bias:
        return "needs q/k/v biases only (model.qkv_bias=true, model.use_bias=false)"
    return _llama_family_misfit(m)


def _lm_head(m: ModelConfig) -> dict[str, Tensor]:
    """The untied output projection: lm_head.weight ([V, D], nn.Linear), and no bias (the one
    model.use_bias gives jaxscale's head is `absent`: zero)."""
    if m.tie_embeddings:
        return {}
    head = {"lm_head/kernel": Tensor("lm_head.weight", (1, 1), transpose=True)}
    return head | ({"lm_head/bias": Tensor("", (1,))} if m.use_bias else {})


def _llama_tensors(m: ModelConfig, names: Collection[str] = ()) -> Tables:
    L = "model.layers.{i}."
    top = {"embed/embedding": Tensor("model.embed_tokens.weight", (1, 1)),
           "final_norm/scale": Tensor("model.norm.weight", (1,))}
    top |= _lm_head(m)
    linear = lambda name, groups: Tensor(L + name + ".weight", groups, transpose=True)
    layer = {
        "attn_norm/scale": Tensor(L + "input_layernorm.weight", (1,)),
        "mlp_norm/scale": Tensor(L + "post_attention_layernorm.weight", (1,)),
        "attn/query/kernel": linear("self_attn.q_proj", (1, 2)),
        "attn/key/kernel": linear("self_attn.k_proj", (1, 2)),
        "attn/value/kernel": linear("self_attn.v_proj", (1, 2)),
        "attn/out/kernel": linear("self_attn.o_proj", (2, 1)),
        "mlp/wi_gate/kernel": linear("mlp.gate_proj", (1, 1)),
        "mlp/wi_up/kernel": linear("mlp.up_proj", (1, 1)),
        "mlp/wo/kernel": linear("mlp.down_proj", (1, 1)),
    }
    biases = {}
    if m.use_bias or m.qkv_bias:
        biases |= {"attn/query/bias": ("self_attn.q_proj", (2,)),
                   "attn/key/bias": ("self_attn.k_proj", (2,)),
                   "attn/value/bias": ("self_attn.v_proj", (2,))}
    if m.use_bias:
        biases |= {"attn/out/bias": ("self_attn.o_proj", (1,)),
                   "mlp/wi_gate/bias": ("mlp.gate_proj", (1,)),
                   "mlp/wi_up/bias": ("mlp.up_proj", (1,)), "mlp/wo/bias": ("mlp.down_proj", (1,))}
    layer |= {path: Tensor(L + name + ".bias", groups) for path, (name, groups) in biases.items()}
    return top, layer


# --------------------------------------------------------------------------------------------
# GPT-2.

_GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation, = flax's gelu


def _gpt2_from_hf(hf: dict, where: str) -> dict[str, Any]:
    act = _get(hf, "activation_function", "gelu_new")
    if act not in _GPT2_GELUS:
        raise _unsupported(where, "activation_function", act,
                           f"jaxscale's gelu is the tanh approximation: {', '.join(_GPT2_GELUS)}")
    for key, default in (("scale_attn_by_inverse_layer_idx", False),
                         ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                         ("scale_attn_weights", True)):
        if bool(_get(hf, key, default)) != default:
            raise _unsupported(where, key, not default, "jaxscale's attention has no such option")
    d_model = int(hf["n_embd"])
    return {
        "num_layers": int(hf["n_layer"]), "d_model": d_model, "num_heads": int(hf["n_head"]),
        "num_kv_heads": 0, "d_ff": int(_get(hf, "n_inner", 4 * d_model)),
        "vocab_size": int(hf["vocab_size"]), "max_seq_len": int(hf["n_positions"]),
        "norm": "layernorm", "mlp": "gelu", "position": "learned",
        "tie_embeddings": bool(_get(hf, "tie_word_embeddings", True)), "use_bias": True,
        "norm_eps": float(_get(hf, "layer_norm_epsilon", 1e-5)),
    }


def _gpt2_to_hf(m: ModelConfig, base: dict) -> dict[str, Any]:
    act = base.get("activation_function")
    # n_inner null means 4 x n_embd: keep the base's null when that is still the width
    implicit = bool(base) and base.get("n_inner") is None and m.d_ff == 4 * m.d_model
    return {
        "n_layer": m.num_layers, "n_embd": m.d_model, "n_head": m.num_heads,
        "n_inner": None if implicit else m.d_ff,
        "vocab_size": m.vocab_size, "n_positions": m.max_seq_len,
        "layer_norm_epsilon": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "activation_function": act if act in _GPT2_GELUS else "gelu_new",
        **({} if base else {"attn_pdrop": 0.0, "embd_pdrop": m.dropout,
                            "resid_pdrop": m.dropout}),
    }


def _gpt2_misfit(m: ModelConfig) -> str | None:
    wants = {"norm": "layernorm", "mlp": "gelu", "position": "learned", "use_bias": True}
    for key, value in wants.items():
        if getattr(m, key) != value:
            return f"needs model.{key}={str(value).lower()}"
    if m.kv_heads != m.num_heads:
        return "has no grouped-query attention (model.num_kv_heads)"
    if m.head_size * m.num_heads != m.d_model:
        return "needs model.head_dim = d_model / num_heads"
    return "has no mixture-of-experts layers" if m.moe.num_experts else None


def _gpt2_tensors(m: ModelConfig, names: Collection[str] = ()) -> Tables:
    # GPT2LMHeadModel saves "transformer.h.0..."; a bare GPT2Model "h.0...": read either.
    p = "" if names and "transformer.wte.weight" not in names else "transformer."
    H = p + "h.{i}."
    top = {"embed/embedding": Tensor(p + "wte.weight", (1, 1)),
           "pos_embed/embedding": Tensor(p + "wpe.weight", (1, 1)),
           "final_norm/scale": Tensor(p + "ln_f.weight", (1,)),
           "final_norm/bias": Tensor(p + "ln_f.bias", (1,))}
    top |= _lm_head(m)
    layer = {
        "attn_norm/scale": Tensor(H + "ln_1.weight", (1,)),
        "attn_norm/bias": Tensor(H + "ln_1.bias", (1,)),
        "mlp_norm/scale": Tensor(H + "ln_2.weight", (1,)),
        "mlp_norm/bias": Tensor(H + "ln_2.bias", (1,)),
        "attn/out/kernel": Tensor(H + "attn.c_proj.weight", (2, 1)),
        "attn/out/bias": Tensor(H + "attn.c_proj.bias", (1,)),
        "mlp/wi_up/kernel": Tensor(H + "mlp.c_fc.weight", (1, 1)),
        "mlp/wi_up/bias": Tensor(H + "mlp.c_fc.bias", (1,)),
        "mlp/wo/kernel": Tensor(H + "mlp.c_proj.weight", (1, 1)),
        "mlp/wo/bias": Tensor(H + "mlp.c_proj.bias", (1,)),
    }
    for block, name in enumerate(("query", "key", "value")):  # c_attn columns: [q | k | v]
        layer[f"attn/{name}/kernel"] = Tensor(H + "attn.c_attn.weight", (1, 2), block=block,
                                              blocks=3)
        layer[f"attn/{name}/bias"] = Tensor(H + "attn.c_attn.bias", (2,), block=block, blocks=3)
    return top, layer


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (
        Architecture("LlamaForCausalLM", "llama", _llama_from_hf, _with_biases, _llama_misfit,
                     _llama_tensors),
        Architecture("MistralForCausalLM", "mistral", _mistral_from_hf, _llama_to_hf,
                     _mistral_misfit, _llama_tensors),
        Architecture("Qwen2ForCausalLM", "qwen2", _qwen2_from_hf, _llama_to_hf, _qwen2_misfit,
                     _llama_tensors),
        Architecture("GPT2LMHeadModel", "gpt2", _gpt2_from_hf, _gpt2_to_hf, _gpt2_misfit,
                     _gpt2_tensors),
    )
}
# The architecture a model trained in jaxscale is written as: the first that fits.
PREFERRED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")

# Checkpoint entries that are buffers, not parameters (causal masks, rotary tables).
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def architecture_of(hf: dict, where: str = "config.json") -> Architecture:
    """The supported architecture config.json names.

    Raises:
      ConfigError: none or several architectures, or one jaxscale does not support.
    """
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ConfigError(f"{where}: architectures {names!r} is not supported; supported: "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[names[0]]


def model_config_from_hf(hf: dict, where: str = "config.json") -> tuple[ModelConfig, dict]:
    """The ModelConfig a Hugging Face config.json describes, and the settings beside it.

    Args:
      hf: the parsed config.json.
      where: how errors name the file.

    Returns:
      (model config, extra): extra holds "architecture" (the name) and "eos_ids" (a tuple, from
      eos_token_id). Compute runs in float32; parameters keep the checkpoint's dtype
      (``torch_dtype``/``dtype``), so their values are preserved bitwise.

    Raises:
      ConfigError: one line naming an unsupported architecture (and the supported ones), a
        setting jaxscale has no equivalent for, or a missing key.
    """
    arch = architecture_of(hf, where)
    try:
        fields = arch.from_hf(hf, where)
    except KeyError as e:
        raise ConfigError(f"{where}: {arch.name} needs the key {e.args[0]!r}") from None
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(i) for i in (eos if isinstance(eos, list)
                                                            else [eos]))
    model = ModelConfig(**fields, dtype="float32", param_dtype=param_dtype(hf, where))
    return model, {"architecture": arch.name, "eos_ids": eos_ids}
