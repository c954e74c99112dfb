"""Typed, frozen configuration for every jaxscale setting.

A run is described by one `Config`. `load()` builds it from a preset name (a YAML file shipped in
`jaxscale/configs/`) or a YAML path, merged with dotted ``key=value`` overrides. Merging, YAML
parsing and type conversion are OmegaConf's; this module adds the schema and one-line errors that
name the key, the value and the valid choices; `validation.py` holds the value checks, which run
before any JAX work.

A field with named choices is typed by a `typing.Literal` declared next to its section
(``norm: Norm``): OmegaConf rejects any other value when it merges, and the matching tuple of
names (``NORMS = get_args(Norm)``) is what the implementations' tables are keyed by
(tests/test_config.py checks that). `validation.py` reads the Literals off the dataclasses it is
given, so it needs no import of this module and the import runs one way: config -> validation.

This module never imports jax: the CLI must be able to validate a config (and set the simulated
device count) before jax initialises its backends.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from jaxscale.errors import ConfigError
from jaxscale.validation import (  # noqa: F401 (RULE_PRESETS is part of this module's API)
    RULE_PRESETS,
    choices_error,
    did_you_mean,
    validate,
)

PRESETS_DIR = pathlib.Path(__file__).parent / "configs"

# Choices of the model section. The tables implementing them are keyed by the same names:
# jaxscale.core.remat.POLICIES, jaxscale.core.dtypes.DTYPES.
RematPolicy = Literal[
    "none", "full", "minimal", "save_dots", "save_qkv_proj", "save_attn_out", "save_mlp",
    "offload_dots",
]
DType = Literal["float32", "bfloat16", "float16"]
Norm = Literal["rmsnorm", "layernorm"]
Mlp = Literal["swiglu", "gelu"]
Position = Literal["rope", "learned"]
AttentionImpl = Literal["auto", "xla", "cudnn", "reference"]
ContextParallel = Literal["none", "ring", "allgather"]
WeightGradDtype = Literal["compute", "float32"]
MoeDispatch = Literal["dropless", "capacity"]
RouterScore = Literal["softmax", "sigmoid"]
RopeScaling = Literal["none", "linear", "llama3"]
REMAT_POLICIES: tuple[str, ...] = get_args(RematPolicy)
DTYPES: tuple[str, ...] = get_args(DType)
NORMS: tuple[str, ...] = get_args(Norm)
MLPS: tuple[str, ...] = get_args(Mlp)
POSITIONS: tuple[str, ...] = get_args(Position)
ATTENTIONS: tuple[str, ...] = get_args(AttentionImpl)
CONTEXT_PARALLEL: tuple[str, ...] = get_args(ContextParallel)
MOE_DISPATCHES: tuple[str, ...] = get_args(MoeDispatch)
ROUTER_SCORES: tuple[str, ...] = get_args(RouterScore)
ROPE_SCALINGS: tuple[str, ...] = get_args(RopeScaling)
PipelineSchedule = Literal["gpipe", "circular", "1f1b"]
PIPELINE_SCHEDULES: tuple[str, ...] = get_args(PipelineSchedule)


@dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts MLPs of the decoder (`jaxscale.models.moe`); num_experts=0 is dense."""

    num_experts: int = 0  # routed experts per MoE layer; 0 = every MLP is dense
    top_k: int = 2  # experts each token is sent to
    every_n_layers: int = 1  # layer i is a MoE layer when (i + 1) % every_n_layers == 0
    d_ff: int = 0  # hidden width of one expert; 0 = model.d_ff
    num_shared_experts: int = 0  # experts every token also passes through (dense, d_ff each)
    router: RouterScore = "softmax"  # softmax | sigmoid scores of the router logits
    renormalize: bool = True  # rescale the top-k scores of a token to sum to 1
    # dropless: tokens sorted by expert, grouped matmuls, none dropped | capacity: einsum
    # dispatch into fixed per-expert buffers; tokens past capacity skip the MLP (residual only)
    dispatch: MoeDispatch = "dropless"
    capacity_factor: float = 1.25  # capacity: buffer slots per expert = factor x k x tokens / E
    aux_loss: float = 0.01  # weight of the load-balancing loss (Switch/GShard form)
    z_loss: float = 0.001  # weight of the router z-loss, mean(logsumexp(router logits)^2)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class ModelConfig:
    """The built-in decoder LM (`jaxscale.models.decoder`); also its NNX twin (decoder_nnx).

    `kv_heads` and `head_size` resolve the 0 defaults of `num_kv_heads` and `head_dim`; read
    those rather than the raw fields.
    """

    # `validation.validate` runs the decoder's checks (head counts, rope, max_seq_len, byte
    # vocabulary) on a model section that carries this marker. A ClassVar, so not a config key.
    decoder_checks: ClassVar[bool] = True

    name: str = "decoder"  # model registry key (jaxscale.models.MODELS)
    num_layers: int = 2  # transformer blocks
    d_model: int = 64  # residual stream width
    num_heads: int = 4  # query heads
    num_kv_heads: int = 0  # key/value heads; 0 = num_heads (MHA), fewer = grouped-query
    head_dim: int = 0  # per-head width; 0 = d_model // num_heads
    d_ff: int = 256  # MLP hidden width
    vocab_size: int = 256  # token vocabulary (256 = bytes)
    max_seq_len: int = 1024  # longest sequence the model accepts (learned positions table size)
    norm: Norm = "rmsnorm"  # rmsnorm | layernorm
    mlp: Mlp = "swiglu"  # swiglu (gated SiLU) | gelu
    position: Position = "rope"  # rope (rotary) | learned (absolute table)
    tie_embeddings: bool = False  # output projection shares the token embedding
    use_bias: bool = False  # biases in every dense layer (attention and MLP)
    qkv_bias: bool = False  # biases in the query/key/value projections only (Qwen2)
    rope_theta: float = 10000.0  # rotary base frequency
    # Rotary frequencies for contexts longer than the pretraining one: none | linear (positions
    # divided by rope_factor) | llama3 (Llama 3.1's per-frequency blend of the two)
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0  # linear, llama3: how much longer the context is
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original/this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/this are kept
    rope_original_max_len: int = 8192  # llama3: the pretraining context length
    norm_eps: float = 1e-5  # epsilon inside the norms
    dropout: float = 0.0  # dropout rate on attention and MLP outputs (training only)
    dtype: DType = "float32"  # compute dtype of activations and matmuls
    param_dtype: DType = "float32"  # storage dtype of parameters (master weights)
    # The dtype the weight gradients leave the matmuls in, and so the dtype FSDP reduce-scatters
    # (data parallelism all-reduces) them in: compute (model.dtype) | float32 (the reduction
    # sums in float32, twice the bytes of a bf16 one; rounded to the compute dtype once after)
    weight_grad_dtype: WeightGradDtype = "compute"
    scan_layers: bool = True  # nn.scan over a stacked layer axis (fast compile) vs unrolled
    # scanned layers: layers per iteration of the scan loop (1: a loop of num_layers trips;
    # num_layers: one iteration, the whole stack inlined in the loop body)
    scan_unroll: int = 1
    remat: RematPolicy = "none"  # rematerialization policy name (jaxscale.core.remat.POLICIES)
    attention: AttentionImpl = "auto"  # auto (cudnn on GPU when possible) | xla | cudnn | reference
    init_std: float = 0.02  # stddev of the normal initialiser of dense and embedding weights
    # Attention over a sequence split by mesh.sequence: none (the partitioner decides) | ring
    # (K/V blocks passed around the sequence axis, online softmax) | allgather (K/V gathered)
    context_parallel: ContextParallel = "none"
    # ring: each sequence shard holds two mirrored chunks so causal work is equal (the train
    # step reorders the batch; seq_len must divide by 2 x mesh.sequence)
    context_load_balance: bool = True
    moe: MoeConfig = field(default_factory=MoeConfig)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `num_kv_heads`, or `num_heads` when that is 0 (multi-head)."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        """Width of one head: `head_dim`, or `d_model // num_heads` when that is 0."""
        return self.head_dim or self.d_model // self.num_heads


# model.name -> the dataclass of its config section. `jaxscale.models.register` adds to it; a
# model config needs a `name` field. Built-in models are listed here so that `config.load` knows
# their sections before (without) importing jax.
MODEL_CONFIGS: dict[str, type] = {"decoder": ModelConfig, "decoder_nnx": ModelConfig}


def model_configs() -> dict[str, type]:
    """`MODEL_CONFIGS` with the built-in image models' sections (`jaxscale.vision_config` and
    `jaxscale.zoo_config`, which import this module and so register themselves on first use)."""
    import jaxscale.vision_config  # noqa: F401
    import jaxscale.zoo_config  # noqa: F401

    return MODEL_CONFIGS


def register_model_config(name: str, config_type: type) -> None:
    """Make `model.name=<name>` select `config_type` for the model section."""
    if not dataclasses.is_dataclass(config_type) or "name" not in {
        f.name for f in dataclasses.fields(config_type)
    }:
        raise TypeError(f"{config_type!r} must be a dataclass with a `name` field")
    MODEL_CONFIGS[name] = config_type


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes per axis. Field order is the device order: outer (slow links) first.

    Exactly one axis may be -1: it takes the remaining devices. The dcn_* sizes split an axis
    across slices/hosts connected by the data-centre network (hybrid mesh); the total size of an
    axis is its ICI size times its DCN size.
    """

    data: int = 1  # pure data parallelism (parameters replicated)
    stage: int = 1  # pipeline stages: the decoder's layer stack is split over them
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
    # "auto" (every mesh axis used wherever it fits; a size-1 axis is a no-op), a preset name
    # (dp | fsdp | tp | fsdp_tp | hsdp) or an ordered list of
    # [logical_name, mesh_axis | [mesh_axes...] | null]; the first rule for a name wins.
    rules: Any = "auto"
    # Logical names for parameters the model does not annotate: ordered [regex, [names...]]
    # pairs searched in the "/"-joined parameter path (e.g. ["layers_\\d+/mlp/.*kernel",
    # ["embed", "mlp"]]); the first match wins.
    param_rules: Any = ()
    # An unannotated parameter that no param_rules entry matches is replicated when it is at
    # most this many bytes, and an error when it is larger.
    replicate_below: int = 1 << 20


