"""The compiled step on 8 CPU devices: parameters, losses under every strategy, FLOPs and state bytes."""

import jax
import numpy as np
import pytest

from helpers import step_grid as _grid
from jaxscale import flops
from jaxscale.step import abstract_model, compile_point

@pytest.mark.parametrize("d, layers, heads, d_ff, vocab", [(64, 1, 4, 256, 100), (96, 3, 6, 200, 513),
                                                           (128, 2, 8, 512, 1024)])
def test_model_param_count_equals_analytic(d, layers, heads, d_ff, vocab):
    profile, points = _grid({"d_model": d, "n_layers": layers, "n_heads": heads, "d_ff": d_ff, "seq_len": 8,
                             "vocab": vocab}, devices=[1], strategies=["dp"])
    _, abstract, _ = abstract_model(points[0], profile.run)
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert counted == flops.param_count(d, layers, vocab, d_ff)


def _losses(step, n=3):
    params, opt = step.init_state()
    out = []
    for i in range(n):
        params, opt, loss = step.compiled(params, opt, step.make_batch(i))
        out.append(float(loss))
    return out


def test_every_strategy_gives_the_single_device_loss():
    """dp, fsdp and tp on 1 and 8 devices, fsdp_tp on 8 (a 4 x 2 mesh: both axes sharded at once)."""
    profile, points = _grid(devices=(1, 8))
    reference = None
    seen = set()
    for point in points:
        losses = _losses(compile_point(point, profile.run))
        if reference is None:
            assert point.n_devices == 1
            reference = losses
            assert losses[2] < losses[0]  # the optimizer is doing something
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=point.describe())
        seen.add(point.strategy)
    assert seen == {"dp", "fsdp", "tp", "fsdp_tp"}


def test_xla_flops_agree_with_the_analytic_count():
    """XLA counts every multiply-add of the matmuls plus the elementwise work (norms,
    GELU, softmax, loss, AdamW) that model FLOPs leave out. Measured here: +1.5% at
    d=256 and +3% at d=128 on the CPU; the excess shrinks as d grows, since matmul
    FLOPs grow with d² and the rest with d. XLA computes the full s×s attention square
    (the causal mask is applied after), so the comparison uses causal=False."""
    ratios = {}
    for d in (128, 256):
        model = {"d_model": d, "n_layers": 2, "n_heads": 4, "d_ff": 4 * d, "seq_len": 64, "vocab": 512}
        profile, points = _grid(model, devices=[1, 4], strategies=["dp", "fsdp"], batch=8)
        for point in points:
            if (point.strategy, point.n_devices) not in (("dp", 1), ("fsdp", 4)):
                continue
            step = compile_point(point, profile.run)
            xla = step.cost["flops"] * point.n_devices
            analytic = flops.train_flops(d, 2, 64, 512, 8, 4 * d, causal=False)
            ratio = xla / analytic
            assert 1.0 < ratio < 1.06, (point.describe(), ratio)
            ratios[(d, point.strategy, point.n_devices)] = ratio
    assert ratios[(256, "dp", 1)] < ratios[(128, "dp", 1)]


def test_fsdp_argument_bytes_shrink_while_dp_stay_flat():
    model = {"d_model": 128, "n_layers": 2, "n_heads": 8, "d_ff": 512, "seq_len": 16, "vocab": 256}
    profile, points = _grid(model, devices=[1, 8], strategies=["dp", "fsdp"])
    args = {(p.strategy, p.n_devices): compile_point(p, profile.run).memory.argument_size_in_bytes for p in points}
    params = flops.param_count(128, 2, 256, 512)
    state_bytes = 3 * 4 * params  # float32 params, Adam mu and nu
    for n in (1, 8):
        assert args[("dp", n)] == pytest.approx(args[("dp", 1)], rel=0.01)
        # sharded state plus a replicated remainder (norm scales, the step count, tokens)
        assert args[("fsdp", n)] == pytest.approx(state_bytes / n, rel=0.05)
    assert args[("dp", 1)] == pytest.approx(state_bytes, rel=0.02)
