"""flops.py against hand formulas and published conventions."""

import pytest

from jaxscale import flops


def test_palm_definition_is_six_n_tokens_plus_attention():
    d, layers, s, v, b, f = 512, 6, 1024, 8000, 4, 2048
    matmul_params = layers * (4 * d * d + 2 * d * f) + d * v  # embedding lookup is not a matmul
    expected = 6 * matmul_params * b * s + layers * 12 * s * d * b * s  # PaLM: 6N + 12·l·s·d per token
    assert flops.train_flops(d, layers, s, v, b, f) == expected


def test_recompute_with_4d_mlp_matches_megatron():
    d, layers, s, v, b = 1024, 24, 2048, 51200, 8
    megatron = 96 * b * s * layers * d * d * (1 + s / (6 * d) + v / (16 * layers * d))
    got = flops.train_flops(d, layers, s, v, b, recompute=True)
    assert got == pytest.approx(megatron, rel=1e-12)


def test_causal_halves_only_the_attention_term():
    args = dict(d_model=256, n_layers=3, seq_len=512, vocab=1000, batch=2, d_ff=1024)
    full, causal = flops.train_flops(**args), flops.train_flops(**args, causal=True)
    attention_full = 2 * 512 * 3 * 3 * 4 * 512 * 256  # batch·s·3 passes·layers·4·s·d
    assert full - causal == attention_full // 2


def test_param_count_hand_sum():
    # 2 layers of d=8, d_ff=16: q,k,v,o 4·64, mlp 2·128, norms 2·8; embed, head 2·10·8; final norm 8
    assert flops.param_count(8, 2, 10, 16) == 2 * (256 + 256 + 16) + 160 + 8


def test_mfu_formula():
    assert flops.mfu(1e15, 2.0, 4, 125.0) == pytest.approx(1e15 / (2.0 * 4 * 125e12))


def test_fused_attention_flops_by_hand():
    b, n, t, s, h = 2, 3, 5, 7, 11
    one = 2 * b * n * t * s * h  # one B·N·(T×H)·(H×S) matmul
    assert flops.attention_call_flops(b, n, t, s, h, backward=False, causal=False) == 2 * one
    assert flops.attention_call_flops(b, n, t, s, h, backward=True, causal=False) == 5 * one
    assert flops.attention_call_flops(b, n, t, s, h, backward=True, causal=False, flash=False) == 4 * one
    assert flops.attention_call_flops(b, n, t, s, h, backward=False, causal=True) == one
