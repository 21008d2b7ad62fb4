"""Which attention kernel a point runs, and the function that runs it.

``attention = "auto"`` picks the fastest attention the backend supports, as a
careful JAX user would:

- GPU: cuDNN's fused flash attention (``jax.nn.dot_product_attention`` with
  ``implementation="cudnn"``) where its constraints hold: bf16 or fp16
  operands, a head dimension that is a multiple of 8 and at most 128 (256 from
  Hopper on). Elsewhere XLA's attention, which materializes the s×s scores.
- TPU: the Pallas splash attention kernel that ships with JAX
  (``jax.experimental.pallas.ops.tpu.splash_attention``, what MaxText runs),
  where the sequence is a multiple of 128; it runs per shard under
  ``jax.shard_map`` (batch over the data axis, heads over the model axis).
- CPU: XLA's attention, the only one there.

``xla``, ``cudnn`` and ``splash`` ask for one kernel. A kernel that ``auto``
chose but that fails to compile for a point is replaced by XLA's, and the
row's ``attention_note`` says why (step.compile_step); one asked for by name
fails the point.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxscale import sharding as shd
from jaxscale.config import ModelSpec
from jaxscale.model import Attend, xla_attention

KERNELS = ("xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """The attention kernel of a point.

    Attributes:
      impl: what runs: ``xla``, ``cudnn`` or ``splash``.
      requested: the profile's setting (``auto`` or a kernel).
      note: why ``auto`` chose it, or why it fell back to XLA; "" when asked for by name.
    """

    impl: str
    requested: str
    note: str = ""

    @property
    def may_fall_back(self) -> bool:
        return self.requested == "auto" and self.impl != "xla"


def platform_of(devices) -> str:
    """``gpu``, ``tpu`` or ``cpu`` for a list of (possibly compile-only) devices."""
    platform = devices[0].platform.lower()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def _cudnn_constraint(dtype: str, spec: ModelSpec, devices) -> str:
    """Why cuDNN flash attention cannot run this point, or ""."""
    if dtype not in ("bfloat16", "float16"):
        return f"cuDNN flash attention needs bf16 or fp16 operands, not {dtype}"
    capability = getattr(devices[0], "compute_capability", None) or "0.0"
    hopper = tuple(int(x) for x in re.findall(r"\d+", str(capability))[:2]) >= (9, 0)
    limit = 256 if hopper else 128
    if spec.head_dim % 8 or spec.head_dim > limit:
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most {limit}, " \
               f"not {spec.head_dim}"
    return ""


def _splash_block(seq_len: int) -> int | None:
    """The splash kernel's tile along the sequence (MaxText uses 512), or None where none divides it."""
    for block in (512, 256, 128):
        if seq_len % block == 0:
            return block
    return None


def choose(requested: str, devices, dtype: str, spec: ModelSpec) -> AttentionChoice:
    """The attention kernel of a point with this model on these devices.

    Args:
      requested: the profile's ``attention`` (``auto``, ``xla``, ``cudnn``, ``splash``).
      devices: the devices the point compiles for (local or a target's).
      dtype: the run's compute dtype.
      spec: the model size.
    """
    if requested != "auto":
        return AttentionChoice(requested, requested)
    platform = platform_of(devices)
    if platform == "gpu":
        why_not = _cudnn_constraint(dtype, spec, devices)
        if not why_not:
            return AttentionChoice("cudnn", "auto", "cuDNN flash attention, the fastest on a GPU")
        return AttentionChoice("xla", "auto", why_not)
    if platform == "tpu":
        if _splash_block(spec.seq_len):
            return AttentionChoice("splash", "auto", "the Pallas splash attention kernel, the fastest on a TPU")
        return AttentionChoice("xla", "auto", f"the splash kernel needs a sequence that is a multiple of 128, "
                                              f"not {spec.seq_len}")
    return AttentionChoice("xla", "auto", f"XLA's attention: the only one on {platform}")


def fallback(choice: AttentionChoice, error: BaseException) -> AttentionChoice:
    """XLA's attention in place of an auto-chosen kernel that failed to compile."""
    message = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
    return AttentionChoice("xla", choice.requested, f"{choice.impl} attention failed to compile ({message}); "
                                                    "XLA's attention ran instead")


def make_attend(impl: str, mesh: Mesh | None = None, strategy: str = "dp", interpret: bool = False) -> Attend:
    """The causal ``attend(q, k, v)`` over (batch, seq, heads, head_dim) of one kernel.

    Args:
      impl: ``xla``, ``cudnn`` or ``splash``.
      mesh, strategy: where the step runs; the splash kernel runs per shard on it.
      interpret: run the splash kernel in Pallas's interpreter (for checks on a CPU).
    """
    if impl == "xla":
        return xla_attention
    if impl == "cudnn":
        return cudnn_attention
    if impl == "splash":
        return functools.partial(splash_attention, mesh=mesh, strategy=strategy, interpret=interpret)
    raise ValueError(f"no attention kernel {impl!r}; expected one of {', '.join(KERNELS)}")


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _splash_kernel(heads: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask

    block = _splash_block(seq_len)
    if block is None:
        raise NotImplementedError(f"the splash kernel needs a sequence that is a multiple of 128, not {seq_len}")
    sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    causal = mask.MultiHeadMask([mask.CausalMask((seq_len, seq_len)) for _ in range(heads)])
    return kernel.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh | None, strategy: str,
                     interpret: bool = False) -> jax.Array:
    """Causal attention by the Pallas splash kernel, per shard of (batch → data, heads → model)."""
    scale = q.shape[-1] ** -0.5

    def local(q, k, v):
        kernel = _splash_kernel(q.shape[2], q.shape[1], interpret)
        to_heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # (b, t, h, d) -> (b, h, t, d)
        out = jax.vmap(kernel)(to_heads_first(q * jnp.asarray(scale, q.dtype)), to_heads_first(k),
                               to_heads_first(v))
        return to_heads_first(out)

    if mesh is None:
        return local(q, k, v)
    spec = shd.logical_to_spec(("batch", "seq", "heads", "kv"), strategy)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
