"""The strategies' shardings: which parameter axes each one splits, and that the arrays on the devices are split so."""

from jax.sharding import PartitionSpec as P

from helpers import step_grid as _grid
from jaxscale.sharding import logical_to_spec
from jaxscale.step import abstract_model, compile_point


def _specs(strategy):
    profile, points = _grid(devices=[8], strategies=[strategy])
    _, _, logical = abstract_model(points[0], profile.run)
    layer = {k: v for k, v in logical["blocks"][0].items() if k in ("wqkv", "wo", "w_in", "w_out")}
    layer["wq"] = layer.pop("wqkv")[1:]  # q, k and v are stacked on an axis no strategy shards
    return {
        "wq": logical_to_spec(layer["wq"], strategy),
        "wo": logical_to_spec(layer["wo"], strategy),
        "w_in": logical_to_spec(layer["w_in"], strategy),
        "w_out": logical_to_spec(layer["w_out"], strategy),
        "embed": logical_to_spec(logical["embed"], strategy),
        "head": logical_to_spec(logical["head"], strategy),
        "norm": logical_to_spec(logical["final_norm"]["scale"], strategy),
    }


def test_strategy_param_specs_say_what_the_name_says():
    dp = _specs("dp")
    assert all(spec == P(*([None] * len(spec))) for spec in dp.values())
    fsdp = _specs("fsdp")  # every matrix sharded over data along d_model
    assert fsdp["wq"] == P("data", None, None) and fsdp["wo"] == P(None, None, "data")
    assert fsdp["w_in"] == P("data", None) and fsdp["embed"] == P(None, "data") and fsdp["norm"] == P(None)
    tp = _specs("tp")  # Megatron: heads, MLP hidden and vocab over model
    assert tp["wq"] == P(None, "model", None) and tp["wo"] == P("model", None, None)
    assert tp["w_in"] == P(None, "model") and tp["w_out"] == P("model", None)
    assert tp["embed"] == P("model", None) and tp["head"] == P(None, "model")
    both = _specs("fsdp_tp")
    assert both["wq"] == P("data", "model", None) and both["w_in"] == P("data", "model")


def test_shardings_are_real_on_device():
    profile, points = _grid(devices=[4], strategies=["fsdp", "tp"])
    for point in points:
        step = compile_point(point, profile.run)
        params, _ = step.init_state()
        wqkv = params["blocks"][0]["wqkv"]  # q, k, v stacked on an axis no strategy shards
        shard = wqkv.addressable_shards[0].data.shape
        if point.strategy == "fsdp":
            assert shard == (3, 64 // 4, 8, 8)
        else:
            assert shard == (3, 64, 8 // 4, 8)
