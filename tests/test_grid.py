"""The grid: product order, strategies' meshes, points that cannot be formed, and point selectors."""

import pytest

from jaxscale.config import ProfileError, build_profile
from jaxscale.grid import build_grid, matches, parse_selector


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


def test_remat_batch_and_flag_sets_are_grid_axes_in_the_point_key():
    profile = build_profile({"run": {"remat": ["none", "full"], "xla_flags": ["", "--xla_x=1"]},
                             "model": {"d_model": 64, "n_heads": 4, "vocab": 96},
                             "batch": {"per_device_batch": [1, 3]},
                             "mesh": {"devices": [2], "strategies": ["dp"]}})
    points, _ = build_grid(profile, 8)
    assert len(points) == 2 * 2 * 2
    assert {(p.global_batch, p.remat, p.xla_flags) for p in points} == {
        (b, r, f) for b in (2, 6) for r in ("none", "full") for f in ("", "--xla_x=1")}
    assert len({p.key for p in points}) == len(points)  # resume tells them apart


def test_every_global_batch_of_a_list_must_split_over_the_data_axis():
    with pytest.raises(ProfileError, match=r"global_batch = 12: not divisible by the data-axis size 8"):
        build_profile({"model": {"d_model": 64, "n_heads": 4, "vocab": 96}, "batch": {"global_batch": [8, 12]},
                       "mesh": {"devices": [8], "strategies": ["dp", "tp"]}})


def test_a_dropped_combination_counts_every_point_it_stands_for():
    """fsdp_tp at 1 device, with 2 batches, 2 remat policies and 2 flag sets, is 8 points, not 1."""
    from jaxscale.grid import grid_size

    profile = build_profile({"run": {"remat": ["none", "full"], "xla_flags": ["", "--xla_x=1"]},
                             "model": {"d_model": 64, "n_heads": 4, "vocab": 96},
                             "batch": {"global_batch": [2, 4]},
                             "mesh": {"devices": [1, 2], "strategies": ["dp", "fsdp_tp"]}})
    points, dropped = build_grid(profile, 8)
    assert grid_size(profile) == 2 * 2 * 2 * 2 * 2 == 32  # counts x strategies x batches x remat x flags
    assert len(points) == 3 * 8  # dp at 1 and 2, fsdp_tp at 2
    assert sum(dropped.values()) == 8 and len(points) + sum(dropped.values()) == grid_size(profile)


def test_a_selector_names_grid_columns_and_matches_their_values():
    assert parse_selector("strategy=fsdp, n_devices=8") == {"strategy": "fsdp", "n_devices": "8"}
    with pytest.raises(ProfileError, match="unknown column 'step_time_s'"):
        parse_selector("step_time_s=1")
    with pytest.raises(ProfileError, match="column=value pairs"):
        parse_selector("fsdp")
    points, _ = build_grid(_profile(devices=[1, 2]), 8)
    chosen = [p for p in points if matches(p, parse_selector("n_devices=2,strategy=dp"))]
    assert [(p.strategy, p.n_devices) for p in chosen] == [("dp", 2)]
    assert not any(matches(p, None) for p in points)  # no selector traces nothing
