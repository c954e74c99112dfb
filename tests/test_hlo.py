# ruff: noqa: E501  (HLO instructions are long lines; the module below is real HLO syntax)
"""Collective parsing of HLO text: kinds, bytes, replica groups, loop trips, sliced all-reduces,
and XLA's involuntary-rematerialization log lines."""

import pytest

from jaxscale.analysis import hlo

# A hand-written partitioned module in the shapes XLA prints (CPU and GPU spellings mixed).
MODULE = """\
HloModule jit_train_step, entry_computation_layout={()->()}

%fused_slice (param_0.1: f32[64,8], param_1.2: s32[]) -> f32[8,8] {
  %param_0.1 = f32[64,8]{1,0} parameter(0)
  %param_1.2 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-slice.3 = f32[8,8]{1,0} dynamic-slice(%param_0.1, %param_1.2, %constant.1), dynamic_slice_sizes={8,8}
}

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %get-tuple-element.1 = f32[8,8]{1,0} get-tuple-element(%p), index=1
  %all-gather.7 = f32[64,8]{1,0} all-gather(%get-tuple-element.1), channel_id=1, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %tuple.2 = (s32[], f32[8,8]{1,0}) tuple(%get-tuple-element.1, %get-tuple-element.1)
}

%cond (p.1: (s32[], f32[8,8])) -> pred[] {
  %p.1 = (s32[], f32[8,8]{1,0}) parameter(0)
  ROOT %constant.9 = pred[] constant(true)
}

ENTRY %main (param.1: f32[8,8], param.2: s32[]) -> f32[8,8] {
  %param.1 = f32[8,8]{1,0} parameter(0)
  %param.2 = s32[] parameter(1)
  %tuple.1 = (s32[], f32[8,8]{1,0}) tuple(%param.2, %param.1)
  %while.1 = (s32[], f32[8,8]{1,0}) while(%tuple.1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %grad = f32[64,8]{1,0} add(%param.1, %param.1)
  %norm = f32[8]{0} add(%param.1, %param.1)
  %all-reduce.1 = (f32[64,8]{1,0}, f32[8]{0}) all-reduce(%grad, %norm), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %get-tuple-element.2 = f32[64,8]{1,0} get-tuple-element(%all-reduce.1), index=0
  %get-tuple-element.3 = f32[8]{0} get-tuple-element(%all-reduce.1), index=1
  %slice_fusion = f32[8,8]{1,0} fusion(%get-tuple-element.2, %param.2), kind=kLoop, calls=%fused_slice
  %use_norm = f32[8]{0} add(%get-tuple-element.3, %get-tuple-element.3)
  %reduce-scatter.1 = bf16[16,8]{1,0} reduce-scatter(bf16[64,8]{1,0} %x), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %all-gather-start.1 = (bf16[8,8]{1,0}, bf16[64,8]{1,0}) all-gather-start(bf16[8,8]{1,0} %y), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}
  %all-gather-done.1 = bf16[64,8]{1,0} all-gather-done(%all-gather-start.1)
  %all-to-all.1 = f32[8,8]{1,0} all-to-all(f32[8,8]{1,0} %param.1), channel_id=5, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  %collective-permute.1 = f32[8,8]{1,0} collective-permute(f32[8,8]{1,0} %param.1), channel_id=6, source_target_pairs={{0,1},{1,2},{2,3}}
  ROOT %out = f32[8,8]{1,0} add(%slice_fusion, %param.1)
}
"""


@pytest.fixture(scope="module")
def found():
    return {c.name: c for c in hlo.collectives(MODULE, num_devices=8)}


def test_kinds_bytes_and_groups(found):
    assert set(found) == {"all-gather.7", "all-reduce.1", "reduce-scatter.1",
                          "all-gather-start.1", "all-to-all.1", "collective-permute.1"}
    ag = found["all-gather.7"]
    assert (ag.kind, ag.bytes, ag.group_size) == ("all-gather", 64 * 8 * 4, 8)
    assert ag.groups == (tuple(range(8)),)
    # reduce-scatter: the input buffer = output x group size; iota groups [2,4]<=[8]
    rs = found["reduce-scatter.1"]
    assert (rs.kind, rs.bytes, rs.group_size) == ("reduce-scatter", 64 * 8 * 2, 4)
    assert rs.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    # async all-gather: the gathered buffer, counted once (the -done is not a second one)
    start = found["all-gather-start.1"]
    assert (start.kind, start.bytes, start.group_size) == ("all-gather", 64 * 8 * 2, 8)
    assert found["all-to-all.1"].groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert found["collective-permute.1"].bytes == 8 * 8 * 4


def test_loop_trip_count_multiplies(found):
    assert found["all-gather.7"].trips == 4
    summary = hlo.summarize(found.values())
    assert summary["all-gather"].count == 4 + 1
    assert summary["all-gather"].bytes == 4 * 64 * 8 * 4 + 64 * 8 * 2