@dataclass(frozen=True)
class TaskConfig:
    name: str = "lm"  # what is trained: lm (next-token prediction) | classify (labels of inputs)
    num_classes: int = 10  # classify: number of labels
    # classify: one example's shape, e.g. [H, W, C] (image sources resize to its H x W; a
    # model's compound scaling grows H and W)
    input_shape: tuple[int, ...] = (8, 8, 1)
    label_smoothing: float = 0.0  # classify: weight of the uniform target mixed into the label


# Choices of the optim section, keyed like jaxscale.core.optim.OPTIMIZERS and .SCHEDULES.
Optimizer = Literal["adamw", "lion", "adafactor", "sgd"]
Schedule = Literal["constant", "cosine", "linear", "wsd"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)


@dataclass(frozen=True)
class OptimConfig:
    name: Optimizer = "adamw"  # adamw | lion | adafactor | sgd
    lr: float = 3e-4  # peak learning rate
    # constant | cosine | linear | wsd (warmup-stable-decay); every schedule warms up first
    schedule: Schedule = "cosine"
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
    moment_dtype: DType = "float32"
    grad_accum: int = 1  # microbatches per step (lax.scan, fp32 accumulation)


@dataclass(frozen=True)
class PipelineConfig:
    """How a step runs its microbatches through the stages (with mesh.stage > 1; ignored at 1)."""

    microbatches: int = 1  # M: microbatches per step; the bubble is (S-1)/(V*M+S-1)
    # gpipe (all forwards, then all backwards by autodiff) | circular (virtual stages
    # interleaved, by autodiff) | 1f1b (a hand-scheduled loop: at most S microbatches in flight)
    schedule: PipelineSchedule = "1f1b"
    virtual_stages: int = 1  # V: chunks of the layer stack per stage (circular)


