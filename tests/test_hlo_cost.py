"""hlo_cost.program_stats: kernels, FLOPs and HBM bytes of a step, against hand counts, XLA's own figures and
real accelerator HLO (an H200's, and the TPU compiler's for a v5e topology, compiled on this CPU)."""

import gzip
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import KERNELS
from jaxscale import flops, hlo_cost

DATA = Path(__file__).parent / "data"
H200 = DATA / "h200-gpu-1x-cudnn"


def test_every_kernel_kind_counts_its_flops_once_per_execution():
    stats = hlo_cost.program_stats(KERNELS)
    gemm = 2 * 64 * 32 * 32  # (64x32) @ (32x32), three trips
    triton = 2 * 64 * 16 * 32
    elementwise = 64 * 32  # the multiply; exp is a transcendental, not a FLOP
    assert stats.matmul_flops == 3 * gemm + triton + 5000
    assert stats.flops == stats.matmul_flops + elementwise  # the loop counter's add is scalar bookkeeping
    # launches: the gemm 3 times (its counter add is scalar bookkeeping), exp, multiply, the fusion, the Pallas call
    assert stats.kernels == 3 + 4
    assert stats.flops_trusted and "cuBLAS gemm" in stats.flops_note


def test_a_kernel_that_cannot_be_counted_makes_the_count_untrusted():
    opaque = KERNELS.replace('"cost_estimate": {"flops": 5000, "transcendentals": 0, "bytes_accessed": 4096}',
                             '"serialization_format": 1')
    stats = hlo_cost.program_stats(opaque)
    assert not stats.flops_trusted and stats.opaque_kernels == ("tpu_custom_call",)
    assert "tpu_custom_call" in stats.flops_note
    unreadable = KERNELS.replace('backend_config={"known_trip_count":{"n":"3"}}', "").replace(
        "%n = s32[] constant(3)", "%n = s32[] parameter(1)")
    assert not hlo_cost.program_stats(unreadable).flops_trusted


# HBM traffic: an on-chip (S(1)) operand, a fusion that slices one operand and updates another in place
# and passes a third through, an async copy pair, an unfused slice.
BYTES = """
HloModule m, is_scheduled=true

%fused (p0: f32[8,256,256], p1: f32[8,1024], p2: f32[4,1024], p3: s32[], p4: f32[1024]) -> (f32[8,1024], f32[4,1024]) {
  %p0 = f32[8,256,256]{2,1,0:T(8,128)} parameter(0)
  %p3 = s32[]{:T(128)} parameter(3)
  %z = s32[]{:T(128)} constant(0)
  %ds = f32[1,256,256]{2,1,0:T(8,128)} dynamic-slice(%p0, %p3, %z, %z), dynamic_slice_sizes={1,256,256}
  %flat = f32[1,65536]{1,0:T(8,128)} bitcast(%ds)
  %p4 = f32[1024]{0:T(1024)S(1)} parameter(4)
  %row = f32[1,1024]{1,0:T(8,128)} bitcast(%p4)
  %p1 = f32[8,1024]{1,0:T(8,128)} parameter(1)
  %dus = f32[8,1024]{1,0:T(8,128)} dynamic-update-slice(%p1, %row, %p3, %z)
  %p2 = f32[4,1024]{1,0:T(8,128)} parameter(2)
  ROOT %t = (f32[8,1024]{1,0:T(8,128)}, f32[4,1024]{1,0:T(8,128)}) tuple(%dus, %p2)
}

ENTRY %main (w: f32[8,256,256], acc: f32[8,1024], keep: f32[4,1024], i: s32[], v: f32[1024]) -> (f32[8,1024], f32[4,1024]) {
  %w = f32[8,256,256]{2,1,0:T(8,128)} parameter(0)
  %acc = f32[8,1024]{1,0:T(8,128)} parameter(1)
  %keep = f32[4,1024]{1,0:T(8,128)} parameter(2)
  %i = s32[]{:T(128)} parameter(3)
  %v = f32[1024]{0:T(1024)} parameter(4)
  %cs = (f32[1024]{0:T(1024)S(1)}, f32[1024]{0:T(1024)}, u32[]{:S(2)}) copy-start(%v)
  %cd = f32[1024]{0:T(1024)S(1)} copy-done(%cs)
  %f = (f32[8,1024]{1,0:T(8,128)}, f32[4,1024]{1,0:T(8,128)}) fusion(%w, %acc, %keep, %i, %cd), kind=kLoop, calls=%fused
  %s = f32[2,1024]{1,0:T(8,128)} slice(%keep), slice={[0:2], [0:1024]}
  ROOT %out = (f32[8,1024]{1,0:T(8,128)}, f32[4,1024]{1,0:T(8,128)}) tuple(%f, %f)
}
"""


