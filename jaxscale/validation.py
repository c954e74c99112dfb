"""Value checks of a Config.

Every check raises a one-line ConfigError naming the dotted key, the value and what would be
valid. No jax import here either: `jaxscale.config.load` runs these before any JAX work.

This module does not import `jaxscale.config` (config imports it): it reads what it needs off the
objects it is given. The names of a field's choices are the `typing.Literal` of its annotation
(`_check_choices`), and a model section gets the decoder's checks when its class carries the
`decoder_checks` marker. Only the choice lists that a Literal cannot hold live here:
`RULE_PRESETS` (sharding.rules also takes a list of rules) and `TASKS` (grows at run time).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

from jaxscale.errors import ConfigError

if TYPE_CHECKING:
    from jaxscale.config import (
        CheckpointConfig,
        Config,
        DataConfig,
        MeshConfig,
        ModelConfig,
        OptimConfig,
        TaskConfig,
        WatchdogConfig,
    )

# sharding.rules preset names, keyed like jaxscale.core.sharding.RULE_PRESETS (re-exported by
# jaxscale.config; tests/test_config.py checks the keys match).
RULE_PRESETS = ("auto", "dp", "fsdp", "tp", "fsdp_tp", "hsdp")
# task.name choices; `jaxscale.tasks.register` adds to it.
TASKS = ["lm", "classify"]


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def choices_error(key: str, value: Any, choices: Sequence[str]) -> ConfigError:
    """The one-line error for a value outside its choices: "key='v' is not valid; choose ..."."""
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


def _check_choices(section: Any, prefix: str = "") -> None:
    """Every Literal-typed field of a config dataclass, and of the sections it holds, has one of
    the Literal's names (OmegaConf checks this on load; this also covers a hand-built Config)."""
    for name, hint in get_type_hints(type(section)).items():
        value = getattr(section, name)
        if get_origin(hint) is Literal:
            _one_of(prefix + name, value, get_args(hint))
        elif dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{name}.")


def _validate_model(m: ModelConfig) -> None:
    for key in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _non_negative("model.num_kv_heads", m.num_kv_heads)
    _non_negative("model.head_dim", m.head_dim)
    _fraction("model.dropout", m.dropout, closed=False)
    _positive("model.scan_unroll", m.scan_unroll)
    if m.scan_unroll > 1 and not m.scan_layers:
        raise ConfigError(f"model.scan_unroll={m.scan_unroll} unrolls the scan over the layers: "
                          "it needs model.scan_layers=true")
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
            "set model.head_dim explicitly or pick a divisor"
        )
    if m.num_heads % m.kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}"
        )
    if m.position == "rope" and m.head_size % 2:
        raise ConfigError("model.position='rope' needs an even head dimension")
    if m.rope_scaling != "none":
        _positive("model.rope_factor", m.rope_factor)
    if m.rope_scaling == "llama3":
        _positive("model.rope_original_max_len", m.rope_original_max_len)
        _positive("model.rope_low_freq_factor", m.rope_low_freq_factor)
        if m.rope_high_freq_factor <= m.rope_low_freq_factor:
            raise ConfigError(
                f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be above "
                f"model.rope_low_freq_factor={m.rope_low_freq_factor} (rope_scaling=llama3)")
    _validate_moe(m)


def _validate_generate(g: Any) -> None:
    _positive("generate.max_new_tokens", g.max_new_tokens)
    _non_negative("generate.temperature", g.temperature)
    _non_negative("generate.top_k", g.top_k)
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p={g.top_p} must be in (0, 1]")
    for eos in g.eos_ids:
        _non_negative("generate.eos_ids", eos)