# data.source choices, keyed like jaxscale.data.SOURCES.
DataSource = Literal["text", "shards", "hf", "synthetic", "addition", "digits", "image_folder",
                     "npz"]
DATA_SOURCES: tuple[str, ...] = get_args(DataSource)


@dataclass(frozen=True)
class DataConfig:
    # text | shards (`jaxscale prepare` output) | hf (datasets) | synthetic | addition
    # ("a+b=c" documents, jaxscale.data.addition)
    source: DataSource = "text"
    # text: a directory, file or glob of text / .jsonl files ("" = the Python standard library's
    # sources); shards: a prepared directory; hf: a local data file/directory or a dataset name;
    # image_folder: a directory of class folders; npz: a .npz file
    path: str = ""
    tokenizer: str = "byte"  # byte | path/to/tokenizer.json (Hugging Face tokenizers)
    text_field: str = "text"  # the key holding a document's text in .jsonl lines and hf rows
    hf_split: str = "train"  # hf: the dataset split to read
    val_fraction: float = 0.02  # fraction of documents (or images) held out for evaluation
    pack: bool = True  # pack documents into sequences with segment ids (no cross-doc attention)
    shuffle: bool = True  # shuffle sequences (or images) with the run's seed
    num_threads: int = 2  # background threads reading records
    prefetch: int = 4  # batches prepared ahead of the step
    log_rows: bool = False  # append each step's rows and row hashes to <workdir>/data_rows/
    addition_digits: int = 3  # addition: operands are drawn from [0, 10**addition_digits)
    # Images (task.name=classify; jaxscale.data.images): digits (scikit-learn's 1,797 8x8
    # handwritten digits, no download) | image_folder (data.path/<class>/*.png|jpg|jpeg) | npz
    # (data.path holding `images` [N, H, W(, C)] and `labels` [N], optionally `val_images` and
    # `val_labels`) | synthetic. Augmentation (training only) is drawn from (seed, stream position).
    crop_padding: int = 0  # random crop of the image after zero-padding each side by this
    flip: bool = False  # random horizontal flips (off for digits: a flipped digit is another)
    # mixup's Beta(alpha, alpha); 0 = off. Rows (2i, 2i+1) of the batch are mixed together
    mixup: float = 0.0