def test_sliced_all_reduce_counts_only_the_sliced_element(found):
    ar = found["all-reduce.1"]
    assert ar.bytes == 64 * 8 * 4 + 8 * 4
    # element 0 only feeds a fusion that dynamic-slices it; element 1 is used whole
    assert ar.sliced_bytes == 64 * 8 * 4


@pytest.mark.parametrize("attrs, groups", [
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}",
     ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("replica_groups={}, dimensions={0}", (tuple(range(8)),)),
])
def test_replica_group_formats(attrs, groups):
    assert hlo.replica_groups(attrs, 8) == groups


def test_array_bytes():
    assert hlo.array_bytes("(bf16[2,3]{1,0}, f32[], /*index=2*/s32[4])") == [12, 4, 16]


def test_involuntary_remat_lines():
    log = (
        "I1123 some other line\n"
        "W1123 00:30:59.200680    3429 spmd_partitioner.cc:656] [SPMD] Involuntary full "
        "rematerialization. The compiler cannot go from sharding {devices=[64,1,1]<=[64]} to "
        "{devices=[1,1,8,8]<=[8,8]T(1,0) last_tile_dim_replicate} efficiently for HLO operation "
        "%fake_parameter.2 = bf16[4,8192,4096]{2,1,0} parameter(2)\n"
    )
    (line,) = hlo.involuntary_remats(log)
    assert "spmd_partitioner" in line and "bf16[4,8192,4096]" in line
    assert hlo.involuntary_remats("nothing to see\n") == []


# The same step as the partitioner left it: a bf16 gather, and a combined gradient reduction
# whose first element (a weight gradient) is bf16 and second (a norm scale's) f32.
PARTITIONED = """\
HloModule jit_train_step, entry_computation_layout={()->()}

ENTRY %main (w: bf16[8,8], g: bf16[64,8], n: f32[8]) -> bf16[64,8] {
  %w = bf16[8,8]{1,0} parameter(0)
  %g = bf16[64,8]{1,0} parameter(1)
  %n = f32[8]{0} parameter(2)
  %all-gather = bf16[64,8]{1,0} all-gather(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, metadata={op_name="jit(train_step)/jvp(Decoder)/mlp/wi/dot_general"}
  %all-reduce = bf16[64,8]{1,0} all-reduce(%g), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add, metadata={op_name="jit(train_step)/transpose(jvp(Decoder))/mlp/wi/dot_general"}
  %all-reduce.1 = f32[8]{0} all-reduce(%n), channel_id=3, replica_groups=[1,8]<=[8], to_apply=%add, metadata={op_name="jit(train_step)/transpose(jvp(Decoder))/mlp_norm/reduce_sum"}
  ROOT %out = bf16[64,8]{1,0} add(%all-gather, %all-reduce)
}
"""
# ... and as the CPU compiled it: both widened to f32, the two reductions combined.
COMPILED = """\
HloModule jit_train_step, entry_computation_layout={()->()}

ENTRY %main (w: f32[8,8], g: f32[64,8], n: f32[8]) -> f32[64,8] {
  %w = f32[8,8]{1,0} parameter(0)
  %g = f32[64,8]{1,0} parameter(1)
  %n = f32[8]{0} parameter(2)
  %all-gather.3 = f32[64,8]{1,0} all-gather(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, metadata={op_name="jit(train_step)/jvp(Decoder)/mlp/wi/dot_general"}
  %all-reduce.9 = (f32[64,8]{1,0}, f32[8]{0}) all-reduce(%g, %n), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add, metadata={op_name="jit(train_step)/transpose(jvp(Decoder))/mlp/wi/dot_general:mlp_norm/reduce_sum"}
  %gte = f32[64,8]{1,0} get-tuple-element(%all-reduce.9), index=0
  %all-to-all.2 = f32[8,8]{1,0} all-to-all(%w), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %out = f32[64,8]{1,0} add(%all-gather.3, %gte)
}
"""


def test_as_partitioned_takes_the_partitioners_element_widths():
    compiled = hlo.collectives(COMPILED, 8)
    assert [c.bytes for c in compiled] == [64 * 8 * 4, 64 * 8 * 4 + 8 * 4, 8 * 8 * 4]
    ag, ar, a2a = hlo.as_partitioned(compiled, PARTITIONED)
    assert ag.bytes == 64 * 8 * 2  # gathered in bf16
    assert ar.bytes == 64 * 8 * 2 + 8 * 4  # the weight gradient in bf16, the norm's in f32
    assert a2a.bytes == 8 * 8 * 4  # no partitioned counterpart: as compiled
    # one device (no partitioner ran): unchanged
    assert hlo.as_partitioned(compiled, "") == compiled