def _validate_moe(m: ModelConfig) -> None:
    moe = m.moe
    _non_negative("model.moe.num_experts", moe.num_experts)
    if not moe.num_experts:
        return
    _positive("model.moe.top_k", moe.top_k)
    if moe.top_k > moe.num_experts:
        raise ConfigError(
            f"model.moe.top_k={moe.top_k} is above model.moe.num_experts={moe.num_experts}; a "
            "token cannot be sent to more experts than there are"
        )
    _positive("model.moe.every_n_layers", moe.every_n_layers)
    if m.num_layers % moe.every_n_layers:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by model.moe.every_n_layers="
            f"{moe.every_n_layers} (the layers repeat in groups ending with a MoE layer)"
        )
    _non_negative("model.moe.d_ff", moe.d_ff)
    _non_negative("model.moe.num_shared_experts", moe.num_shared_experts)
    _positive("model.moe.capacity_factor", moe.capacity_factor)
    _non_negative("model.moe.aux_loss", moe.aux_loss)
    _non_negative("model.moe.z_loss", moe.z_loss)


def _validate_parallel_model(cfg: Config) -> None:
    """The decoder's expert and context parallelism against the mesh (sizes known before the
    devices are; an axis of -1 is checked when the mesh is built)."""
    m, mesh = cfg.model, cfg.mesh
    size = mesh.expert * mesh.dcn_expert
    if m.moe.num_experts and mesh.expert > 0 and m.moe.num_experts % size:
        raise ConfigError(
            f"model.moe.num_experts={m.moe.num_experts} is not divisible by mesh.expert={size}; "
            "each expert shard must hold the same number of experts"
        )
    if m.moe.num_experts and m.name != "decoder":
        raise ConfigError(
            f"model.moe.num_experts={m.moe.num_experts}: mixture-of-experts layers are built by "
            f"model.name='decoder', not {m.name!r}"
        )
    sequence = mesh.sequence * mesh.dcn_sequence
    if m.context_parallel == "none":
        return
    if sequence == 1:
        raise ConfigError(
            f"model.context_parallel={m.context_parallel!r} needs mesh.sequence > 1 (it splits "
            "attention over the sequence axis); set mesh.sequence or model.context_parallel=none"
        )
    balanced = m.context_parallel == "ring" and m.context_load_balance
    if sequence > 0:
        parts = 2 * sequence if balanced else sequence
        if cfg.seq_len % parts:
            what = ("2 x mesh.sequence (the load-balanced ring holds two chunks per shard)"
                    if balanced else "mesh.sequence")
            raise ConfigError(
                f"seq_len={cfg.seq_len} is not divisible by {what} = {parts}"
            )


def check_schedule(schedule: str, stages: int, microbatches: int, virtual_stages: int = 1) -> None:
    """The schedule's demands on the microbatches and virtual stages, as one-line errors.

    Raises:
      ConfigError: fewer microbatches than stages for 1f1b; virtual stages
        with a schedule other than circular; microbatches not a multiple of the stages for
        circular.
    """
    if schedule == "1f1b" and microbatches < stages:
        raise ConfigError(
            f"pipeline.microbatches={microbatches} is below mesh.stage={stages}; 1f1b needs at "
            "least one microbatch per stage"
        )
    if virtual_stages > 1 and schedule != "circular":
        raise ConfigError(
            f"pipeline.virtual_stages={virtual_stages} needs pipeline.schedule='circular' (not "
            f"{schedule!r}); set pipeline.virtual_stages=1"
        )
    if schedule == "circular" and microbatches % stages:
        raise ConfigError(
            f"pipeline.microbatches={microbatches} is not a multiple of mesh.stage={stages}; the "
            "circular schedule sends microbatches round the stages in groups of mesh.stage"
        )