# loss.chunked choices: whether the decoder's logits are computed a chunk of positions at a time.
ChunkedLoss = Literal["auto", "always", "never"]
CHUNKED_VOCAB = 32768  # loss.chunked=auto turns on above this model.vocab_size


@dataclass(frozen=True)
class LossConfig:
    # project onto the vocabulary a chunk of positions at a time, so the [batch, seq_len, vocab]
    # logits never exist at once (the built-in decoder): always | never | auto (above a
    # vocabulary of 32,768)
    chunked: ChunkedLoss = "auto"
    chunk: int = 256  # positions per chunk: the largest divisor of seq_len at most this


# checkpoint.on_corrupt choices: what a restore does with a step that fails verification.
CorruptPolicy = Literal["skip", "error"]
CORRUPT_POLICIES: tuple[str, ...] = get_args(CorruptPolicy)


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
    # a step whose files do not match its manifest: skip it for the previous verified step, or
    # stop with a CheckpointError
    on_corrupt: CorruptPolicy = "skip"
    # the local tier: node-local disk (or /dev/shm) each process saves its own shards to, every
    # local_every steps between the durable saves; "" = none (jaxscale.checkpoint.local)
    local_dir: str = ""
    local_every: int = 0  # save to local_dir every N steps (needs local_dir); 0 = no local tier
    local_keep: int = 2  # most recent local steps kept


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
class GenerateConfig:
    """Sampling from the model (`jaxscale generate`, `jaxscale ttc`; `jaxscale.generate`)."""

    max_new_tokens: int = 64  # tokens generated per prompt at most
    temperature: float = 0.0  # softmax temperature of the sampler; 0 = greedy (argmax)
    top_k: int = 0  # sample among the k most likely tokens; 0 = all
    top_p: float = 1.0  # sample among the most likely tokens holding this much mass; 1 = all
    seed: int = 0  # seeds the sampler (the same seed gives the same tokens on any mesh)
    eos_ids: tuple[int, ...] = ()  # a prompt's generation stops after any of these tokens


