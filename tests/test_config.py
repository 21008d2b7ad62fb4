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


# ------------------------------------------------------------------ bad profiles: one line naming file, key, value

GOOD = """
[run]
steps = 2
[model]
d_model = 32
n_layers = 1
n_heads = 4
seq_len = 8
vocab = 64
[batch]
global_batch = 8
[mesh]
devices = [1, 2]
strategies = ["dp"]
"""


def _variant(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BAD_PROFILES = {
    "toml_syntax": (_variant("steps = 2", "steps = = 2"), ["TOML syntax error", "line 3"]),
    "unknown_key": (_variant("d_model = 32", "d_modle = 32"), ["[model] d_modle", "did you mean 'd_model'"]),
    "unknown_table": (GOOD + "\n[optimiser]\nlr = 1\n", ["unknown table [optimiser]"]),
    "wrong_type": (_variant("n_layers = 1", 'n_layers = "two"'), ["n_layers", "'two'", "integer"]),
    "non_positive": (_variant("vocab = 64", "vocab = 0"), ["vocab = 0", "integer >= 2"]),
    "non_integer": (_variant("d_model = 32", "d_model = 32.5"), ["d_model = 32.5", "integer"]),
    "heads_not_dividing": (_variant("n_heads = 4", "n_heads = 5"), ["n_heads = 5", "must divide d_model = 32"]),
    "model_axis": (_variant('strategies = ["dp"]', 'strategies = ["fsdp_tp"]\nmodel_axis = 3'),
                   ["model_axis = 3", "must divide n_heads = 4"]),
    "too_many_devices": (_variant("devices = [1, 2]", "devices = [1, 16]").replace("global_batch = 8",
                                                                                   "global_batch = 16"),
                         ["[16] exceed the 8 devices"]),
    "batch_not_divisible": (_variant("global_batch = 8", "global_batch = 3"),
                            ["global_batch = 3", "not divisible by the data-axis size 2"]),
    "unknown_strategy": (_variant('strategies = ["dp"]', 'strategies = ["fdsp"]'),
                         ["'fdsp'", "did you mean 'fsdp'"]),
    "unknown_dtype": (_variant("steps = 2", 'steps = 2\ndtype = "float16"'), ["[run] dtype", "bfloat16"]),
    "empty_grid": (_variant('strategies = ["dp"]', 'strategies = ["tp"]').replace("devices = [1, 2]", "devices = [8]"),
                   ["grid is empty", "n_heads=4"]),
    "both_batches": (_variant("global_batch = 8", "global_batch = 8\nper_device_batch = 2"), ["exactly one of"]),
    "infinite_ratio": (_variant("vocab = 64", "vocab = 64\nd_ff_ratio = inf"), ["[model] d_ff_ratio = inf", "finite"]),
    "nan_fraction": (_variant("steps = 2", "steps = 2\nmax_memory_fraction = nan"),
                     ["max_memory_fraction = nan", "finite"]),
    "name_escapes": (_variant("steps = 2", 'steps = 2\nname = "../../escape"'),
                     ["[run] name = '../../escape'", "path separators"]),
    "name_newline": (_variant("steps = 2", 'steps = 2\nname = "a\\nb"'), ["[run] name = 'a\\nb'", "control"]),
    "name_hidden": (_variant("steps = 2", 'steps = 2\nname = ".hidden"'), ["may not start with '.'"]),
    "same_size_name": (_variant("vocab = 64", 'vocab = 64\n[[model.sizes]]\nname = "s"\nd_model = 32\n'
                                              '[[model.sizes]]\nname = "s"\nd_model = 64'),
                       ["[[model.sizes]] #2 name = 's'", "also the name of [[model.sizes]] #1"]),
    "size_name_path": (_variant("vocab = 64", 'vocab = 64\n[[model.sizes]]\nname = "a/b"\nd_model = 32'),
                       ["[[model.sizes]] #1 name = 'a/b'", "path separators"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_bad_profile_is_refused_with_one_line(case, tmp_path):
    from jaxscale.grid import build_grid

    text, fragments = BAD_PROFILES[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as caught:
        build_grid(load_profile(str(path)), 8)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in ([str(path)] if case != "toml_syntax" else []) + fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("override, fragments", [
    ("model.d_model=abc", ["d_model = 'abc'", "integer"]),
    ("modle.d_model=64", ["unknown table [modle]", "did you mean 'model'"]),
    ("d_model", ["expected section.key=value"]),
    ('mesh.strategies=["dp","zero3"]', ["'zero3'", "dp, fsdp, tp, fsdp_tp"]),
    ("model.d_model=[64,", ["'[64,' is not a valid TOML value"]),
    ("model.d_ff_ratio=inf", ["[model] d_ff_ratio = inf", "finite"]),
    ("model.d_ff_ratio=nan", ["[model] d_ff_ratio = nan", "finite"]),
    ("run.name='x/y'", ["[run] name = 'x/y'", "path separators"]),
])
def test_bad_override_is_refused_with_one_line(override, fragments):
    with pytest.raises(ProfileError) as caught:
        load_profile("smoke", [override])
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_an_unknown_profile_name_suggests_and_lists():
    with pytest.raises(ProfileError, match="did you mean 'smoke'.*shipped profiles: .*smoke"):
        load_profile("smok")
    with pytest.raises(ProfileError, match="does-not-exist.toml: no such profile file"):
        load_profile("does-not-exist.toml")


def test_profile_difference_names_the_keys():
    from jaxscale.config import profile_difference

    a = load_profile("smoke", ["model.d_model=[64]"])
    assert profile_difference(a, load_profile("smoke", ["model.d_model=64"])) == ""  # the same sweep, spelled apart
    text = profile_difference(a, load_profile("smoke", ["model.d_model=[32]"]))
    assert "[model] d_model = [64] there, [32] here" in text


def test_every_shipped_profile_has_a_one_line_summary():
    from jaxscale.config import profile_summary

    for name, path in shipped_profiles().items():
        command, text = profile_summary(path)
        assert command == ("plan" if load_profile(name).mesh.topology else "run")
        assert text.endswith(".") and "\n" not in text and len(text) > 20, (name, text)
    assert profile_summary(shipped_profiles()["gpu-8x"])[1] == (
        "One host with 8 GPUs (e.g. an 8x H100 VM): every strategy over 1..8 GPUs, strong scaling at a global "
        "batch of 16 sequences, no remat.")