def test_hbm_bytes_count_only_what_reaches_device_memory():
    stats = hlo_cost.program_stats(BYTES)
    copy = 1024 * 4  # HBM -> VMEM prefetch: the HBM read only, once for the pair
    # one layer's slice of w read, the index read, one row of acc written in place; keep passed through untouched
    fusion = 256 * 256 * 4 + 4 + 1024 * 4
    unfused_slice = 2 * (2 * 1024 * 4)  # reads and writes its slice
    assert stats.hbm_bytes == copy + fusion + unfused_slice
    assert stats.kernels == 3  # copy-start, the fusion, the slice; copy-done is the same copy


def test_a_collective_started_before_a_loop_counts_once_though_its_clones_sit_in_the_body():
    """The TPU's collective matmuls clone the collective into fusions of a loop body; it runs as often as its start."""
    from jaxscale.comms import count_collectives

    text = """
%start_comp (p: bf16[16,64]) -> (bf16[16,64], bf16[256,64]) {
  %p = bf16[16,64]{1,0} parameter(0)
  %ag = bf16[256,64]{1,0} all-gather(%p), channel_id=7, replica_groups=[1,16]<=[16], dimensions={0}
  ROOT %s = (bf16[16,64]{1,0}, bf16[256,64]{1,0}) custom-call(%ag), custom_call_target="AsyncCollectiveStart"
}
%clone_comp (p: bf16[16,64], q: f32[8,8]) -> (bf16[256,64], f32[8,8]) {
  %p = bf16[16,64]{1,0} parameter(0)
  %q = f32[8,8]{1,0} parameter(1)
  %ag = bf16[256,64]{1,0} all-gather(%p), channel_id=7, replica_groups=[1,16]<=[16], dimensions={0}
  %n = f32[8,8]{1,0} negate(%q)
  ROOT %t = (bf16[256,64]{1,0}, f32[8,8]{1,0}) tuple(%ag, %n)
}
%body (p: (s32[], bf16[16,64], f32[8,8])) -> (s32[], bf16[16,64], f32[8,8]) {
  %p = (s32[], bf16[16,64]{1,0}, f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[16,64]{1,0} get-tuple-element(%p), index=1
  %q = f32[8,8]{1,0} get-tuple-element(%p), index=2
  %f = (bf16[256,64]{1,0}, f32[8,8]{1,0}) fusion(%x, %q), kind=kLoop, calls=%clone_comp
  %q2 = f32[8,8]{1,0} get-tuple-element(%f), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[16,64]{1,0}, f32[8,8]{1,0}) tuple(%next, %x, %q2)
}
%cond (p: (s32[], bf16[16,64], f32[8,8])) -> pred[] {
  %p = (s32[], bf16[16,64]{1,0}, f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
ENTRY %main (x: bf16[16,64], q: f32[8,8]) -> f32[8,8] {
  %x = bf16[16,64]{1,0} parameter(0)
  %q = f32[8,8]{1,0} parameter(1)
  %st = (bf16[16,64]{1,0}, bf16[256,64]{1,0}) fusion(%x), kind=kCustom, calls=%start_comp
  %zero = s32[] constant(0)
  %init = (s32[], bf16[16,64]{1,0}, f32[8,8]{1,0}) tuple(%zero, %x, %q)
  %w = (s32[], bf16[16,64]{1,0}, f32[8,8]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8,8]{1,0} get-tuple-element(%w), index=2
}
"""
    c = count_collectives(text, 16)
    assert c.count["all-gather"] == 1 and c.bytes["all-gather"] == 256 * 64 * 2
    stats = hlo_cost.program_stats(text, 16)
    # the clone fusion's own work: the negate (read and write 8x8 f32) each trip; the gathered clone adds nothing
    assert stats.hbm_bytes - stats.collective_hbm_bytes == 4 * 2 * 8 * 8 * 4
    assert stats.collective_hbm_bytes == 256 * 64 * 2 // 16 + 256 * 64 * 2  # shard read, gathered result written


