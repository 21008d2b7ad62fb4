"""The Flax NNX decoder-only transformer that jaxscale measures.

Token embedding, ``n_layers`` pre-norm blocks (RMSNorm → causal multi-head
self-attention with RoPE through ``jax.nn.dot_product_attention`` → residual;
RMSNorm → GELU MLP of width d_ff → residual), a final RMSNorm and an untied LM
head. No biases, so the parameter count is exactly ``flops.param_count``.

Every parameter carries the logical names of its axes (``logical=``); a
strategy maps those names to mesh axes (sharding.py). Activations are
constrained through ``constrain(x, names)``, which the step supplies.
Parameters are stored in float32; matmuls run in the spec's compute dtype.

Two layer forms (``scan_layers``):

- unrolled (``scan_layers = False``, the default): ``n_layers`` Blocks, each
  with its own parameters, run by a Python loop. XLA sees every layer, as in a
  plain JAX step, and fuses and schedules across layer boundaries; the
  gradient of each layer's weights goes straight to its own optimizer update.
  Compile time grows with depth.
- scanned (``scan_layers = True``): one Block whose parameters have a leading
  ``layers`` axis, run by ``nnx.scan`` (MaxText's scan_layers): one compiled
  loop body, so compile time hardly grows with depth, but the backward pass
  reads the forward activations back from per-layer stacks and XLA cannot
  recompute across the loop boundary, so a step moves more bytes
  (benchmarks/compile_depth.py measures both). No strategy shards ``layers``.

Either way the layers are created stacked, by one vmapped initializer, and the
unrolled form takes static slices of them: building a deep model traces one
small initializer, never n_layers copies of it, and both forms start from the
same weights.

Attention goes through an ``attend(q, k, v)`` function that the step supplies
(attention.py: XLA's, cuDNN's fused kernel, or the TPU's Pallas splash kernel).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.config import ModelSpec

Constrain = Callable[[jax.Array, tuple], jax.Array]
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _no_constraint(x: jax.Array, names: tuple) -> jax.Array:
    return x


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention over (batch, seq, heads, head_dim), XLA's implementation."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, logical: tuple[str, ...]) -> nnx.Param:
    init = jax.nn.initializers.normal(stddev=fan_in ** -0.5)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical=logical)


class RMSNorm(nnx.Module):
    def __init__(self, d: int):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), logical=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (y * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array) -> jax.Array:
    """Rotary position embedding over (batch, seq, heads, head_dim)."""
    seq, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = jnp.arange(seq, dtype=jnp.float32)[:, None] * freq[None, :]
    sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:2 * half].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], axis=-1)
    return out.astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, h, k, f = spec.d_model, spec.n_heads, spec.head_dim, spec.d_ff
        self.dtype = dtype
        self.attn_norm = RMSNorm(d)
        self.wqkv = _param(rngs, (3, d, h, k), d, ("qkv", "embed", "heads", "kv"))  # q, k and v stacked
        self.wo = _param(rngs, (h, k, d), d, ("heads", "kv", "embed"))
        self.mlp_norm = RMSNorm(d)
        self.w_in = _param(rngs, (d, f), d, ("embed", "mlp"))
        self.w_out = _param(rngs, (f, d), f, ("mlp", "embed"))

    def __call__(self, x: jax.Array, constrain: Constrain, attend: Attend) -> jax.Array:
        dt = self.dtype
        h = self.attn_norm(x)
        wqkv = self.wqkv[...].astype(dt)  # one cast for the three projections
        q, k, v = (constrain(jnp.einsum("btd,dhk->bthk", h, wqkv[i]), ("batch", "seq", "heads", "kv"))
                   for i in range(3))
        a = constrain(attend(rope(q), rope(k), v), ("batch", "seq", "heads", "kv"))
        x = x + constrain(jnp.einsum("bthk,hkd->btd", a, self.wo[...].astype(dt)), ("batch", "seq", None))
        h = self.mlp_norm(x)
        u = constrain(jax.nn.gelu(jnp.einsum("btd,df->btf", h, self.w_in[...].astype(dt))), ("batch", "seq", "mlp"))
        x = x + constrain(jnp.einsum("btf,fd->btd", u, self.w_out[...].astype(dt)), ("batch", "seq", None))
        return x


class Transformer(nnx.Module):
    """Decoder-only LM. ``__call__(tokens) -> logits`` in float32.

    Args:
      spec: the model size.
      dtype: compute dtype of the matmuls (parameters stay float32).
      remat: a config.REMAT_POLICIES name, applied to every layer.
      scan_layers: one scanned layer with stacked parameters (``layers``), or
        ``n_layers`` unrolled Blocks (``blocks``).
    """

    def __init__(self, spec: ModelSpec, *, dtype: str = "float32", remat: str = "none", scan_layers: bool = False,
                 rngs: nnx.Rngs):
        self.spec = spec
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.scan_layers = scan_layers
        self.embed = _param(rngs, (spec.vocab, spec.d_model), 1, ("vocab", "embed"))

        @nnx.split_rngs(splits=spec.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(layer_rngs: nnx.Rngs) -> Block:
            return Block(spec, self.dtype, layer_rngs)

        if scan_layers:
            self.layers = stacked(rngs)
        else:
            graphdef, state = nnx.split(stacked(rngs))
            self.blocks = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
                                    for i in range(spec.n_layers)])
        self.final_norm = RMSNorm(spec.d_model)
        self.head = _param(rngs, (spec.d_model, spec.vocab), spec.d_model, ("embed", "vocab"))

    def __call__(self, tokens: jax.Array, constrain: Constrain = _no_constraint,
                 attend: Attend = xla_attention) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "seq", None))

        def layer(block: Block, y: jax.Array) -> jax.Array:
            return block(y, constrain, attend)

        if self.remat != "none":
            layer = nnx.remat(layer, policy=remat_policy(self.remat))
        if self.scan_layers:
            def body(y: jax.Array, block: Block) -> jax.Array:
                return layer(block, y)

            x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
        else:
            for block in self.blocks:
                x = layer(block, x)
        x = self.final_norm(x)
        logits = jnp.einsum("btd,dv->btv", x, self.head[...].astype(self.dtype))
        return constrain(logits, ("batch", "seq", "vocab")).astype(jnp.float32)


def remat_policy(name: str):
    """The jax.checkpoint policy of a config.REMAT_POLICIES name ("none" is never rematerialized)."""
    if name == "full":
        return None  # save nothing: the whole layer is recomputed in the backward pass
    if name == "save_dots":
        return jax.checkpoint_policies.dots_saveable
    raise ValueError(f"no remat policy {name!r}")


def next_token_loss(model: Transformer, tokens: jax.Array, constrain: Constrain = _no_constraint,
                    attend: Attend = xla_attention) -> jax.Array:
    """Mean next-token cross-entropy; ``tokens`` has seq_len + 1 positions."""
    logits = model(tokens[:, :-1], constrain, attend)
    targets = tokens[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)
