"""Planning for TPU slices with the real TPU compiler (libtpu) on this CPU-only machine."""

import subprocess
import sys

import pytest

from helpers import cli_env, jaxscale, sets
from jaxscale import flops, targets
from jaxscale.config import build_profile
from jaxscale.grid import build_grid
from jaxscale.plan import plan_point, predict_step, run_plan

MODEL = {"d_model": 128, "n_layers": 2, "n_heads": 16, "d_ff": 512, "seq_len": 64, "vocab": 256}
PARAMS = flops.param_count(128, 2, 256, 512)


def _profile(devices, strategies, remat="none", model=MODEL, per_chip=2, **run):
    return build_profile({"run": {"dtype": "bfloat16", "remat": remat, **run}, "model": dict(model),
                          "batch": {"per_device_batch": per_chip},
                          "mesh": {"devices": list(devices), "strategies": list(strategies)}})


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """dp, fsdp and tp on 4 chips (v5e:2x2), fsdp on 16 (v5e:4x4), and tp on 4 with full remat."""
    target = targets.parse_target("v5e:4x4")
    rows = {}
    for profile in (_profile([4], ["dp", "fsdp", "tp"]), _profile([16], ["fsdp"]), _profile([4], ["tp"], "full")):
        out = run_plan(profile, target, tmp_path_factory.mktemp("plan")).rows
        for _, r in out.iterrows():
            rows[(r["strategy"], int(r["n_devices"]), r["remat"])] = r
    return rows


