"""Rows and step profiles: profile_step on a user function, fused-kernel FLOPs, MFU left empty with its reason."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.measure import profile_step
from jaxscale.timing import Timing

def test_profile_step_on_a_user_function_across_shardings():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    a = jax.device_put(jnp.ones((512, 256), jnp.float32), NamedSharding(mesh, P("x", None)))
    b = jax.device_put(jnp.ones((256, 256), jnp.float32), NamedSharding(mesh, P()))
    flops = 2 * 512 * 256 * 256
    prof = profile_step(lambda x, y: x @ y, a, b, n_steps=5, warmup=1, model_flops=flops, peak_tflops=1.0)
    assert prof.n_devices == 4
    assert prof.xla_flops_per_step == pytest.approx(flops, rel=0.01)  # summed over the 4 devices
    assert prof.mfu == pytest.approx(flops / (prof.step_time_s * 4 * 1e12))
    assert prof.all_reduce_bytes == 0  # rows are split, nothing to reduce
    row = prof.to_row()
    assert row["step_time_s"] == prof.step_time_s and len(row["step_time_samples_s"].split(";")) == 5
    # contracting over the sharded axis needs an all-reduce of the full (256, 256) float32 result
    at = jax.device_put(jnp.ones((256, 512), jnp.float32), NamedSharding(mesh, P(None, "x")))
    reduced = profile_step(lambda x, y: x @ y, at, a, n_steps=3, warmup=1)
    assert reduced.all_reduce_bytes == 256 * 256 * 4 and reduced.all_reduce_count == 1


DATA = __import__("pathlib").Path(__file__).parent / "data"


def _describe(hlo_text: str, cost_flops: float, peak):
    from jaxscale.measure import describe_step

    return describe_step(timing=Timing((0.5, 0.5, 0.5)), compile_s=1.0, cost={"flops": cost_flops}, memory=None,
                         hlo_text=hlo_text, devices=jax.devices()[:1], peak=peak, model_flops=1e12)


def test_fused_attention_custom_calls_add_their_flops_to_the_xla_count():
    """The HLO fixture is hand-written in the form XLA's GPU compiler gives cuDNN flash attention: a causal
    forward call and its backward call, each in a 2-trip layer loop. XLA's cost analysis does not count them;
    the row counts them from their shapes: forward 2 matmuls, backward 4 + the recomputed QKᵀ, causal kernels
    doing half the square. The row's FLOPs come from the HLO, not from the cost analysis it is handed."""
    from jaxscale.devices import spec_peak

    hlo = (DATA / "cudnn_fmha_causal.hlo").read_text()
    one_matmul = 2 * 2 * 4 * 128 * 128 * 64
    hidden = 2 * (2 * one_matmul // 2) + 2 * (5 * one_matmul // 2)
    peak = spec_peak("NVIDIA H100 80GB HBM3", "gpu", "bfloat16")
    prof = _describe(hlo, 3e9, peak)
    assert prof.custom_call_flops_per_step == hidden
    assert prof.xla_flops_per_step == hidden  # the loop counters' adds are scalar bookkeeping
    assert prof.hfu == pytest.approx(hidden / (0.5 * 1 * 989.5e12))
    assert "cuDNN attention" in prof.flops_note
    # the predicted terms of the same program: 4 attention kernels, memory-bound at these small shapes
    assert prof.kernels_per_step == 4 and prof.bound == "memory"
    assert prof.predicted_compute_s == pytest.approx(hidden / 989.5e12)
    assert prof.predicted_step_time_s >= prof.predicted_compute_s
    plain = _describe("ENTRY %main {\n  ROOT %p = f32[4]{0} parameter(0)\n}\n", 3e9, peak)
    assert plain.custom_call_flops_per_step == 0 and plain.xla_flops_per_step == 0 and plain.flops_note is None


def test_a_math_mode_without_a_datasheet_peak_leaves_mfu_empty_with_the_reason():
    from jaxscale.devices import spec_peak

    tpu = spec_peak("TPU v5 lite", "tpu", "float32", precision="highest")
    prof = _describe("ENTRY %main {\n  ROOT %p = f32[4]{0} parameter(0)\n}\n", 3e9, tpu)
    assert prof.mfu is None and prof.hfu is None and prof.peak_tflops_per_device is None
    assert "6 bf16 MXU passes" in prof.flops_note and "MFU" in prof.flops_note
    gpu = _describe("ENTRY %main {\n  ROOT %p = f32[4]{0} parameter(0)\n}\n", 3e9,
                    spec_peak("NVIDIA A100-SXM4-80GB", "gpu", "float32"))
    assert gpu.peak_dtype == "tf32" and gpu.peak_tflops_per_device == 156.0
    assert gpu.mfu == pytest.approx(1e12 / (0.5 * 156e12)) and "TF32" in gpu.peak_precision


def test_opaque_kernels_are_flagged_not_guessed():
    """A Pallas kernel without a cost estimate cannot be counted: the row leaves its FLOPs empty and says why."""
    from jaxscale.devices import spec_peak
    from jaxscale.prediction import hidden_flops

    pallas = ('ENTRY %main {\n  %a = f32[128,128]{1,0} parameter(0)\n  ROOT %k = f32[128,128]{1,0} custom-call(%a), '
              'custom_call_target="tpu_custom_call", backend_config="{}"\n}\n')
    hidden = hidden_flops(pallas)
    assert hidden.flops_per_device == 0 and "tpu_custom_call" in hidden.note
    prof = _describe(pallas, 3e9, spec_peak("TPU v5 lite", "tpu", "bfloat16"))
    assert prof.xla_flops_per_step is None and prof.hfu is None and "tpu_custom_call" in prof.flops_note
    assert prof.mfu is not None  # model FLOPs do not depend on the count
    tpu_internal = pallas.replace("tpu_custom_call", "AllocateBuffer")  # no arithmetic: no note
    assert hidden_flops(tpu_internal).note == ""


def test_the_flops_ratio_compares_with_the_program_that_was_compiled():
    """Against hand counts: without fused kernels the HLO is held to the full-square count (with recompute
    under remat full); fused attention kernels stand in for attention's matmuls, both directions."""
    from jaxscale.flops import train_flops
    from jaxscale.grid import Point
    from jaxscale.config import ModelSpec
    from jaxscale.measure import flops_ratio

    model = ModelSpec(d_model=256, n_layers=4, n_heads=4, d_ff=1024, seq_len=512, vocab=1024, name="t")
    point = Point(model=model, strategy="dp", n_devices=1, data_axis=1, model_axis=1, global_batch=8,
                  batch_mode="strong")
    full = train_flops(256, 4, 512, 1024, 8, 1024, recompute=False, causal=False)
    causal = train_flops(256, 4, 512, 1024, 8, 1024, recompute=False, causal=True)
    assert flops_ratio(point, 1.1 * full, None) == (pytest.approx(1.1), "")
    attention_full = 2 * (full - causal)  # the causal count halves attention's square
    kernels = attention_full / 2  # fused kernels that skip the masked half
    ratio, note = flops_ratio(point, full - attention_full + kernels, kernels)
    assert ratio == pytest.approx(1.0) and note == ""
    ratio, note = flops_ratio(point, 2 * full, None)
    assert ratio == pytest.approx(2.0) and "2.00x" in note and "full attention" in note
    remat = dataclasses.replace(point, remat="full")
    recomputed = train_flops(256, 4, 512, 1024, 8, 1024, recompute=True, causal=False)
    assert flops_ratio(remat, recomputed, None) == (pytest.approx(1.0), "")
