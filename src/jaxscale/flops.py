"""Analytic FLOPs and parameter counts, and MFU.

Everything here is pure arithmetic on integers and floats: no JAX calls, so it
can be checked by hand and reused on rows that came from elsewhere.
"""

from __future__ import annotations

# How the attention score/value matmuls are counted in model FLOPs.
ATTENTION_FULL = "full"  # PaLM appendix B: QK^T and AV over the whole s x s square
ATTENTION_CAUSAL = "causal_half"  # MaxText: a causal mask skips half the square


def param_count(d_model: int, n_layers: int, vocab: int, d_ff: int | None = None) -> int:
    """Parameters of jaxscale's transformer.

    Per layer: q, k, v, o projections (4·d²), the MLP in and out (2·d·d_ff) and two
    RMSNorm scales (2·d). Outside the layers: the token embedding (V·d), the final
    norm (d) and the untied LM head (d·V). Positions use RoPE, which has none.
    """
    d_ff = 4 * d_model if d_ff is None else d_ff
    per_layer = 4 * d_model * d_model + 2 * d_model * d_ff + 2 * d_model
    return n_layers * per_layer + 2 * vocab * d_model + d_model


def train_flops(
    d_model: int,
    n_layers: int,
    seq_len: int,
    vocab: int,
    batch: int,
    d_ff: int | None = None,
    recompute: bool = False,
    causal: bool = False,
) -> int:
    """Training FLOPs of one step (forward + backward) of a decoder-only transformer.

    ``batch·seq_len·[(3 + recompute)·n_layers·(8·d² + 4·d·d_ff + 4·seq_len·d) + 6·d·vocab]``

    Each matmul weight costs 2 FLOPs per token forward and 4 backward, hence
    6 × matmul params × tokens; attention adds QKᵀ and AV, 2·s·d each forward.
    Without recompute this is the PaLM definition of model FLOPs. With recompute
    (the forward pass of every layer is run again in the backward pass) and
    d_ff = 4d it equals Megatron-LM's 96·B·s·l·h²·(1 + s/6h + V/16lh).
    ``causal=True`` halves the attention term, since a causal mask leaves half of
    the s×s scores unused (MaxText's convention); the LM head is never recomputed.

    Args:
      d_model, n_layers, seq_len, vocab: model dimensions.
      batch: sequences per step (global batch).
      d_ff: MLP width (default 4·d_model).
      recompute: count the extra forward pass of full activation recomputation.
      causal: halve the attention-score FLOPs.

    Returns:
      FLOPs per training step, an int.
    """
    d_ff = 4 * d_model if d_ff is None else d_ff
    attention = 4 * seq_len * d_model
    if causal:
        attention //= 2
    per_layer = 8 * d_model * d_model + 4 * d_model * d_ff + attention
    passes = 3 + int(recompute)
    return batch * seq_len * (passes * n_layers * per_layer + 6 * d_model * vocab)


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, peak_tflops_per_device: float) -> float:
    """Fraction of the devices' peak FLOP/s achieved: flops / (t · n · peak)."""
    return flops_per_step / (step_time_s * n_devices * peak_tflops_per_device * 1e12)



def attention_call_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, backward: bool,
                         causal: bool, flash: bool = True) -> int:
    """FLOPs of one fused attention kernel (a cuDNN custom call), which XLA's cost analysis does not see.

    Forward: QKᵀ and PV, 2·B·N·T·S·H FLOPs each. Backward: the four gradient
    matmuls (dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q), plus, for flash
    attention, QKᵀ again, since the kernel recomputes P from the saved softmax
    statistics instead of storing it. A causal kernel skips the tiles above the
    diagonal, so it does about half of that work (counted as exactly half).

    Args:
      batch, heads: B and N.
      q_len, kv_len: T and S, the query and key/value sequence lengths.
      head_dim: H.
      backward: the gradient kernel rather than the forward one.
      causal: the kernel applies a causal mask.
      flash: the backward kernel recomputes QKᵀ (cuDNN flash attention does).

    Returns:
      FLOPs of one call, an int.
    """
    one_matmul = 2 * batch * heads * q_len * kv_len * head_dim
    matmuls = (4 + int(flash)) if backward else 2
    total = matmuls * one_matmul
    return total // 2 if causal else total