def test_slices_are_the_ones_a_user_would_rent():
    v5e = targets.parse_target("v5e:16x16")
    assert [v5e.slice_for(n) for n in (1, 2, 4, 8, 16, 64, 256)] == [
        "v5e:2x2", "v5e:2x2", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:8x8", "v5e:16x16"]
    assert targets.parse_target("v5p:4x4x4").slice_for(8) == "v5p:2x2x2"
    two = v5e.devices_for(2)  # below the smallest slice: chips of one host
    assert len(two) == 2 and len({d.process_index for d in two}) == 1
    hosts = {d.process_index for d in targets.slice_devices("v5e:16x16")}
    assert len(targets.slice_devices("v5e:16x16")) == 256 and len(hosts) == 64
    for bad in ("v5e:3x3", "v9:2x2", "h100"):
        with pytest.raises(targets.TargetError):
            targets.parse_target(bad)


def test_planned_rows_carry_the_tpu_and_its_compiler(planned):
    for (strategy, n, remat), r in planned.items():
        assert r["status"] == "planned", (strategy, n, r["error"])
        assert r["device_kind"] == "TPU v5 lite" and r["backend"] == "tpu"
        assert r["row_source"] == "planned:v5e:4x4"
        assert r["topology"] == ("v5e:2x2" if n == 4 else "v5e:4x4")
        assert r["n_processes"] == (1 if n == 4 else 4)  # v5e:4x4 spans four hosts of four chips
        assert r["libtpu_version"] == targets.libtpu_version()
        assert r["compiled_argument_bytes"] > 0 and r["device_memory_bytes"] == 16 * 2 ** 30
        # nothing was measured, so nothing measured is filled in
        for column in ("step_time_s", "tokens_per_s", "peak_bytes_in_use", "mfu"):
            assert r[column] is None or r[column] != r[column]
        assert r["predicted_step_time_s"] > 0 and 0 < r["predicted_mfu"] < 1


def test_dp_gradients_travel_in_the_dtype_the_compiler_chose(planned):
    """bf16 compute: XLA moves the cast before the reduction, so the gradient all-reduce
    is mostly bf16 (2 bytes a parameter), not the float32 of the stored parameters."""
    r = planned[("dp", 4, "none")]
    assert 2 * PARAMS <= r["all_reduce_bytes"] < 0.6 * 4 * PARAMS
    assert r["all_gather_bytes"] == 0 and r["reduce_scatter_bytes"] == 0


def test_fsdp_gathers_weights_and_tp_does_not(planned):
    matrices = PARAMS - 2 * 128 * 256 - (2 * 2 + 1) * 128  # everything but embedding, head and norms
    fsdp = planned[("fsdp", 4, "none")]
    assert fsdp["all_gather_bytes"] >= 2 * matrices  # every weight gathered (bf16) at least once
    assert fsdp["all_gather_bytes"] <= 3 * 4 * PARAMS
    tp = planned[("tp", 4, "none")]
    assert tp["all_gather_bytes"] < fsdp["all_gather_bytes"] / 4


def test_fsdp_state_per_chip_falls_as_one_over_n_on_the_tpu(planned):
    four, sixteen = planned[("fsdp", 4, "none")], planned[("fsdp", 16, "none")]
    state = lambda r: r["param_bytes"] + r["opt_state_bytes"]  # noqa: E731
    assert state(four) / state(sixteen) == pytest.approx(4, rel=0.03)  # norms stay replicated
    ratio = four["compiled_argument_bytes"] / sixteen["compiled_argument_bytes"]
    assert 2 < ratio <= 4  # the compiler's bytes fall too, less than 4x where small shards pad to tiles


def test_remat_changes_planned_memory(planned):
    none, full = planned[("tp", 4, "none")], planned[("tp", 4, "full")]
    assert full["compiled_temp_bytes"] < none["compiled_temp_bytes"]
    assert full["xla_flops_per_step"] > none["xla_flops_per_step"]  # the forward pass runs again


def test_prediction_is_the_stated_model_and_matches_the_ring_formula(planned):
    p = predict_step(flops_per_chip=2e12, bytes_per_chip=1e9, comm_s=0.5, peak_tflops=100, hbm_gbytes_per_s=500,
                     model_flops=6e12, n_chips=4)
    assert (p.compute_s, p.memory_s) == (pytest.approx(0.02), pytest.approx(0.002))
    assert p.step_time_s == pytest.approx(0.52) and p.mfu == pytest.approx(6e12 / (0.52 * 4 * 100e12))
    # dp: one all-reduce of the gradients; a ring moves 2(n-1)/n of it through each chip over ICI
    r = planned[("dp", 4, "none")]
    ici = flops.device_peak("TPU v5 lite", "bf16").local_link.gbytes_per_s
    assert r["predicted_comm_s"] == pytest.approx(2 * 3 / 4 * r["all_reduce_bytes"] / (ici * 1e9), rel=0.01)
    assert r["predicted_step_time_s"] == pytest.approx(
        max(r["predicted_compute_s"], r["predicted_memory_s"]) + r["predicted_comm_s"])


def test_a_point_that_does_not_fit_is_over_budget_with_the_compilers_words():
    model = {**MODEL, "n_layers": 1, "n_heads": 4, "d_model": 256, "d_ff": 1024, "seq_len": 4096}
    profile = _profile([4], ["dp"], model=model, per_chip=64)
    point = build_grid(profile, 16)[0][0]
    row = plan_point(point, profile, targets.parse_target("v5e:2x2"))
    assert row["status"] == "over_budget"
    assert "RESOURCE_EXHAUSTED" in row["error"] and "HBM" in row["error"]


def test_plan_cli_refuses_bad_input_in_one_line(tmp_path):
    out = jaxscale("plan", "--topology", "v5e:3x3", "--out", tmp_path, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "v5e:3x3" in out.stderr
    out = jaxscale("plan", *sets("mesh.devices=[8]"), "--topology", "v5e:2x2", "--out", tmp_path, cwd=tmp_path)
    assert out.returncode == 2 and "exceeds the 4 chips" in out.stderr
    assert not any(tmp_path.iterdir())


def test_plan_without_libtpu_says_what_to_install(monkeypatch, capsys):
    from jaxscale import cli

    monkeypatch.setattr(targets, "libtpu_version", lambda: None)
    assert cli.main(["plan", "--topology", "v5e:2x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and "tpu" in err[0]


def test_libtpu_stays_quiet_where_no_tpu_is_attached(tmp_path):
    env = {k: v for k, v in cli_env().items() if k not in ("JAX_PLATFORMS",) and not k.startswith("TPU_")}
    env.pop("ALLOW_MULTIPLE_LIBTPU_LOAD", None)
    code = "from jaxscale.cli import _prepare_runtime; _prepare_runtime(False); import jax; print(jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "cpu"
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr


def test_gpu_clusters_rent_whole_hosts():
    h100 = targets.parse_target("h100:4x8")
    assert (h100.platform, h100.n_chips) == ("gpu", 32)
    assert [h100.slice_for(n) for n in (1, 4, 8, 16, 32)] == ["h100:1x1", "h100:1x4", "h100:1x8", "h100:2x8",
                                                             "h100:4x8"]
    with pytest.raises(targets.TargetError):
        h100.slice_for(12)  # a host and a half
    with pytest.raises(targets.TargetError):
        targets.parse_target("h100:2x16")


@pytest.mark.skipif(targets.cuda_plugin_version() is None, reason="XLA's GPU compiler (jax[cuda12-local]) is not installed")
def test_gpu_plan_compiles_for_h100s_it_does_not_have(tmp_path):
    """Two hosts of eight H100s: fsdp's data axis spans both, so it crosses InfiniBand."""
    profile = _profile([16], ["fsdp"])
    row = plan_point(build_grid(profile, 16)[0][0], profile, targets.parse_target("h100:2x8"))
    assert row["status"] == "planned", row["error"]
    assert row["device_kind"] == "NVIDIA H100 80GB HBM3" and row["backend"] == "gpu"
    assert row["n_processes"] == 2 and row["topology"] == "h100:2x8"
    assert "InfiniBand" in row["comm_link_data"] and "crosses hosts" in row["comm_link_data"]
    # no cost analysis without a GPU: the HLO's matmuls give the FLOPs, which the analytic count checks
    analytic = flops.train_flops(128, 2, 64, 256, 32, 512, causal=False)
    assert row["xla_flops_per_step"] == pytest.approx(analytic, rel=0.02)
    assert row["predicted_memory_s"] is None and "no cost analysis" in row["flops_note"]
    assert row["compiled_argument_bytes"] > 0 and row["peak_tflops_per_device"] == pytest.approx(989.5)
