"""Collective counting: hand-written HLO, real CPU and TPU HLO of tiny programs, then the bytes each strategy implies.

The TPU HLO comes from the TPU compiler itself (libtpu), compiling for a v5e
topology on this CPU-only machine: nothing runs on a TPU.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxscale.comms import collective_axes, count_collectives, replica_groups
from jaxscale.config import build_profile
from jaxscale.grid import build_grid
from jaxscale.hlo import HloModule
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
    profile = build_profile({"run": {"scan_layers": True}, "model": {"d_model": D, "n_layers": layers, "n_heads": 4, "d_ff": 4 * D, "seq_len": S,
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
    # its shard instead, after the tokens are gathered). The layers are one scanned
    # loop: each layer's matrices are gathered in the forward loop and again in the
    # backward loop (gathered weights are not kept across iterations), once per trip.
    assert step.point.model.n_layers == 2
    assert c.bytes["all-gather"] == pytest.approx(2 * 2 * MATRIX_BYTES_PER_LAYER + D * V * 4 + B * S * 4, rel=0.01)
    # Gradients are reduced in full: on the CPU as an all-reduce whose result each
    # device slices (XLA's GPU and TPU pipelines emit a reduce-scatter instead).
    reduced = c.bytes["all-reduce"] + c.bytes["reduce-scatter"]
    assert reduced == pytest.approx(params_full - embedding, rel=0.02)


def test_tp_reduces_activations_every_layer_whatever_the_device_count():
    activation = B * S * D * 4
    two, _ = _collectives("tp", 2, layers=2)
    one, _ = _collectives("tp", 2, layers=1)
    four, _ = _collectives("tp", 4, layers=2)
    assert two.bytes["all-gather"] == four.bytes["all-gather"] == 0
    # Every tp reduction is of whole activations (or the loss's per-token sums), whatever the device count.
    assert four.bytes["all-reduce"] == two.bytes["all-reduce"]
    per_layer = two.bytes["all-reduce"] - one.bytes["all-reduce"]
    # Megatron's f/g pair per sublayer: 2 reductions forward and at least 2 backward
    # (XLA reduces the q, k and v input gradients separately: 4 backward).
    k = per_layer / activation
    assert k == int(k) and 4 <= k <= 6


# ----------------------------------------------------------- hand-written HLO forms

TILED = """
ENTRY %main {
  %a = bf16[512,2048]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %b = f32[2,512]{1,0:T(2,128)S(1)} parameter(1)
  %c = f32[]{:T(128)} parameter(2)
  ROOT %ar = (bf16[512,2048]{1,0:T(8,128)(2,1)S(1)}, f32[2,512]{1,0:T(2,128)S(1)}, /*index=2*/f32[]{:T(128)}) all-reduce(%a, %b, /*index=2*/%c), channel_id=9, replica_groups=mesh['axis_0'=16,'axis_1'=1] {'axis_0'}, use_global_device_ids=true, to_apply=%add
}
"""


def test_tiled_layouts_and_every_operand_of_a_tuple_collective():
    c = count_collectives(TILED, 16)
    assert c.count["all-reduce"] == 1
    assert c.bytes["all-reduce"] == 512 * 2048 * 2 + 2 * 512 * 4 + 4
    assert c.items[0].group_size == 16


LOOPS = """
%body.known (p: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %p = (s32[], f32[64,64]{1,0}) parameter(0)
  %x = f32[64,64]{1,0} get-tuple-element(%p), index=1
  %ag = f32[256,64]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[64,64]{1,0}) tuple(%i, %x)
}

