"""A speed guard without an accelerator: jaxscale's step against a plain JAX step, by their programs.

Both steps are compiled for a target the machine does not have (a v5e:2x2 TPU
slice with libtpu; one H100 with XLA's GPU compiler, in the GPU-planning test
command) and their optimized HLO is read by hlo_cost.program_stats: kernels launched
and HBM bytes moved per step. jaxscale's may exceed the plain step's by at most
5% on either. The plain step (plain_step.py) is written without jaxscale's
code: same architecture, unrolled layers, the kernel the target's attention
would use (splash on the TPU, cuDNN on the GPU). The scanned layer form is
compiled too, to show the guard can fail: it launches more kernels (and on the
GPU moves more bytes). Nothing is timed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxscale import hlo_cost, targets
from jaxscale.config import build_profile
from jaxscale.grid import build_grid
from jaxscale.step import build_step, compile_step
from plain_step import plain_train_step

TOLERANCE = 1.05


def _ours(model: dict, batch: int, devices, scan: bool):
    profile = build_profile({"run": {"dtype": "bfloat16", "scan_layers": scan}, "model": dict(model),
                             "batch": {"global_batch": batch},
                             "mesh": {"devices": [len(devices)], "strategies": ["dp"]}})
    point = build_grid(profile, len(devices), 1)[0][0]
    program, _, _, _, _, text = compile_step(build_step(point, profile.run, devices), profile.run)
    return program.attention.impl, hlo_cost.program_stats(text, len(devices))


def _plain(model: dict, batch: int, devices, attention: str):
    mesh = Mesh(np.array(devices), ("data",))
    step = plain_train_step(model["d_model"], model["n_layers"], model["n_heads"], model["d_ff"], model["vocab"],
                            jnp.bfloat16, attention=attention, mesh=mesh)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params, opt = jax.eval_shape(step.init, jax.random.key(0))
    placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), (params, opt))
    tokens = jax.ShapeDtypeStruct((batch, model["seq_len"] + 1), jnp.int32, sharding=split)
    with targets.deviceless_cudnn(devices):
        lowered = step.step.lower(*placed, tokens)
    return hlo_cost.program_stats(lowered.compile().as_text(), len(devices))


def _within(ours, plain) -> bool:
    return ours.kernels <= TOLERANCE * plain.kernels and ours.hbm_bytes <= TOLERANCE * plain.hbm_bytes


def _guard(ours, plain):
    assert _within(ours, plain), (f"kernels {ours.kernels} vs {plain.kernels}, "
                                  f"HBM bytes {ours.hbm_bytes:,} vs {plain.hbm_bytes:,}")


# One head of 128 (splash's lane width), 128 tokens (one splash block): libtpu compiles each step in seconds.
TPU_MODEL = {"d_model": 128, "n_layers": 2, "n_heads": 1, "d_ff": 512, "seq_len": 128, "vocab": 512}
GPU_MODEL = {"d_model": 512, "n_layers": 4, "n_heads": 4, "d_ff": 2048, "seq_len": 512, "vocab": 4096}
# target: (slice, model, global batch, the attention auto picks and the plain step calls, the compiler to have)
TARGETS = {"tpu": ("v5e:2x2", TPU_MODEL, 8, "splash", lambda: targets.libtpu_version() is not None,
                   "the TPU compiler (libtpu) is not installed"),
           "gpu": ("h100:1x1", GPU_MODEL, 4, "cudnn", lambda: targets.cuda_plugin_version() is not None,
                   "XLA's GPU compiler (jax[cuda12-local]) is not installed")}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def compiled(request):
    """Both layer forms of jaxscale's step and the plain step, compiled for the target; the GPU's run with the
    GPU-planning test command (-k gpu)."""
    topology, model, batch, attention, available, missing = TARGETS[request.param]
    if not available():
        pytest.skip(missing)
    devices = list(targets.slice_devices(topology))
    return {"target": request.param, "attention": attention,
            "unrolled": _ours(model, batch, devices, scan=False), "scan": _ours(model, batch, devices, scan=True),
            "plain": _plain(model, batch, devices, attention)}


def test_step_launches_and_moves_no_more_than_a_plain_step(compiled):
    impl, ours = compiled["unrolled"]
    assert impl == compiled["attention"]  # what auto picks on the target, and what the plain step calls
    if compiled["target"] == "tpu":
        assert ours.counted_kernels and ours.flops_trusted  # splash's kernels counted from their shapes
    _guard(ours, compiled["plain"])


def test_guard_catches_the_scanned_form(compiled):
    _, scanned = compiled["scan"]
    # on the v5e, 287 kernels against 216: the loop's stacking and slicing
    assert not _within(scanned, compiled["plain"])
