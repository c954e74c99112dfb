"""Logical sharding rules: the one place where logical axis names meet mesh axes.

Models name the dimensions of their parameters (``nn.with_logical_partitioning(init, ("embed",
"mlp"))``) and of their activations (``constrain(x, ("batch", "length", "act_embed"))``) by what
they mean. Rules map those names to mesh axes:

    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", None))

The default rule set, "auto", names every mesh axis for every logical name it fits and drops the
mesh's size-1 axes, so the mesh alone chooses the parallelism; presets (dp, fsdp, tp, fsdp_tp,
hsdp) remain for explicit control. Parameters a model does not annotate get names from path
rules (``sharding.param_rules``). Every check is strict: a logical name with no rule, a rule
naming a mesh axis that does not exist, a dimension not divisible by its mesh axes, a large
parameter no path rule matches, or a mesh axis larger than 1 that does no work each raise a
ShardingError that names the array or the axis.

Modules:
  rules.py   presets, resolve_rules, logical_to_spec, named_sharding, constrain, current_context,
             batch shardings
  auto.py    the auto rule set
  paths.py   annotate_params: path-pattern names for unannotated parameters
  state.py   logical_axes_of, state_shardings and the mesh-used checks
  report.py  ReportRow, sharding_report, format_report
  manual.py  shard_map under the rules: spec_axes, partition_spec (per-device code)

Logical names used by jaxscale's models:
  parameters:  vocab, embed, heads, kv_heads, head_dim, mlp, norm, layers, exp / expert,
               conv_in, conv_out
  activations: batch, length, act_embed, act_heads, act_kv_heads, act_head_dim, act_mlp,
               act_vocab, act_exp / act_expert, act_expert_batch (the batch dimension of
               expert-major buffers); images: height, width, channels
"""

from jaxscale.core.sharding.auto import AUTO_BATCH_AXES, AUTO_RULES, auto_rules
from jaxscale.core.sharding.paths import (
    ParamRules,
    ReplicatedSmall,
    annotate_params,
    is_box,
    replicated_small,
)
from jaxscale.core.sharding.report import (
    REPLICATED_SMALL,
    ReportRow,
    bytes_per_device,
    format_report,
    rule_text,
    sharding_report,
)
from jaxscale.core.sharding.rules import (
    ACTIVATION_NAMES,
    ACTIVATION_PREFIX,
    BATCH_AXES,
    RULE_PRESETS,
    LogicalName,
    LogicalRules,
    MeshAxes,
    activation_sharding,
    axes_of,
    batch_sharding,
    batch_shardings,
    check_rules,
    constrain,
    current_context,
    is_activation_name,
    logical_to_spec,
    named_sharding,
    pad_names,
    resolve_rules,
)
from jaxscale.core.sharding.state import (
    LogicalAxes,
    ResolvedLeaf,
    logical_axes_of,
    resolve_state,
    state_shardings,
)
from jaxscale.errors import ConfigError, ShardingError

__all__ = [
    "ACTIVATION_NAMES", "ACTIVATION_PREFIX", "AUTO_BATCH_AXES", "AUTO_RULES", "BATCH_AXES",
    "REPLICATED_SMALL", "RULE_PRESETS", "ConfigError", "LogicalAxes", "LogicalName",
    "LogicalRules", "MeshAxes", "ParamRules", "ReplicatedSmall", "ReportRow", "ResolvedLeaf",
    "ShardingError", "activation_sharding", "annotate_params", "auto_rules", "axes_of",
    "batch_sharding", "batch_shardings", "bytes_per_device", "check_rules", "constrain",
    "current_context",
    "format_report", "is_activation_name", "is_box", "logical_axes_of", "logical_to_spec",
    "named_sharding", "pad_names", "replicated_small", "resolve_rules", "resolve_state",
    "rule_text", "sharding_report", "state_shardings",
]
