"""Typed, frozen configuration for every jaxscale setting.

A run is described by one `Config`. `load()` builds it from a preset name (a YAML file shipped in
`jaxscale/configs/`) or a YAML path, merged with dotted ``key=value`` overrides. Merging, YAML
parsing and type conversion are OmegaConf's; this module adds the schema, one-line errors that name
the key, the value and the valid choices, and value checks that run before any JAX work.

This module never imports jax: the CLI must be able to validate a config (and set the simulated
device count) before jax initialises its backends.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jaxscale.errors import ConfigError

PRESETS_DIR = pathlib.Path(__file__).parent / "configs"

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


@dataclass(frozen=True)
class ModelConfig:
    name: str = "decoder"  # model registry key (jaxscale.models.MODELS)
    num_layers: int = 2  # transformer blocks
    d_model: int = 64  # residual stream width
    num_heads: int = 4  # query heads
    num_kv_heads: int = 0  # key/value heads; 0 = num_heads (MHA), fewer = grouped-query
    head_dim: int = 0  # per-head width; 0 = d_model // num_heads
    d_ff: int = 256  # MLP hidden width
    vocab_size: int = 256  # token vocabulary (256 = bytes)
    max_seq_len: int = 1024  # longest sequence the model accepts (learned positions table size)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu (gated SiLU) | gelu
    position: str = "rope"  # rope (rotary) | learned (absolute table)
    tie_embeddings: bool = False  # output projection shares the token embedding
    use_bias: bool = False  # biases in dense layers and norms
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # epsilon inside the norms
    dropout: float = 0.0  # dropout rate on attention and MLP outputs (training only)
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (master weights)
    scan_layers: bool = True  # nn.scan over a stacked layer axis (fast compile) vs unrolled
    remat: str = "none"  # rematerialization policy name (jaxscale.remat.POLICIES)
    attention: str = "auto"  # auto (cudnn on GPU when possible) | xla | cudnn | reference
    init_std: float = 0.02  # stddev of the normal initialiser of dense and embedding weights


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes per axis. Field order is the device order: outer (slow links) first.

    Exactly one axis may be -1: it takes the remaining devices. The dcn_* sizes split an axis
    across slices/hosts connected by the data-centre network (hybrid mesh); the total size of an
    axis is its ICI size times its DCN size.
    """

    data: int = 1  # pure data parallelism (parameters replicated)
    stage: int = 1  # pipeline stages (no built-in model uses it yet; must stay 1 for them)
    fsdp: int = 1  # data parallelism with parameters and optimizer state sharded (ZeRO-3)
    expert: int = 1  # expert parallelism (for mixture-of-experts models)
    sequence: int = 1  # sequence (context) parallelism over the length axis
    tensor: int = 1  # tensor (model) parallelism over heads, MLP and vocab
    dcn_data: int = 1  # slices/hosts along data over the data-centre network
    dcn_stage: int = 1  # slices/hosts along stage over the data-centre network
    dcn_fsdp: int = 1  # slices/hosts along fsdp over the data-centre network
    dcn_expert: int = 1  # slices/hosts along expert over the data-centre network
    dcn_sequence: int = 1  # slices/hosts along sequence over the data-centre network
    dcn_tensor: int = 1  # slices/hosts along tensor over the data-centre network

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self) if not f.name.startswith("dcn_"))

    def ici_sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.axis_names}

    def dcn_sizes(self) -> dict[str, int]:
        return {name: getattr(self, "dcn_" + name) for name in self.axis_names}


