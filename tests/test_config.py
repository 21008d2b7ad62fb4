"""Profiles: every shipped one loads; overrides and sizes expand as documented."""

import pytest

from jaxscale.config import ProfileError, build_profile, load_profile, shipped_profiles


def test_the_required_profiles_ship():
    assert {"smoke", "gpu-1x", "gpu-8x", "tpu-v5e-8"} <= set(shipped_profiles())


@pytest.mark.parametrize("name", sorted(shipped_profiles()))
def test_every_shipped_profile_loads(name):
    profile = load_profile(name)
    assert profile.run.name == name
    assert profile.models and profile.mesh.devices and profile.mesh.strategies


def test_gpu_1x_largest_model_is_about_1b_bf16_seq_2048():
    from jaxscale.flops import param_count

    p = load_profile("gpu-1x")
    largest = max(param_count(m.d_model, m.n_layers, m.vocab, m.d_ff) for m in p.models)
    assert 0.9e9 < largest < 1.2e9
    assert p.run.dtype == "bfloat16" and all(m.seq_len == 2048 for m in p.models)


def test_lists_expand_to_their_product():
    p = build_profile({"model": {"d_model": [64, 128], "n_layers": [1, 2, 3], "n_heads": 4},
                       "batch": {"global_batch": 8}})
    assert len(p.models) == 6
    assert {(m.d_model, m.n_layers) for m in p.models} == {(d, l) for d in (64, 128) for l in (1, 2, 3)}
    assert all(m.d_ff == 4 * m.d_model for m in p.models)


def test_named_sizes_take_defaults_from_model_table():
    p = build_profile({"model": {"seq_len": 32, "vocab": 100, "sizes": [
        {"name": "a", "d_model": 64, "n_layers": 1, "n_heads": 4},
        {"name": "b", "d_model": 96, "n_layers": 2, "n_heads": 3, "d_ff": 100}]},
        "batch": {"global_batch": 2}})
    a, b = p.models
    assert (a.size_name, a.seq_len, a.vocab, a.d_ff) == ("a", 32, 100, 256)
    assert (b.size_name, b.d_ff, b.n_heads) == ("b", 100, 3)


def test_override_goes_through_validation():
    p = load_profile("smoke", ["model.d_model=[512,1024]", "run.dtype=bfloat16", "mesh.strategies=fsdp"])
    assert sorted({m.d_model for m in p.models}) == [512, 1024]
    assert p.run.dtype == "bfloat16" and p.mesh.strategies == ("fsdp",)
    with pytest.raises(ProfileError, match="n_heads"):
        load_profile("smoke", ["model.d_model=100"])


def test_batch_modes():
    strong = build_profile({"batch": {"global_batch": 8}})
    weak = build_profile({"batch": {"per_device_batch": 2}})
    assert strong.batch.mode == "strong" and strong.batch.global_for(4) == 8
    assert weak.batch.mode == "weak" and weak.batch.global_for(4) == 8 and weak.batch.global_for(2) == 4


def test_resolved_profile_round_trips_through_toml(tmp_path):
    p = load_profile("gpu-8x", ["mesh.devices=[1,2]"])
    path = tmp_path / "resolved.toml"
    path.write_text(p.to_toml())
    again = load_profile(str(path))
    assert again.models == p.models and again.mesh == p.mesh and again.run == p.run and again.batch == p.batch


def test_remat_takes_policies_a_list_or_the_old_booleans():
    base = {"batch": {"global_batch": 8}}
    assert build_profile({**base, "run": {"remat": True}}).run.remat == ("full",)
    assert build_profile({**base, "run": {"remat": False}}).run.remat == ("none",)
    assert build_profile({**base, "run": {"remat": ["none", "save_dots"]}}).run.remat == ("none", "save_dots")
    with pytest.raises(ProfileError, match=r"\[run\] remat = 'dots'.*save_dots"):
        build_profile({**base, "run": {"remat": "dots"}})


def test_xla_flag_sets_are_validated_and_normalized():
    base = {"batch": {"global_batch": 8}}
    run = build_profile({**base, "run": {"xla_flags": ["", "--xla_a=1   --xla_b=2"]}}).run
    assert run.xla_flags == ("", "--xla_a=1 --xla_b=2")
    assert build_profile({**base, "run": {"xla_flags": "--xla_a=1"}}).run.xla_flags == ("--xla_a=1",)
    with pytest.raises(ProfileError, match="not an XLA flag"):
        build_profile({**base, "run": {"xla_flags": ["--jax_enable_x64"]}})
    with pytest.raises(ProfileError, match="host device count"):
        build_profile({**base, "run": {"xla_flags": ["--xla_force_host_platform_device_count=4"]}})


def test_batch_lists_and_topology():
    p = build_profile({"batch": {"per_device_batch": [1, 2, 4]}, "mesh": {"topology": "v5e:4x4"}})
    assert p.batch.globals_for(4) == (4, 8, 16) and p.batch.mode == "weak"
    assert p.mesh.topology == "v5e:4x4"
    with pytest.raises(ProfileError, match=r"\[mesh\] topology"):
        build_profile({"batch": {"global_batch": 8}, "mesh": {"topology": 16}})
    with pytest.raises(ProfileError, match=r"\[batch\] per_device_batch"):
        build_profile({"batch": {"per_device_batch": []}})