%cond.known (p: (s32[], f32[64,64])) -> pred[] {
  %p = (s32[], f32[64,64]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%collective_fusion.start (x: f32[64,64]) -> (f32[64,64], f32[256,64], u32[]) {
  %x = f32[64,64]{1,0:T(8,128)} parameter(0)
  %g = f32[256,64]{1,0:T(8,128)} all-gather(%x), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %cc = (f32[64,64]{1,0:T(8,128)}, f32[256,64]{1,0:T(8,128)}, u32[]) custom-call(%g), custom_call_target="AsyncCollectiveStart"
}

%collective_fusion.done (x: f32[64,64]) -> f32[256,64] {
  %x = f32[64,64]{1,0:T(8,128)} parameter(0)
  %g = f32[256,64]{1,0:T(8,128)} all-gather(%x), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %cc = f32[256,64]{1,0:T(8,128)} custom-call(%g), custom_call_target="AsyncCollectiveDone"
}

%all-reduce-scatter.1 (in: f32[64,64]) -> f32[16,64] {
  %in = f32[64,64]{1,0:T(8,128)} parameter(0)
  %r = f32[64,64]{1,0:T(8,128)} all-reduce(%in), channel_id=8, replica_groups={{0,1,2,3}}, to_apply=%add
  %z = s32[] constant(0)
  ROOT %s = f32[16,64]{1,0:T(8,128)} dynamic-slice(%r, %z, %z), dynamic_slice_sizes={16,64}
}

%body.inferred (q: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %q = (s32[]{:T(128)}, f32[64,64]{1,0:T(8,128)}) parameter(0)
  %y = f32[64,64]{1,0:T(8,128)} get-tuple-element(%q), index=1
  %start = (f32[64,64]{1,0:T(8,128)}, f32[256,64]{1,0:T(8,128)}, u32[]) fusion(%y), kind=kCustom, calls=%collective_fusion.start
  %gte = f32[64,64]{1,0:T(8,128)} get-tuple-element(%start), index=0
  %done = f32[256,64]{1,0:T(8,128)} fusion(%gte), kind=kCustom, calls=%collective_fusion.done
  %rs = f32[16,64]{1,0:T(8,128)} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.1
  %cps = (f32[64,64]{1,0:T(8,128)}, f32[64,64]{1,0:T(8,128)}, u32[], u32[]) collective-permute-start(%y), channel_id=3, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cpd = f32[64,64]{1,0:T(8,128)} collective-permute-done(%cps)
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%j, %one)
  ROOT %t = (s32[]{:T(128)}, f32[64,64]{1,0:T(8,128)}) tuple(%next, %cpd)
}

%cond.inferred (q: (s32[], f32[64,64])) -> pred[] {
  %limit = s32[]{:T(128)} constant(12)
  %q = (s32[]{:T(128)}, f32[64,64]{1,0:T(8,128)}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %limit), direction=LT
}

ENTRY %main (a: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %three = s32[] constant(3)
  %init = (s32[], f32[64,64]{1,0}) tuple(%zero, %a)
  %w1 = (s32[], f32[64,64]{1,0}) while(%init), condition=%cond.known, body=%body.known, backend_config={"known_trip_count":{"n":"5"},"known_init_step":{"init":"0","step":"1"}}
  %c0 = s32[]{:T(128)} copy(%three)
  %init2 = (s32[]{:T(128)}, f32[64,64]{1,0:T(8,128)}) tuple(%c0, %a)
  %w2 = (s32[]{:T(128)}, f32[64,64]{1,0:T(8,128)}) while(%init2), condition=%cond.inferred, body=%body.inferred
  %ars = (f32[64,64]{1,0}, f32[64,64]{1,0}) all-reduce-start(%a, %a), channel_id=4, replica_groups=[2,2]<=[4], to_apply=%add
  %ard = (f32[64,64]{1,0}, f32[64,64]{1,0}) all-reduce-done(%ars)
  ROOT %r = f32[64,64]{1,0} get-tuple-element(%ard), index=0
}
"""


def test_loops_async_pairs_and_fused_clones_count_once_per_execution():
    """Planted: a body with a known trip count of 5; a TPU-style body whose trip count (12 − 3 = 9) must be read
    off its condition, holding an async collective fusion (one all-gather cloned into its start and done
    computations, one channel_id), a TPU reduce-scatter (all-reduce + dynamic-slice fusion) and an async
    permute pair; an async all-reduce pair of two operands at top level."""
    module = HloModule.parse(LOOPS)
    assert module.multiplicity["body.known"] == 5 and module.multiplicity["body.inferred"] == 9
    assert module.multiplicity["collective_fusion.start"] == 9 and module.unknown_trip_counts == 0
    c = count_collectives(LOOPS, 4)
    block = 64 * 64 * 4
    assert c.count == {"all-reduce": 1, "all-gather": 5 + 9, "reduce-scatter": 9, "all-to-all": 0,
                       "collective-permute": 9}
    assert c.bytes["all-gather"] == (5 + 9) * 4 * block
    assert c.bytes["reduce-scatter"] == 9 * block and c.bytes["collective-permute"] == 9 * block
    assert c.bytes["all-reduce"] == 2 * block  # both operands of the -start, the -done not again
    ring = (5 + 9) * 4 * block * 3 / 4 + 9 * block * 3 / 4 + 9 * block + 2 * block * 2 * 1 / 2
    assert c.traffic_bytes == pytest.approx(ring)


ASYNC_WRAPPED = """
%wrapped_reduce_scatter (x: f32[64,64]) -> f32[16,64] {
  %x = f32[64,64]{1,0} parameter(0)
  ROOT %rs = f32[16,64]{1,0} reduce-scatter(%x), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}

ENTRY %main (a: f32[64,64]) -> f32[16,64] {
  %a = f32[64,64]{1,0} parameter(0)
  %start = ((f32[64,64]{1,0}), f32[16,64]{1,0}, u32[]) async-start(%a), async_execution_thread="parallel", calls=%wrapped_reduce_scatter
  %update = ((f32[64,64]{1,0}), f32[16,64]{1,0}, u32[]) async-update(%start), async_execution_thread="parallel", calls=%wrapped_reduce_scatter
  ROOT %done = f32[16,64]{1,0} async-done(%update), async_execution_thread="parallel", calls=%wrapped_reduce_scatter
}
"""


def test_a_called_computation_runs_once_per_call():
    text = ASYNC_WRAPPED.replace(
        "ENTRY %main (a: f32[64,64]) -> f32[16,64] {",
        "ENTRY %main (a: f32[64,64]) -> f32[16,64] {\n  %c1 = f32[16,64]{1,0} call(%a), to_apply=%wrapped_reduce_scatter\n"
        "  %c2 = f32[16,64]{1,0} call(%a), to_apply=%wrapped_reduce_scatter")
    assert count_collectives(text, 4).count["reduce-scatter"] == 3


def test_a_collective_wrapped_in_async_start_update_done_counts_once():
    c = count_collectives(ASYNC_WRAPPED, 4)
    assert c.count["reduce-scatter"] == 1 and c.bytes["reduce-scatter"] == 64 * 64 * 4


def test_a_loop_that_steps_by_two_runs_half_the_trips():
    """The TPU's windowed matmul loops advance their counter by 2: 3 → 12 in steps of 2 is 5 trips."""
    text = LOOPS.replace("%one = s32[]{:T(128)} constant(1)", "%one = s32[]{:T(128)} constant(2)")
    assert HloModule.parse(text).multiplicity["body.inferred"] == 5
    assert count_collectives(text, 4).count["collective-permute"] == 5


def test_a_loop_without_a_readable_trip_count_is_counted_once_and_reported():
    text = LOOPS.replace("direction=LT", "direction=NE")
    c = count_collectives(text, 4)
    assert c.unknown_trip_counts == 1 and c.count["collective-permute"] == 1


@pytest.mark.parametrize("attrs, groups", [
    ("replica_groups={{0,2},{1,3}}", [[0, 2], [1, 3]]),
    ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}", [[0, 1], [2, 3]]),
    ("replica_groups={}", [[0, 1, 2, 3]]),
    ("source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]]),
])
def test_replica_group_forms(attrs, groups):
    assert replica_groups(attrs, 4) == groups


def test_collective_axes_follow_the_mesh_coordinates():
    mesh_shape = (2, 4)  # device d sits at (d // 4, d % 4)
    assert collective_axes([[0, 4], [1, 5]], mesh_shape) == (0,)
    assert collective_axes([[0, 1, 2, 3]], mesh_shape) == (1,)
    assert collective_axes([list(range(8))], mesh_shape) == (0, 1)
    assert collective_axes([[3]], mesh_shape) == ()


# ------------------------------------------------- real HLO from the CPU and TPU compilers

L_SMALL, L_LARGE, WIDTH, ROWS = 2, 4, 256, 64


def _scanned_layers(w, x):
    def body(carry, w_layer):
        return jnp.tanh(carry @ w_layer), None

    y, _ = jax.lax.scan(body, x, w)
    return jnp.sum(y.astype(jnp.float32))


def _mixed_dp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b"])
    return jnp.sum((h.astype(jnp.bfloat16) @ params["w2"]).astype(jnp.float32))


def _compile_all(devices, dtype) -> dict:
    """Tiny programs on a 4-device data-parallel mesh; their HLO text and the planted byte counts."""
    mesh = Mesh(np.array(devices[:4]).reshape(4, 1), ("data", "model"))
    out = {}
    for layers in (L_SMALL, L_LARGE):  # fsdp: weights sharded over data, gathered per layer, grads reduced
        w_sh, x_sh = NamedSharding(mesh, P(None, "data", None)), NamedSharding(mesh, P("data", None))
        step = jax.jit(jax.grad(_scanned_layers), in_shardings=(w_sh, x_sh), out_shardings=w_sh)
        w = jax.ShapeDtypeStruct((layers, WIDTH, WIDTH), dtype, sharding=w_sh)
        x = jax.ShapeDtypeStruct((ROWS, WIDTH), dtype, sharding=x_sh)
        out[layers] = step.lower(w, x).compile().as_text()
    rep, x_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None))
    shapes = {"w1": ((WIDTH, WIDTH), jnp.float32), "b": ((WIDTH,), jnp.float32), "w2": ((WIDTH, 128), jnp.bfloat16)}
    params = {k: jax.ShapeDtypeStruct(s, d, sharding=rep) for k, (s, d) in shapes.items()}
    step = jax.jit(jax.grad(_mixed_dp), in_shardings=({k: rep for k in shapes}, x_sh),
                   out_shardings={k: rep for k in shapes})
    out["dp"] = step.lower(params, jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.float32, sharding=x_sh)).compile().as_text()
    out["dp_bytes"] = sum(int(np.prod(s)) * jnp.dtype(d).itemsize for s, d in shapes.values())
    return out


