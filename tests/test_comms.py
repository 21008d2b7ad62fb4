"""Collective counting: hand-written HLO, then the bytes each strategy implies."""

import pytest

from jaxscale.comms import count_collectives
from jaxscale.config import build_profile
from jaxscale.grid import build_grid
from jaxscale.step import compile_point

HLO = """
ENTRY %main {
  %p0 = f32[256,128]{1,0} parameter(0)
  %p1 = bf16[64]{0} parameter(1)
  %ar = (f32[256,128]{1,0}, bf16[64]{0}) all-reduce(%p0, %p1), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %ag = f32[1024,128]{1,0} all-gather(%p0), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %rs = f32[64,128]{1,0} reduce-scatter(%p0), channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
  %ags = (f32[256,128]{1,0}, f32[512,128]{1,0}) all-gather-start(%p0), channel_id=4, replica_groups={{0,1}}
  %agd = f32[512,128]{1,0} all-gather-done(%ags)
  ROOT %cp = f32[256,128]{1,0} collective-permute(%p0), channel_id=5, source_target_pairs={{0,1},{1,0}}
}
"""


def test_counts_and_full_array_bytes_from_hand_written_hlo():
    c = count_collectives(HLO, n_devices=8)
    full = 256 * 128 * 4
    assert c.count == {"all-reduce": 1, "all-gather": 2, "reduce-scatter": 1, "all-to-all": 0,
                       "collective-permute": 1}
    assert c.bytes["all-reduce"] == full + 64 * 2  # a combined tuple all-reduce counts every operand
    assert c.bytes["all-gather"] == 1024 * 128 * 4 + 512 * 128 * 4  # gathered results; -done not counted
    assert c.bytes["reduce-scatter"] == full  # the operand before scattering
    assert c.bytes["collective-permute"] == full
    ring = ((full + 128) * 2 * 3 / 4  # all-reduce over a group of 4
            + 1024 * 128 * 4 * 3 / 4 + 512 * 128 * 4 * 1 / 2  # all-gathers over groups of 4 and 2
            + full * 3 / 4 + full)  # reduce-scatter over 4 (mesh axis_0), permute
    assert c.traffic_bytes == pytest.approx(ring)


D, B, S, V = 64, 8, 16, 128
MATRIX_BYTES_PER_LAYER = (4 * D * D + 2 * D * 4 * D) * 4


def _collectives(strategy, n, layers=2):
    profile = build_profile({"model": {"d_model": D, "n_layers": layers, "n_heads": 4, "d_ff": 4 * D, "seq_len": S,
                                       "vocab": V},
                             "batch": {"global_batch": B}, "mesh": {"devices": [n], "strategies": [strategy]}})
    (point,) = build_grid(profile, 8)[0]
    step = compile_point(point, profile.run)
    return count_collectives(step.hlo_text, n), step


def test_one_device_has_no_collectives():
    c, _ = _collectives("dp", 1)
    assert sum(c.bytes.values()) == 0 and sum(c.count.values()) == 0


def test_dp_all_reduces_a_gradient_the_size_of_the_params():
    c, step = _collectives("dp", 4)
    assert c.bytes["all-reduce"] == pytest.approx(step.param_bytes, abs=16)  # + the loss scalar
    assert c.bytes["all-gather"] == 0


def test_fsdp_gathers_weights_and_reduces_gradients():
    c, step = _collectives("fsdp", 4)
    params_full = step.param_bytes * 4  # every float32 weight is split 4 ways (norm scales are tiny)
    embedding = V * D * 4
    # Every matrix is gathered for use (the embedding table is looked up in place on
    # its shard instead, after the tokens are gathered).
    assert c.bytes["all-gather"] == pytest.approx(2 * MATRIX_BYTES_PER_LAYER + D * V * 4 + B * S * 4, rel=0.01)
    # Gradients are reduced in full: on the CPU as an all-reduce whose result each
    # device slices (XLA's GPU and TPU pipelines emit a reduce-scatter instead).
    reduced = c.bytes["all-reduce"] + c.bytes["reduce-scatter"]
    assert reduced == pytest.approx(params_full - embedding, rel=0.02)


def test_tp_reduces_activations_every_layer_whatever_the_device_count():
    activation = B * S * D * 4
    per_layer = {}
    for n in (2, 4):
        two, _ = _collectives("tp", n, layers=2)
        one, _ = _collectives("tp", n, layers=1)
        assert two.bytes["all-gather"] == 0
        per_layer[n] = two.bytes["all-reduce"] - one.bytes["all-reduce"]
    assert per_layer[2] == per_layer[4]
    # Megatron's f/g pair per sublayer: 2 reductions forward and at least 2 backward
    # (XLA reduces the q, k and v input gradients separately: 4 backward).
    k = per_layer[2] / activation
    assert k == int(k) and 4 <= k <= 6
