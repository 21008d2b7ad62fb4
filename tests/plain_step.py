"""A decoder-only transformer train step in plain JAX, written without jaxscale's code.

It is what a careful JAX user would write for the same architecture: pytrees of
float32 parameters, one list entry per layer (unrolled), pre-norm blocks
(RMSNorm in float32, causal attention with rotary positions, GELU MLP), an
untied embedding and head, matmuls in the compute dtype, AdamW from optax with
jaxscale's hyper-parameters. jaxscale's own step is checked against it: by the
kernels and HBM bytes of their optimized programs (tests/test_speed_guard.py)
and by timing them side by side (benchmarks/peer_step.py,
benchmarks/accelerator_check.py).

Attention: ``xla`` (jax.nn.dot_product_attention's XLA path), ``cudnn`` (its
cuDNN path) or ``splash`` (the TPU's Pallas splash kernel, called directly,
under shard_map over the batch when a mesh is given).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


def _splash(q, k, v, mesh, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    from jax.sharding import PartitionSpec

    def per_shard(q, k, v):
        b, t, h, d = q.shape
        block = min(512, t)
        sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((t, t))] * h), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
        bhtd = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        return bhtd(jax.vmap(kernel)(bhtd(q / jnp.sqrt(jnp.asarray(d, q.dtype))), bhtd(k), bhtd(v)))

    if mesh is None:
        return per_shard(q, k, v)
    spec = PartitionSpec(mesh.axis_names[0])
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


class PlainStep(NamedTuple):
    init: Callable  # key -> (params, opt_state), jitted
    step: Callable  # (params, opt_state, tokens) -> (params, opt_state, loss), jitted, params and opt_state donated
    loss: Callable  # (params, tokens) -> mean next-token cross-entropy


def plain_train_step(d_model: int, n_layers: int, n_heads: int, d_ff: int, vocab: int, dtype,
                     attention: str = "xla", mesh=None, interpret: bool = False) -> PlainStep:
    """The plain step of a model: ``tokens`` have seq_len + 1 positions; with a
    mesh (one axis), the batch is split over it."""
    head_dim = d_model // n_heads
    dtype = jnp.dtype(dtype)
    tx = optax.adamw(3e-4, weight_decay=0.1)

    def init(key):
        keys = iter(jax.random.split(key, 2 + 6 * n_layers))

        def normal(shape, fan_in):
            return jax.random.normal(next(keys), shape, jnp.float32) * fan_in ** -0.5

        layers = [{"ln1": jnp.ones((d_model,)), "ln2": jnp.ones((d_model,)),
                   "wqkv": jnp.stack([normal((d_model, n_heads, head_dim), d_model) for _ in range(3)]),
                   "wo": normal((n_heads, head_dim, d_model), d_model),
                   "w1": normal((d_model, d_ff), d_model), "w2": normal((d_ff, d_model), d_ff)}
                  for _ in range(n_layers)]
        params = {"embed": normal((vocab, d_model), 1), "layers": layers, "ln_f": jnp.ones((d_model,)),
                  "head": normal((d_model, vocab), d_model)}
        return params, tx.init(params)

    def norm(x, scale):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6) * scale).astype(dtype)

    def rotary(x):
        t, half = x.shape[1], head_dim // 2
        inv = 1.0 / 10000.0 ** (jnp.arange(half) / half)
        ang = jnp.arange(t)[:, None] * inv[None]
        cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
        a, b = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
        return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(dtype)

    if attention == "splash":
        attend = functools.partial(_splash, mesh=mesh, interpret=interpret)
    else:
        attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=attention)

    def forward(params, tokens):
        x = params["embed"][tokens].astype(dtype)
        for p in params["layers"]:
            h = norm(x, p["ln1"])
            q, k, v = (jnp.einsum("btd,dhk->bthk", h, w.astype(dtype)) for w in p["wqkv"])
            a = attend(rotary(q), rotary(k), v)
            x = x + jnp.einsum("bthk,hkd->btd", a, p["wo"].astype(dtype))
            h = norm(x, p["ln2"])
            x = x + jax.nn.gelu(h @ p["w1"].astype(dtype)) @ p["w2"].astype(dtype)
        return (norm(x, params["ln_f"]) @ params["head"].astype(dtype)).astype(jnp.float32)

    def loss_fn(params, tokens):
        logits = forward(params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return PlainStep(jax.jit(init), jax.jit(step, donate_argnums=(0, 1)), loss_fn)