@dataclass(frozen=True)
class ShardingConfig:
    # A preset name (dp | fsdp | tp | fsdp_tp | hsdp) or an ordered list of
    # [logical_name, mesh_axis | [mesh_axes...] | null]; the first rule for a name wins.
    rules: Any = "fsdp"


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | lion | adafactor | sgd
    lr: float = 3e-4  # peak learning rate
    schedule: str = "cosine"  # constant | cosine | linear | wsd (warmup-stable-decay); all warm up
    warmup_steps: int = 100  # linear warmup from 0 to lr
    decay_steps: int = 0  # steps of the schedule after warmup; 0 = the rest of the run
    end_lr_ratio: float = 0.1  # final learning rate as a fraction of lr (cosine, linear, wsd)
    wsd_decay_fraction: float = 0.2  # wsd: fraction of the post-warmup steps spent decaying
    b1: float = 0.9  # first-moment decay (adamw, lion) / momentum of adafactor
    b2: float = 0.95  # second-moment decay (adamw, lion)
    eps: float = 1e-8  # adamw denominator epsilon
    weight_decay: float = 0.1  # decoupled weight decay: p -= lr * wd * p (all optimizers)
    # Regexes searched in "/"-joined parameter paths; matching parameters get no weight decay.
    weight_decay_exclude: tuple[str, ...] = ("bias", "scale", "embedding")
    clip_norm: float = 1.0  # clip gradients to this global norm; 0 = off
    momentum: float = 0.9  # sgd momentum; 0 = plain sgd
    nesterov: bool = False  # sgd: Nesterov momentum
    # Storage dtype of the first moment / momentum (second moments stay float32 for stability).
    moment_dtype: str = "float32"
    grad_accum: int = 1  # microbatches per step (lax.scan, fp32 accumulation)


@dataclass(frozen=True)
class DataConfig:
    source: str = "text"  # text | shards (`jaxscale prepare` output) | hf (datasets) | synthetic
    # text: a directory, file or glob of text / .jsonl files ("" = the Python standard library's
    # sources); shards: a prepared directory; hf: a local data file/directory or a dataset name
    path: str = ""
    tokenizer: str = "byte"  # byte | path/to/tokenizer.json (Hugging Face tokenizers)
    text_field: str = "text"  # the key holding a document's text in .jsonl lines and hf rows
    hf_split: str = "train"  # hf: the dataset split to read
    val_fraction: float = 0.02  # fraction of documents held out for evaluation
    pack: bool = True  # pack documents into sequences with segment ids (no cross-doc attention)
    shuffle: bool = True  # shuffle sequences with the run's seed
    num_threads: int = 2  # background threads reading records
    prefetch: int = 4  # batches prepared ahead of the step
    log_rows: bool = False  # append each step's rows and row hashes to <workdir>/data_rows/


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # "" = <workdir>/checkpoints
    every: int = 500  # save every N steps (and at the end); 0 = only at the end
    keep: int = 3  # most recent checkpoints kept
    keep_period: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = off
    async_save: bool = True  # write in the background while training continues
    restore_step: int = -1  # resume from this step (later ones are deleted); -1 = the latest
    # with nothing to resume, start from the parameters of this checkpoint (or step) directory
    init_from: str = ""


@dataclass(frozen=True)
class WatchdogConfig:
    # A step is hung when it runs longer than factor x the median step time; 0 = no watchdog.
    factor: float = 20.0
    min_seconds: float = 300.0  # ...and longer than this (first steps, evals, checkpoint saves)
    timeout: float = 60.0  # after dumping the stacks, wait this long for the step, then exit 5
    poll_seconds: float = 1.0  # how often the watchdog thread looks


@dataclass(frozen=True)
class ProfileConfig:
    steps: tuple[int, ...] = ()  # [start, stop): capture a jax.profiler trace of these steps


@dataclass(frozen=True)
class Config:
    steps: int = 1000  # optimizer steps to train for
    batch_size: int = 32  # global batch, in sequences
    seq_len: int = 128  # tokens per sequence
    seed: int = 0  # seeds parameter init, dropout and the data order
    workdir: str = "runs/default"  # metrics, config, checkpoints and plots go here
    log_every: int = 10  # write metrics every N steps
    eval_every: int = 100  # evaluate every N steps; 0 = only at the end
    eval_batches: int = 8  # held-out batches per evaluation
    z_loss: float = 0.0  # weight of the log(Z)^2 auxiliary loss that keeps logits bounded
    on_nonfinite: str = "abort"  # abort (raise) | skip (drop the update) on a non-finite loss/grad
    progress: bool = True  # progress bar when stdout is a terminal
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)