# ------------------------------------------------------------- real programs


def _layers(kind):
    """A forward pass of L tanh(x @ W_l) layers, scanned over stacked weights or unrolled: the loop adds no
    traffic (each layer reads its weights once and its activations once, either way)."""
    L = 6

    def scanned(x, w):
        return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0]

    def unrolled(x, w):
        for i in range(L):
            x = jnp.tanh(x @ w[i])
        return x

    return {"scan": scanned, "unroll": unrolled}[kind], L


def _compile(fn, L, devices=None):
    args = (jax.ShapeDtypeStruct((256, 512), jnp.float32), jax.ShapeDtypeStruct((L, 512, 512), jnp.float32))
    if devices is not None:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        sharding = NamedSharding(Mesh(np.array(devices), ("d",)), P())
        args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args)
    return jax.jit(fn).lower(*args).compile()


def test_a_scanned_program_and_its_unrolled_twin_move_the_same_bytes_on_the_cpu():
    stats, xla = {}, {}
    for kind in ("scan", "unroll"):
        fn, L = _layers(kind)
        compiled = _compile(fn, L)
        stats[kind] = hlo_cost.program_stats(compiled.as_text())
        cost = compiled.cost_analysis()
        xla[kind] = (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]
    assert stats["scan"].hbm_bytes == pytest.approx(stats["unroll"].hbm_bytes, rel=0.05)
    # without loops, the count is XLA's own bytes accessed (the CPU counts every operand and result)
    assert stats["unroll"].hbm_bytes == pytest.approx(xla["unroll"], rel=0.01)
    # and XLA's count of the scanned program sees one trip of six
    assert xla["scan"] < 0.3 * xla["unroll"]
    assert stats["scan"].flops == pytest.approx(stats["unroll"].flops, rel=0.01)


def test_a_scanned_program_and_its_unrolled_twin_move_the_same_bytes_on_a_v5e():
    """Real TPU HLO from libtpu, compiled for a v5e chip on this CPU: activations stay in on-chip VMEM (S(1)),
    so HBM sees each layer's weights once (6 MiB), the input read and the output written."""
    from jaxscale import targets

    if targets.libtpu_version() is None:
        pytest.skip("libtpu is not installed")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    device = targets.slice_devices("v5e:2x2")[:1]
    stats = {}
    for kind in ("scan", "unroll"):
        fn, L = _layers(kind)
        stats[kind] = hlo_cost.program_stats(_compile(fn, L, device).as_text())
    assert stats["scan"].hbm_bytes == pytest.approx(stats["unroll"].hbm_bytes, rel=0.05)
    weights, activations = 6 * 512 * 512 * 4, 2 * 256 * 512 * 4
    assert stats["unroll"].hbm_bytes == pytest.approx(weights + activations, rel=0.02)


