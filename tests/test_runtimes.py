"""Runtimes: one interface whether a point runs here, in a worker, or only compiles for a target."""

import pytest

from jaxscale import roofline, targets
from jaxscale.config import build_profile
from jaxscale.grid import build_grid
from jaxscale.runtimes import CompileOnly, InProcess
from jaxscale.workers import WorkerRuntime

INTERFACE = ("device_count", "process_count", "lead", "describe", "columns", "peak", "memory", "allocator",
             "isolation", "broadcast", "measure", "should_stop", "close")


def test_compile_only_plans_a_point_with_the_chips_hbm_as_its_budget():
    profile = build_profile({"run": {"dtype": "bfloat16", "max_memory_fraction": 0.5},
                             "model": {"d_model": 64, "n_layers": 1, "n_heads": 8, "d_ff": 128, "seq_len": 32,
                                       "vocab": 128},
                             "batch": {"per_device_batch": 2}, "mesh": {"devices": [4], "strategies": ["dp"]}})
    runtime = CompileOnly(profile, targets.parse_target("v5e:2x2"))
    assert all(hasattr(runtime, name) for name in INTERFACE)
    hbm = 16 * 2 ** 30  # v5e: 16 GiB of HBM per chip (datasheet)
    assert (runtime.device_count, runtime.process_count, runtime.lead) == (4, 1, True)
    assert runtime.memory.device_memory_bytes == hbm and runtime.memory.budget_bytes == hbm // 2
    (point,), _ = build_grid(profile, runtime.device_count, runtime.process_count)
    row = runtime.measure(point, 0, None)
    assert (row["status"], row["row_source"], row["topology"]) == ("planned", "planned:v5e:2x2", "v5e:2x2")
    assert row["backend"] == "tpu" and row["device_memory_bytes"] == hbm
    assert runtime.figures[0] is not None and row["predicted_step_time_s"] > 0
    # a later efficiency predicts the next point with it
    runtime.efficiency = roofline.Efficiency(0.5, 0.5, "planted")
    slower = runtime.measure(point, 1, None)
    assert slower["roofline_efficiency"] == "planted"
    assert slower["predicted_roofline_s"] == pytest.approx(2 * row["predicted_roofline_s"], rel=1e-6)


@pytest.mark.parametrize("kind", [InProcess, WorkerRuntime, CompileOnly])
def test_every_runtime_offers_the_sweep_loop_one_interface(kind):
    methods = {name for name in INTERFACE if callable(getattr(kind, name, None))}
    assert methods == {"broadcast", "measure", "should_stop", "close"}
    assert kind.isolation in ("none", "process", "compile-only")
