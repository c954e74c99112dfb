"""config.json <-> jaxscale Config: reading a Hugging Face directory's config, deriving the run's
config from it, checking that a run's model is the one a checkpoint holds, and writing config.json
back. No jax here (the CLI validates before jax starts)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

from jaxscale import config as config_lib
from jaxscale.config import Config, ModelConfig
from jaxscale.convert.architectures import (
    ARCHITECTURES,
    PREFERRED,
    Architecture,
    architecture_of,
    model_config_from_hf,
)
from jaxscale.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def describe(hf_dir: str | pathlib.Path, what: str = "") -> str:
    """How errors name a Hugging Face directory: ``checkpoint.init_from='hf:DIR'`` or
    ``Hugging Face checkpoint 'DIR'``."""
    return f"{what}={'hf:' + str(hf_dir)!r}" if what else f"Hugging Face checkpoint {str(hf_dir)!r}"


def read_hf_config(hf_dir: str | pathlib.Path, what: str = "") -> dict:
    """The parsed config.json of a Hugging Face model directory.

    Raises:
      CheckpointError: no such directory, no config.json in it, or one that is not JSON.
    """
    root, where = pathlib.Path(hf_dir), describe(hf_dir, what)
    if not root.is_dir():
        raise CheckpointError(f"{where}: no such directory")
    path = root / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{where} has no {CONFIG_FILE} (a Hugging Face model directory "
                              "holds config.json and model.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: {CONFIG_FILE} is not valid JSON: {e}") from None


def config_from_hf(hf_dir: str | pathlib.Path, overrides: Sequence[str] = (), *,
                   tokenizer: str | None = None, init_from: str = "", what: str = "") -> Config:
    """A full, validated jaxscale Config for the model in a Hugging Face directory.

    The model section and generate.eos_ids come from config.json; mesh.fsdp=-1 (every device);
    seq_len at most the model's context; data.tokenizer is `tokenizer` (default: the
    directory's tokenizer.json), and without any tokenizer data.source=synthetic (set data.*
    to train on text); checkpoint.init_from is `init_from`. `overrides` (``key=value``) apply
    last.

    Raises:
      CheckpointError: no directory or config.json. ConfigError: an unsupported architecture
        or setting, or a bad override.
    """
    hf_dir = pathlib.Path(hf_dir)
    model, extra = model_config_from_hf(read_hf_config(hf_dir, what), str(hf_dir / CONFIG_FILE))
    tree = config_lib.to_dict(Config(model=model))
    tree["generate"]["eos_ids"] = list(extra["eos_ids"])
    tree["mesh"]["fsdp"] = -1
    tree["seq_len"] = min(tree["seq_len"], model.max_seq_len)
    tree["checkpoint"]["init_from"] = init_from
    if tokenizer is None and (hf_dir / TOKENIZER_FILE).is_file():
        tokenizer = str((hf_dir / TOKENIZER_FILE).resolve())
    if tokenizer is None:
        tree["data"]["source"] = "synthetic"
    else:
        tree["data"]["tokenizer"] = tokenizer
    return config_lib.load_tree(tree, overrides)


# --------------------------------------------------------------------------------------------
# Is a run's model the checkpoint's?

def architecture_fields(m: ModelConfig) -> dict[str, Any]:
    """The fields that decide what a model's parameters mean (``model.<key>`` names, resolved:
    num_kv_heads and head_dim as used), in the order errors name them. Compute settings (dtype,
    scan_layers, remat, attention) are not among them, nor fields the model ignores (rope with
    learned positions, the context length with rope)."""
    fields = {
        "num_layers": m.num_layers, "d_model": m.d_model, "num_heads": m.num_heads,
        "num_kv_heads": m.kv_heads, "head_dim": m.head_size, "d_ff": m.d_ff,
        "vocab_size": m.vocab_size, "norm": m.norm, "mlp": m.mlp, "position": m.position,
        "tie_embeddings": m.tie_embeddings, "use_bias": m.use_bias,
        "qkv_bias": m.qkv_bias or m.use_bias, "norm_eps": m.norm_eps,
        "moe.num_experts": m.moe.num_experts,
    }
    if m.position == "learned":
        return {**fields, "max_seq_len": m.max_seq_len}
    fields |= {"rope_theta": m.rope_theta, "rope_scaling": m.rope_scaling}
    if m.rope_scaling != "none":
        fields["rope_factor"] = m.rope_factor
    if m.rope_scaling == "llama3":
        fields |= {"rope_low_freq_factor": m.rope_low_freq_factor,
                   "rope_high_freq_factor": m.rope_high_freq_factor,
                   "rope_original_max_len": m.rope_original_max_len}
    return fields


def first_difference(a: ModelConfig, b: ModelConfig) -> tuple[str, Any, Any] | None:
    """The first of `architecture_fields` where `a` and `b` differ, with both values; None
    when they describe the same parameters."""
    fa, fb = architecture_fields(a), architecture_fields(b)
    for name in {**fa, **fb}:
        if fa.get(name) != fb.get(name):
            return name, fa.get(name), fb.get(name)
    return None


def check_model(hf_model: ModelConfig, model: ModelConfig, where: str) -> None:
    """Raise a one-line CheckpointError when `model` is not the model config.json describes."""
    diff = first_difference(hf_model, model)
    if diff is not None:
        name, theirs, ours = diff
        raise CheckpointError(f"{where} does not fit the model: its config.json gives "
                              f"model.{name}={theirs!r}, the run has model.{name}={ours!r}")


# --------------------------------------------------------------------------------------------
# The way back: ModelConfig -> config.json.


def choose_architecture(model: ModelConfig, base: dict | None = None) -> Architecture:
    """`base`'s architecture (the config.json the model came from), else the first of
    `PREFERRED` the model fits.

    Raises:
      ConfigError: the model fits no supported architecture (each one's reason listed).
    """
    candidates = [architecture_of(base)] if base else [ARCHITECTURES[n] for n in PREFERRED]
    reasons = []
    for arch in candidates:
        reason = arch.misfit(model)
        if reason is None:
            return arch
        reasons.append(f"{arch.name} {reason}")
    shape = ", ".join(f"{k}={getattr(model, k)}" for k in ("norm", "mlp", "position",
                                                            "use_bias", "qkv_bias"))
    raise ConfigError(f"the model ({shape}, moe.num_experts={model.moe.num_experts}) fits no "
                      f"supported Hugging Face architecture: {'; '.join(reasons)}")


def hf_config(model: ModelConfig, eos_ids: Sequence[int], base: dict | None = None) -> dict:
    """The config.json of `model`: `base` (the original config.json) with the model's fields
    written over it, in its style (rope_parameters or rope_theta/rope_scaling, dtype or
    torch_dtype), else a fresh one with what transformers needs."""
    base = dict(base or {})
    arch = choose_architecture(model, base or None)
    out = {**base, **arch.to_hf(model, base), "architectures": [arch.name],
           "model_type": arch.model_type}
    if "rope_parameters" in out:  # one rope style, the base's (transformers >= 5)
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
    out["dtype" if "dtype" in base else "torch_dtype"] = model.param_dtype
    if eos_ids or "eos_token_id" not in out:
        out["eos_token_id"] = (None if not eos_ids else int(eos_ids[0]) if len(eos_ids) == 1
                               else [int(i) for i in eos_ids])
    return out


def matching_base(base: dict | None, model: ModelConfig) -> dict | None:
    """`base` when it describes `model`'s architecture, else None (then config.json is fresh)."""
    if not base:
        return None
    try:
        derived, _ = model_config_from_hf(base)
    except ConfigError:
        return None
    return base if first_difference(derived, model) is None else None
