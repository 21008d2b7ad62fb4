"""The grid: product order, strategies' meshes, and points that cannot be formed."""

import pytest

from jaxscale.config import ProfileError, build_profile
from jaxscale.grid import build_grid


def _profile(**mesh):
    return build_profile({"model": {"d_model": 64, "n_heads": 4, "vocab": 96},
                          "batch": {"global_batch": 8},
                          "mesh": {"devices": [1, 2, 4, 8], "strategies": ["dp", "fsdp", "tp", "fsdp_tp"],
                                   "model_axis": 2, **mesh}})


def test_mesh_shapes_follow_strategy_names():
    points, _ = build_grid(_profile(), 8)
    shapes = {(p.strategy, p.n_devices): (p.data_axis, p.model_axis) for p in points}
    assert shapes[("dp", 8)] == (8, 1)
    assert shapes[("fsdp", 4)] == (4, 1)
    assert shapes[("tp", 4)] == (1, 4)
    assert shapes[("fsdp_tp", 8)] == (4, 2)


def test_infeasible_points_are_dropped_with_reasons():
    points, dropped = build_grid(_profile(), 8)
    kept = {(p.strategy, p.n_devices) for p in points}
    assert ("tp", 8) not in kept  # 4 heads cannot be split 8 ways
    assert ("fsdp_tp", 1) not in kept  # 1 device is not a multiple of model_axis 2
    assert len(points) + sum(dropped.values()) == 16
    assert any("n_heads=4" in reason for reason in dropped)


def test_too_many_devices_is_an_error_naming_the_count():
    with pytest.raises(ProfileError, match="exceed the 4 devices"):
        build_grid(_profile(), 4)


def test_weak_scaling_grows_the_global_batch():
    p = build_profile({"batch": {"per_device_batch": 3}, "mesh": {"devices": [1, 2, 4], "strategies": ["dp"]}})
    points, _ = build_grid(p, 8)
    assert [pt.global_batch for pt in points] == [3, 6, 12]


def test_multi_process_drops_counts_not_divisible_by_processes():
    p = build_profile({"batch": {"global_batch": 8}, "mesh": {"devices": [1, 2, 4], "strategies": ["dp"]}})
    points, dropped = build_grid(p, 8, n_processes=2)
    assert [pt.n_devices for pt in points] == [2, 4]
    assert any("not a multiple of the 2 processes" in r for r in dropped)