@pytest.fixture(scope="session")
def tpu_v5e_devices():
    # libtpu takes a machine-wide lock file by default; compiling for a topology needs no TPU,
    # so other processes holding libtpu must not stop these tests.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices


@pytest.fixture(scope="session")
def real_hlo(tpu_v5e_devices):
    return {"cpu": _compile_all(jax.devices(), jnp.float32), "tpu": _compile_all(tpu_v5e_devices, jnp.bfloat16)}


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_scanned_layers_count_per_trip(real_hlo, platform):
    """fsdp over scanned layers: each layer's weight is gathered for use (forward, and again or not in the
    backward pass) and its gradient reduced once, so the per-step counts scale with the layer count and the
    bytes are whole multiples of the layer weights, in the dtype the program computes in."""
    hlo = real_hlo[platform]
    layer_bytes = WIDTH * WIDTH * (4 if platform == "cpu" else 2)
    small, large = (count_collectives(hlo[n], 4) for n in (L_SMALL, L_LARGE))
    if platform == "cpu":
        assert '"known_trip_count"' in hlo[L_SMALL]
    else:
        assert "known_trip_count" not in hlo[L_SMALL] and "while(" in hlo[L_SMALL]  # read off the condition
        # a collective matmul: one all-gather cloned into several computations under one channel_id
        channels = re.findall(r"all-gather\(.*?channel_id=(\d+)", hlo[L_SMALL])
        assert "async_collective_fusion" in hlo[L_SMALL] and len(channels) > len(set(channels))
    for layers, c in ((L_SMALL, small), (L_LARGE, large)):
        assert c.unknown_trip_counts == 0
        gathers = c.bytes["all-gather"] / (layers * layer_bytes)
        assert gathers in (1, 2) and c.count["all-gather"] == gathers * layers
        reduced = c.bytes["all-reduce"] + c.bytes["reduce-scatter"]
        assert reduced == layers * layer_bytes
        assert c.count["all-reduce"] + c.count["reduce-scatter"] == layers
    assert large.bytes["all-gather"] == 2 * small.bytes["all-gather"]
    assert {ax for c in small.items for ax in [collective_axes([list(g) for g in c.groups], (4, 1))]} == {(0,)}


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_dp_gradients_of_mixed_dtypes_are_reduced_whole(real_hlo, platform):
    """One combined (tuple) all-reduce of every gradient, counted operand by operand in the dtype the compiler
    reduces in: the TPU keeps the bf16 weight's gradient in bf16; the CPU computes bf16 dots in float32 and
    reduces that gradient before converting it, so it moves 4 bytes per element."""
    c = count_collectives(real_hlo[platform]["dp"], 4)
    elements = WIDTH * WIDTH + WIDTH + WIDTH * 128
    expected = real_hlo[platform]["dp_bytes"] if platform == "tpu" else 4 * elements
    assert c.bytes["all-reduce"] == expected  # in one tuple all-reduce or several: the compiler chooses
    assert c.bytes["all-gather"] == c.bytes["reduce-scatter"] == 0