# --------------------------------------------------------------------------------------------
# Loading.


def presets() -> list[str]:
    """Names of the presets shipped with jaxscale."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _choices(key: str, value: Any, choices: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}"
        + _did_you_mean(value, choices)
    )


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()):
    """The OmegaConf tree of a preset or YAML file, with its `base:` chain merged under it."""
    from omegaconf import OmegaConf

    path = pathlib.Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or path.is_file()):
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"--config {name_or_path!r} is neither a preset nor a YAML file; presets: "
                f"{', '.join(presets())}" + _did_you_mean(name_or_path, presets())
            )
    elif not path.is_file():
        raise ConfigError(f"--config {name_or_path!r}: no such file")
    if str(path.resolve()) in seen:
        raise ConfigError(f"--config {name_or_path!r}: 'base' chain loops back to itself")
    try:
        tree = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: keep one line
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {_one_line(e)}") from None
    base = tree.pop("base", None)
    if base is None:
        return tree
    parent = base if not str(base).endswith((".yaml", ".yml")) else str(path.parent / base)
    return OmegaConf.merge(_read_yaml(parent, seen + (str(path.resolve()),)), tree)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")[0].split())


def _omegaconf_error(e: Exception) -> ConfigError:
    """Turn an OmegaConf error into a one-line ConfigError naming the dotted key."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    full_key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    if isinstance(e, ConfigKeyError):
        parent, _, leaf = str(full_key).rpartition(".")
        node: Any = Config
        for part in parent.split(".") if parent else []:
            hit = {f.name: f for f in dataclasses.fields(node)}.get(part)
            node = hit.type if hit is not None else None
            if isinstance(node, str):
                node = _SECTIONS.get(part)
            if node is None:
                break
        valid = [f.name for f in dataclasses.fields(node)] if node is not None else []
        where = f"in '{parent}'" if parent else "at the top level"
        return ConfigError(
            f"unknown config key '{full_key}'" + _did_you_mean(leaf, valid)
            + (f"; valid keys {where}: {', '.join(valid)}" if valid else "")
        )
    if isinstance(e, ValidationError):
        return ConfigError(f"{full_key}: {_one_line(e)}")
    return ConfigError(f"{full_key}: {_one_line(e)}")


_SECTIONS = {
    "model": ModelConfig, "mesh": MeshConfig, "sharding": ShardingConfig, "optim": OptimConfig,
    "data": DataConfig, "checkpoint": CheckpointConfig, "profile": ProfileConfig,
    "watchdog": WatchdogConfig,
}


def load(config: str = "tiny", overrides: Sequence[str] = ()) -> Config:
    """Build and validate a Config.

    Args:
      config: a preset name (see `presets()`) or a path to a YAML file. A YAML file may name a
        `base:` preset or file that it is merged over.
      overrides: dotted ``key=value`` strings, e.g. ``["mesh.fsdp=4", "optim.lr=1e-3"]``.

    Returns:
      The validated, frozen Config.

    Raises:
      ConfigError: one line naming the bad key, its value and what would be valid.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(
            schema, _read_yaml(config), OmegaConf.from_dotlist(list(overrides))
        )
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    validate(cfg)
    return cfg


def from_dict(tree: dict) -> Config:
    """Build and validate a Config from a nested dict (e.g. one saved by `to_yaml`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), tree))
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    validate(cfg)
    return cfg


def replace(cfg: Config, **changes: Any) -> Config:
    """A copy of `cfg` with dotted keys changed, validated: ``replace(cfg, **{"mesh.fsdp": 8})``."""
    return load_tree(to_dict(cfg), [f"{k}={v}" for k, v in changes.items()])


def load_tree(tree: dict, overrides: Sequence[str] = ()) -> Config:
    from omegaconf import OmegaConf

    return from_dict(OmegaConf.to_container(
        OmegaConf.merge(OmegaConf.create(tree), OmegaConf.from_dotlist(list(overrides)))
    ))


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts/lists (tuples become lists), ready for YAML or JSON."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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
        raise _choices(key, value, choices)


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