def test_elementwise_flops_follow_xlas_cost_analysis_on_a_loop_free_program():
    """An independent check of the elementwise rule: on the CPU, a train step with unrolled layers has no loop,
    so XLA's cost analysis counts all of it."""
    from jaxscale.config import build_profile
    from jaxscale.grid import build_grid
    from jaxscale.step import build_step

    profile = build_profile({"run": {"scan_layers": False}, "model": {"d_model": 32, "n_layers": 1, "n_heads": 4,
                                                                       "d_ff": 64, "seq_len": 16, "vocab": 64},
                             "batch": {"global_batch": 4}, "mesh": {"devices": [1], "strategies": ["dp"]}})
    program = build_step(build_grid(profile, 1)[0][0], profile.run)
    compiled = program.jitted.lower(*program.abstract_args).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    stats = hlo_cost.program_stats(compiled.as_text())
    assert stats.flops == pytest.approx(xla, rel=0.03)
    assert stats.matmul_flops == flops.train_flops(32, 1, 16, 64, 4, 64, causal=False)


@pytest.fixture(scope="module")
def h200():
    """The real optimized HLO of the 125m and 1b gpu-1x points on an H200 (cuBLASLt gemms, cuDNN attention)."""
    return {name: hlo_cost.program_stats(gzip.open(H200 / f"hlo-{name}.txt.gz", "rt").read())
            for name in ("125m", "1b")}


@pytest.mark.parametrize("name, d, layers, heads", [("125m", 768, 12, 12), ("1b", 2048, 18, 16)])
def test_h200_flops_count_the_cublas_gemms_and_cudnn_attention(h200, name, d, layers, heads):
    stats = h200[name]
    assert stats.flops_trusted and "cuBLAS gemm" in stats.flops_note and "cuDNN attention" in stats.flops_note
    # cuDNN's causal kernels: forward QKᵀ and PV, backward four gradients and QKᵀ again, half the square each
    b, s, hd = 8, 2048, d // heads
    one = 2 * b * heads * s * s * hd
    assert stats.attention_flops == layers * (2 * one + 5 * one) // 2
    causal = flops.train_flops(d, layers, s, 32768, b, 4 * d, causal=True)
    assert 1.0 < stats.matmul_flops / causal < 1.03  # the recomputed QKᵀ of the backward is the excess
    assert stats.flops < 1.01 * stats.matmul_flops


def test_h200_hfu_is_at_least_mfu_on_every_measured_row(h200):
    import pandas as pd

    rows = pd.read_csv(H200 / "runs.csv").set_index("size_name")
    peak = 989.5e12
    for name, stats in h200.items():
        r = rows.loc[name]
        hfu = stats.flops / (r["step_time_s"] * peak)
        assert hfu >= r["mfu"] and hfu < 1.1 * r["mfu"]  # before: hfu 0.08 against mfu 0.46 at 1b


def test_pallas_splash_attention_on_a_v5e_counts_the_causal_blocks_it_computes():
    """jax.experimental.pallas.ops.tpu.splash_attention, forward and backward, compiled for a v5e chip: three
    tpu_custom_call kernels with no cost estimate, counted from their shapes and block sizes (128: of 8x8 blocks
    a causal mask leaves the 36 at or below the diagonal)."""
    from jaxscale import targets

    if targets.libtpu_version() is None:
        pytest.skip("libtpu is not installed")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    b, h, t, d = 2, 4, 1024, 128
    kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(h)]),
                                    head_shards=1, q_seq_shards=1)

    def loss(q, k, v):
        return jax.vmap(kernel)(q, k, v).astype(jnp.float32).sum()

    sharding = NamedSharding(Mesh(np.array(targets.slice_devices("v5e:2x2")[:1]), ("d",)), P())
    arg = jax.ShapeDtypeStruct((b, h, t, d), jnp.bfloat16, sharding=sharding)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(arg, arg, arg).compile()
    stats = hlo_cost.program_stats(compiled.as_text())
    square = 2 * b * h * t * t * d  # one matmul over the whole score square
    assert stats.flops_trusted and stats.attention_flops == (2 + 3 + 4) * square * 36 // 64
    assert "splash_mha_fwd" in stats.flops_note and "causal" in stats.flops_note