# on_nonfinite choices: what the step does with a non-finite loss or gradient.
NonfinitePolicy = Literal["abort", "skip"]
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonfinitePolicy)


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
    loss: LossConfig = field(default_factory=LossConfig)
    # on a non-finite loss or gradient: abort (raise) | skip (drop the update)
    on_nonfinite: NonfinitePolicy = "abort"
    progress: bool = True  # progress bar when stdout is a terminal
    task: TaskConfig = field(default_factory=TaskConfig)
    # The section of the model that `model.name` names: its own config dataclass (see
    # MODEL_CONFIGS); the built-in decoder's is ModelConfig.
    model: Any = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)


# --------------------------------------------------------------------------------------------
# Loading.


def presets() -> list[str]:
    """Names of the presets shipped with jaxscale."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()):
    """The OmegaConf tree of a preset or YAML file, with its `base:` chain merged under it."""
    from omegaconf import OmegaConf

    path = pathlib.Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or path.is_file()):
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"--config {name_or_path!r} is neither a preset nor a YAML file; presets: "
                f"{', '.join(presets())}" + did_you_mean(name_or_path, presets())
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


def _omegaconf_error(e: Exception, model_type: type) -> ConfigError:
    """Turn an OmegaConf error into a one-line ConfigError naming the dotted key.

    An unknown key lists the valid keys of its section; a value outside a field's Literal lists
    the field's choices, in the same words as `validation.choices_error`.
    """
    from omegaconf.errors import ConfigKeyError, ValidationError

    full_key = str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")
    parent, _, leaf = full_key.rpartition(".")
    section = _section_type(parent, model_type)
    if isinstance(e, ConfigKeyError):
        valid = [f.name for f in dataclasses.fields(section)] if section is not None else []
        where = f"in '{parent}'" if parent else "at the top level"
        return ConfigError(
            f"unknown config key '{full_key}'" + did_you_mean(leaf, valid)
            + (f"; valid keys {where}: {', '.join(valid)}" if valid else "")
        )
    hint = get_type_hints(section).get(leaf) if section is not None else None
    if isinstance(e, ValidationError) and get_origin(hint) is Literal:
        return choices_error(full_key, getattr(e, "value", "?"), get_args(hint))
    return ConfigError(f"{full_key}: {_one_line(e)}")


def _section_type(dotted: str, model_type: type) -> type | None:
    """The config dataclass of the section at `dotted` ("" = Config), or None if there is none.

    Walks the resolved type hints, so every section is found from the field that holds it;
    `model` (typed Any) is the dataclass that `model.name` selected.
    """
    node: Any = Config
    for part in dotted.split(".") if dotted else []:
        node = model_type if node is Config and part == "model" else get_type_hints(node).get(part)
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
    return node


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
    model_type = ModelConfig
    try:
        given = OmegaConf.from_dotlist(list(overrides))
        tree = OmegaConf.merge(_for_model(_read_yaml(config), given), given)
        model_type = _model_type(tree)
        cfg = OmegaConf.to_object(OmegaConf.merge(_schema(model_type), tree))
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, model_type) from None
    validate(cfg)
    return cfg


def _for_model(tree: Any, overrides: Any) -> Any:
    """`tree` without its model section when `overrides` name a model of another config type.

    A preset's model section describes the preset's model: ``model.name=resnet`` on the
    decoder's tiny preset starts the ResNet section from its defaults (plus the overrides).
    """
    name = (overrides.get("model") or {}).get("name")
    if name is None or model_configs().get(name, ModelConfig) is _model_type(tree):
        return tree
    tree = tree.copy()
    tree.pop("model", None)
    return tree


def _model_type(tree: Any) -> type:
    """The config dataclass of the model section that the raw tree's `model.name` selects."""
    name = (tree.get("model") or {}).get("name", ModelConfig.name)
    return model_configs().get(name, ModelConfig)


def _schema(model_type: type) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.structured(Config(model=model_type()))


def from_dict(tree: dict) -> Config:
    """Build and validate a Config from a nested dict (e.g. one saved by `to_yaml`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    model_type = ModelConfig
    try:
        model_type = _model_type(OmegaConf.create(tree))
        cfg = OmegaConf.to_object(OmegaConf.merge(_schema(model_type), tree))
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, model_type) from None
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