def _validate_pipeline(cfg: Config) -> None:
    """The pipeline's settings against the mesh, the batch and (for the decoder) the layers."""
    p, stages = cfg.pipeline, cfg.mesh.stage * cfg.mesh.dcn_stage
    _positive("pipeline.microbatches", p.microbatches)
    _positive("pipeline.virtual_stages", p.virtual_stages)
    if stages <= 1:  # 1, or -1: the stage count is checked when the mesh is built
        return
    check_schedule(p.schedule, stages, p.microbatches, p.virtual_stages)
    if cfg.batch_size % p.microbatches:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not divisible by pipeline.microbatches="
            f"{p.microbatches} (each microbatch needs the same number of sequences)"
        )
    if cfg.optim.grad_accum != 1:
        raise ConfigError(
            f"optim.grad_accum={cfg.optim.grad_accum} with mesh.stage={stages}: a pipelined step "
            "accumulates over pipeline.microbatches; set optim.grad_accum=1"
        )
    m = cfg.model
    if not getattr(m, "decoder_checks", False):
        return
    chunks = stages * p.virtual_stages
    if m.num_layers % chunks:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by mesh.stage x "
            f"pipeline.virtual_stages = {stages} x {p.virtual_stages} = {chunks}; every chunk of "
            "the layer stack needs the same number of layers"
        )
    unsupported = [
        (m.name != "decoder", f"model.name={m.name!r} (the Linen decoder is pipelined)"),
        (not m.scan_layers, "model.scan_layers=false (stages split the scanned stack)"),
        (m.moe.num_experts > 0, f"model.moe.num_experts={m.moe.num_experts}"),
        (m.context_parallel != "none", f"model.context_parallel={m.context_parallel!r}"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(f"mesh.stage={stages} cannot pipeline {what}; set mesh.stage=1")


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


def _validate_param_rules(param_rules: Any, replicate_below: int) -> None:
    import re

    _non_negative("sharding.replicate_below", replicate_below)
    if not isinstance(param_rules, (list, tuple)):
        raise ConfigError(
            f"sharding.param_rules={param_rules!r} must be a list of [regex, [logical names]]"
        )
    for rule in param_rules:
        ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
        names = rule[1] if ok else None
        ok = ok and isinstance(names, (list, tuple)) and all(
            n is None or isinstance(n, str) for n in names)
        if not ok:
            raise ConfigError(
                f"sharding.param_rules entry {_plain(rule)!r} must be [regex, [logical names]] "
                "(a name may be null)"
            )
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ConfigError(
                f"sharding.param_rules regex {rule[0]!r} does not compile: {e}"
            ) from None


def _plain(x: Any) -> Any:
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _validate_task(t: TaskConfig) -> None:
    _one_of("task.name", t.name, TASKS)
    _positive("task.num_classes", t.num_classes)
    if not t.input_shape or any(d <= 0 for d in t.input_shape):
        raise ConfigError(
            f"task.input_shape={list(t.input_shape)} must be a list of positive sizes"
        )
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"task.label_smoothing={t.label_smoothing} must be in [0, 1)")


def _validate_optim(o: OptimConfig) -> None:
    _positive("optim.lr", o.lr)
    for key in ("warmup_steps", "decay_steps", "weight_decay", "clip_norm", "momentum", "eps"):
        _non_negative(f"optim.{key}", getattr(o, key))
    _positive("optim.grad_accum", o.grad_accum)
    for key in ("end_lr_ratio", "wsd_decay_fraction", "b1", "b2"):
        _fraction(f"optim.{key}", getattr(o, key))


def _validate_data(d: DataConfig) -> None:
    _fraction("data.val_fraction", d.val_fraction, closed=False)
    _positive("data.num_threads", d.num_threads)
    _non_negative("data.prefetch", d.prefetch)
    needs_path = {"shards": "a directory written by `jaxscale prepare`",
                  "hf": "a local data file or directory, or a dataset name",
                  "image_folder": "a directory with one subfolder of images per class",
                  "npz": "a .npz file holding `images` and `labels` arrays"}
    if d.source in needs_path and not d.path:
        raise ConfigError(f"data.source={d.source!r} needs data.path: {needs_path[d.source]}")
    if not d.text_field:
        raise ConfigError("data.text_field='' must name the key that holds a document's text")
    if d.source == "addition" and not 1 <= d.addition_digits <= 9:
        raise ConfigError(f"data.addition_digits={d.addition_digits} must be in [1, 9]")
    _non_negative("data.crop_padding", d.crop_padding)
    _non_negative("data.mixup", d.mixup)


# data.source values that hold labelled examples (jaxscale.data.images.SOURCES)
IMAGE_SOURCES = ("digits", "image_folder", "npz", "synthetic")
IMAGE_ONLY_SOURCES = ("digits", "image_folder", "npz")


def _validate_images(cfg: Config) -> None:
    """The classify task's data and the model's patches agree with the examples' shape."""
    if cfg.data.source not in IMAGE_SOURCES:
        raise ConfigError(
            f"data.source={cfg.data.source!r} holds no labels: task.name=classify reads "
            f"labelled examples from one of {', '.join(IMAGE_SOURCES)}")
    patch = getattr(cfg.model, "patch_size", None)
    shape = list(cfg.task.input_shape)
    if patch and len(shape) == 3 and (shape[0] % patch or shape[1] % patch):
        raise ConfigError(
            f"task.input_shape={shape}: the image size {shape[0]}x{shape[1]} is not divisible "
            f"by model.patch_size={patch}")


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
    _non_negative("checkpoint.local_every", c.local_every)
    _positive("checkpoint.local_keep", c.local_keep)
    if bool(c.local_dir) != (c.local_every > 0):
        raise ConfigError(
            f"checkpoint.local_dir={c.local_dir!r} and checkpoint.local_every={c.local_every}: "
            "the local tier needs both (a directory on each node's own disk and an interval)")


def validate(cfg: Config) -> None:
    """Check every value; raises ConfigError naming the first bad one."""
    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_batches"):
        _positive(key, getattr(cfg, key))
    _non_negative("eval_every", cfg.eval_every)
    _non_negative("z_loss", cfg.z_loss)
    _positive("loss.chunk", cfg.loss.chunk)
    _check_choices(cfg)
    _validate_task(cfg.task)
    classes = getattr(cfg.model, "num_classes", None)
    if cfg.task.name == "classify" and classes is not None and classes != cfg.task.num_classes:
        raise ConfigError(
            f"model.num_classes={classes} does not match task.num_classes="
            f"{cfg.task.num_classes}: the head must have a logit per label")
    if cfg.task.name == "classify":
        _validate_images(cfg)
    elif cfg.data.source in IMAGE_ONLY_SOURCES:
        text = [s for s in get_args(get_type_hints(type(cfg.data))["source"])
                if s not in IMAGE_ONLY_SOURCES]
        raise ConfigError(
            f"data.source={cfg.data.source!r} holds labelled images: task.name={cfg.task.name} "
            f"reads text from one of {', '.join(text)}")
    decoder = getattr(cfg.model, "decoder_checks", False)
    if decoder:
        _validate_model(cfg.model)
        _validate_parallel_model(cfg)
    _validate_mesh(cfg.mesh)
    _validate_rules(cfg.sharding.rules)
    _validate_param_rules(cfg.sharding.param_rules, cfg.sharding.replicate_below)
    _validate_optim(cfg.optim)
    _validate_pipeline(cfg)
    _validate_data(cfg.data)
    _validate_checkpoint(cfg.checkpoint)
    _validate_watchdog(cfg.watchdog)
    _validate_generate(cfg.generate)
    if decoder and cfg.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"seq_len={cfg.seq_len} is above model.max_seq_len={cfg.model.max_seq_len}; lower "
            "seq_len or raise model.max_seq_len"
        )
    longest_sum = 3 * cfg.data.addition_digits + 4  # "a+b=c\n" with the longest operands and sum
    if cfg.data.source == "addition" and cfg.seq_len + 1 < longest_sum:
        raise ConfigError(
            f"seq_len={cfg.seq_len} is too short for data.addition_digits="
            f"{cfg.data.addition_digits}: a document takes up to {longest_sum} tokens, so seq_len "
            f"must be at least {longest_sum - 1}")
    if cfg.batch_size % cfg.optim.grad_accum:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not divisible by optim.grad_accum="
            f"{cfg.optim.grad_accum} (each microbatch needs the same number of sequences)"
        )
    byte_text = cfg.data.tokenizer == "byte" and cfg.data.source != "synthetic"
    if decoder and cfg.task.name == "lm" and byte_text and cfg.model.vocab_size < 256:
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
