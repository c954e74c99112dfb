"""Value checks of a Config, and the valid names of its string-valued choices.

Every check raises a one-line ConfigError naming the dotted key, the value and what would be
valid. No jax import here either: `jaxscale.config.load` runs these before any JAX work.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jaxscale.errors import ConfigError

if TYPE_CHECKING:
    from jaxscale.config import (
        CheckpointConfig,
        Config,
        DataConfig,
        MeshConfig,
        ModelConfig,
        OptimConfig,
        WatchdogConfig,
    )

# Valid names for the string-valued choices. The tables that implement them (remat.POLICIES,
# optim.OPTIMIZERS, ...) are keyed by exactly these names; tests/test_config.py checks that.
REMAT_POLICIES = (
    "none", "full", "minimal", "save_dots", "save_qkv_proj", "save_attn_out", "save_mlp",
    "offload_dots",
)
OPTIMIZERS = ("adamw", "lion", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "wsd")
RULE_PRESETS = ("dp", "fsdp", "tp", "fsdp_tp", "hsdp")
DTYPES = ("float32", "bfloat16", "float16")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")
ATTENTIONS = ("auto", "xla", "cudnn", "reference")
DATA_SOURCES = ("text", "shards", "hf", "synthetic")
NONFINITE_POLICIES = ("abort", "skip")


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def choices_error(key: str, value: Any, choices: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}"
        + did_you_mean(value, choices)
    )


# --------------------------------------------------------------------------------------------
# Value checks. Each names the dotted key, the value and what would be valid.


def _positive(key: str, value: Any) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be positive")


def _non_negative(key: str, value: Any) -> None:
    if value < 0:
        raise ConfigError(f"{key}={value} must be >= 0")


def _one_of(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise choices_error(key, value, choices)


def _fraction(key: str, value: float, *, closed: bool = True) -> None:
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ConfigError(f"{key}={value} must be in [0, 1{']' if closed else ')'}")


def _validate_model(m: ModelConfig) -> None:
    for key in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _non_negative("model.num_kv_heads", m.num_kv_heads)
    _non_negative("model.head_dim", m.head_dim)
    _one_of("model.norm", m.norm, NORMS)
    _one_of("model.mlp", m.mlp, MLPS)
    _one_of("model.position", m.position, POSITIONS)
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.param_dtype", m.param_dtype, DTYPES)
    _one_of("model.remat", m.remat, REMAT_POLICIES)
    _one_of("model.attention", m.attention, ATTENTIONS)
    _fraction("model.dropout", m.dropout, closed=False)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
            "set model.head_dim explicitly or pick a divisor"
        )
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}"
        )
    if m.position == "rope" and (m.head_dim or m.d_model // m.num_heads) % 2:
        raise ConfigError("model.position='rope' needs an even head dimension")


def _validate_mesh(mesh: MeshConfig) -> None:
    auto = [n for n in mesh.axis_names if getattr(mesh, n) == -1]
    if len(auto) > 1:
        raise ConfigError(
            f"mesh axes {', '.join('mesh.' + n for n in auto)} are all -1; at most one axis may "
            "be -1 (it takes the remaining devices)"
        )
    for f in dataclasses.fields(mesh):
        value = getattr(mesh, f.name)
        if value == 0 or value < -1 or (f.name.startswith("dcn_") and value < 1):
            raise ConfigError(
                f"mesh.{f.name}={value} must be a positive size"
                + ("" if f.name.startswith("dcn_") else " (or -1 for the remaining devices)")
            )


def _validate_rules(rules: Any) -> None:
    if isinstance(rules, str):
        _one_of("sharding.rules", rules, RULE_PRESETS)
        return
    if not isinstance(rules, (list, tuple)):
        raise ConfigError(
            f"sharding.rules={rules!r} must be a preset name ({', '.join(RULE_PRESETS)}) or a list"
            " of [logical_name, mesh_axis | [mesh_axes] | null]"
        )
    for rule in rules:
        ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
        target = rule[1] if ok else None
        ok = ok and (
            target is None or isinstance(target, str)
            or (isinstance(target, (list, tuple)) and all(isinstance(a, str) for a in target))
        )
        if not ok:
            raise ConfigError(
                f"sharding.rules entry {rule!r} must be [logical_name, mesh_axis | [mesh_axes] | "
                "null]"
            )


def _validate_optim(o: OptimConfig) -> None:
    _one_of("optim.name", o.name, OPTIMIZERS)
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    _one_of("optim.moment_dtype", o.moment_dtype, DTYPES)
    _positive("optim.lr", o.lr)
    for key in ("warmup_steps", "decay_steps", "weight_decay", "clip_norm", "momentum", "eps"):
        _non_negative(f"optim.{key}", getattr(o, key))
    _positive("optim.grad_accum", o.grad_accum)
    for key in ("end_lr_ratio", "wsd_decay_fraction", "b1", "b2"):
        _fraction(f"optim.{key}", getattr(o, key))


def _validate_data(d: DataConfig) -> None:
    _one_of("data.source", d.source, DATA_SOURCES)
    _fraction("data.val_fraction", d.val_fraction, closed=False)
    _positive("data.num_threads", d.num_threads)
    _non_negative("data.prefetch", d.prefetch)
    needs_path = {"shards": "a directory written by `jaxscale prepare`",
                  "hf": "a local data file or directory, or a dataset name"}
    if d.source in needs_path and not d.path:
        raise ConfigError(f"data.source={d.source!r} needs data.path: {needs_path[d.source]}")
    if not d.text_field:
        raise ConfigError("data.text_field='' must name the key that holds a document's text")


def _validate_watchdog(w: WatchdogConfig) -> None:
    _non_negative("watchdog.factor", w.factor)
    if 0 < w.factor <= 1:
        raise ConfigError(f"watchdog.factor={w.factor} must be above 1 (or 0 to turn it off)")
    _non_negative("watchdog.min_seconds", w.min_seconds)
    _non_negative("watchdog.timeout", w.timeout)
    _positive("watchdog.poll_seconds", w.poll_seconds)


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _non_negative("checkpoint.every", c.every)
    _positive("checkpoint.keep", c.keep)
    _non_negative("checkpoint.keep_period", c.keep_period)
    if c.restore_step < -1:
        raise ConfigError(f"checkpoint.restore_step={c.restore_step} must be a step >= 0 or -1")


def validate(cfg: Config) -> None:
    """Check every value; raises ConfigError naming the first bad one."""
    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_batches"):
        _positive(key, getattr(cfg, key))
    _non_negative("eval_every", cfg.eval_every)
    _non_negative("z_loss", cfg.z_loss)
    _one_of("on_nonfinite", cfg.on_nonfinite, NONFINITE_POLICIES)
    _validate_model(cfg.model)
    _validate_mesh(cfg.mesh)
    _validate_rules(cfg.sharding.rules)
    _validate_optim(cfg.optim)
    _validate_data(cfg.data)
    _validate_checkpoint(cfg.checkpoint)
    _validate_watchdog(cfg.watchdog)
    if cfg.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"seq_len={cfg.seq_len} is above model.max_seq_len={cfg.model.max_seq_len}; lower "
            "seq_len or raise model.max_seq_len"
        )
    if cfg.batch_size % cfg.optim.grad_accum:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not divisible by optim.grad_accum="
            f"{cfg.optim.grad_accum} (each microbatch needs the same number of sequences)"
        )
    byte_text = cfg.data.tokenizer == "byte" and cfg.data.source != "synthetic"
    if byte_text and cfg.model.vocab_size < 256:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is too small for data.tokenizer='byte' "
            "(needs >= 256)"
        )
    if cfg.profile.steps and (
        len(cfg.profile.steps) != 2
        or not 0 <= cfg.profile.steps[0] < cfg.profile.steps[1] <= cfg.steps
    ):
        # stop <= steps: a trace that never reaches its stop step is never written
        raise ConfigError(
            f"profile.steps={list(cfg.profile.steps)} must be [start, stop] with 0 <= start < stop"
            f" <= steps (steps={cfg.steps})"
        )
