"""Which attention kernel runs, and that each computes causal attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale import attention as attn
from jaxscale import sharding as shd
from jaxscale.config import ModelSpec, build_profile
from jaxscale.grid import build_grid
from jaxscale.model import xla_attention
from jaxscale.step import build_step, compile_step


@dataclasses.dataclass
class FakeDevice:
    platform: str
    compute_capability: str | None = None


def _spec(d_model=2048, n_heads=16, seq_len=2048):
    return ModelSpec(d_model=d_model, n_layers=2, n_heads=n_heads, d_ff=4 * d_model, seq_len=seq_len, vocab=1024)


def test_auto_takes_cudnn_on_a_gpu_where_its_constraints_hold():
    h100, a100 = [FakeDevice("gpu", "9.0")], [FakeDevice("cuda", "8.0")]
    assert attn.choose("auto", h100, "bfloat16", _spec()).impl == "cudnn"
    fp32 = attn.choose("auto", h100, "float32", _spec())
    assert fp32.impl == "xla" and "bf16 or fp16" in fp32.note
    # head dim 192: Hopper's cuDNN takes up to 256, Ampere's up to 128
    assert attn.choose("auto", h100, "bfloat16", _spec(d_model=1536, n_heads=8)).impl == "cudnn"
    ampere = attn.choose("auto", a100, "bfloat16", _spec(d_model=1536, n_heads=8))
    assert ampere.impl == "xla" and "at most 128" in ampere.note
    assert attn.choose("auto", h100, "bfloat16", _spec(d_model=1020, n_heads=12)).impl == "xla"  # head dim 85


def test_auto_takes_splash_on_a_tpu_and_xla_on_a_cpu():
    tpu = [FakeDevice("tpu")]
    assert attn.choose("auto", tpu, "bfloat16", _spec()).impl == "splash"
    odd = attn.choose("auto", tpu, "bfloat16", _spec(seq_len=100))
    assert odd.impl == "xla" and "multiple of 128" in odd.note
    cpu = attn.choose("auto", [FakeDevice("cpu")], "bfloat16", _spec())
    assert cpu.impl == "xla" and not cpu.may_fall_back
    named = attn.choose("cudnn", [FakeDevice("cpu")], "float32", _spec())
    assert (named.impl, named.note, named.may_fall_back) == ("cudnn", "", False)


def _qkv(b=2, t=256, h=4, d=64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (b, t, h, d), jnp.float32) for k in keys]


def _causal_by_hand(q, k, v):
    """Softmax(q·kᵀ/√d + causal mask)·v, written out (independent of jax.nn)."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("strategy, data, model", [("dp", 2, 1), ("tp", 1, 2), ("fsdp_tp", 2, 2)])
def test_splash_kernel_is_causal_attention_per_shard(strategy, data, model):
    """The Pallas splash kernel (in Pallas's interpreter on the CPU), run per shard under shard_map,
    gives the hand-written causal attention and the same gradient as XLA's."""
    q, k, v = _qkv()
    mesh = shd.make_mesh(data, model, jax.devices()[:data * model])
    splash = jax.jit(lambda q, k, v: attn.splash_attention(q, k, v, mesh=mesh, strategy=strategy, interpret=True))
    np.testing.assert_allclose(splash(q, k, v), _causal_by_hand(q, k, v), atol=2e-5)
    grad_splash = jax.grad(lambda q: jnp.sum(splash(q, k, v) ** 2))(q)
    grad_xla = jax.grad(lambda q: jnp.sum(xla_attention(q, k, v) ** 2))(q)
    np.testing.assert_allclose(grad_splash, grad_xla, rtol=1e-4, atol=1e-4)


def test_an_auto_kernel_that_fails_to_compile_falls_back_to_xla():
    """cuDNN cannot compile for the CPU: chosen by auto, the point still compiles, with XLA's
    attention and a note saying why; asked for by name, the failure is the point's."""
    profile = build_profile({"model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "seq_len": 8, "vocab": 64},
                             "batch": {"global_batch": 2}, "mesh": {"devices": [1], "strategies": ["dp"]}})
    point = build_grid(profile, 8)[0][0]
    devices = jax.devices()[:1]
    chosen = attn.AttentionChoice("cudnn", "auto", "cuDNN flash attention, the fastest on a GPU")
    program, compiled, *_ = compile_step(build_step(point, profile.run, devices, attention=chosen), profile.run)
    assert program.attention.impl == "xla" and program.attention.note.startswith("cudnn attention failed")
    assert "custom_call_target=\"__cudnn" not in compiled.as_text()
    named = attn.AttentionChoice("cudnn", "cudnn")
    with pytest.raises(Exception):
        compile_step(build_step(point, profile.run, devices, attention=named), profile.run)
