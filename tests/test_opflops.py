"""opflops.py: one instruction's FLOPs against hand counts (a dot, a padded convolution, a cuBLAS gemm)."""

import numpy as np

from jaxscale import hlo
from jaxscale.opflops import convolution_flops, dot_flops, gemm_flops

DOT = """
ENTRY %main (a: f32[8,64,32], b: f32[8,32,16]) -> f32[8,64,16] {
  %a = f32[8,64,32]{2,1,0} parameter(0)
  %b = f32[8,32,16]{2,1,0} parameter(1)
  ROOT %d = f32[8,64,16]{2,1,0} dot(%a, %b), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}
"""

CONV = """
ENTRY %main (x: f32[2,10,3], w: f32[3,3,4]) -> f32[2,10,4] {
  %x = f32[2,10,3]{2,1,0} parameter(0)
  %w = f32[3,3,4]{2,1,0} parameter(1)
  ROOT %c = f32[2,10,4]{2,1,0} convolution(%x, %w), window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f
}
"""

GEMM = """
ENTRY %main (a: bf16[128,256], b: bf16[256,512]) -> (bf16[128,512], s8[1024]) {
  %a = bf16[128,256]{1,0} parameter(0)
  %b = bf16[256,512]{1,0} parameter(1)
  ROOT %g = (bf16[128,512]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
}
"""


def test_a_batched_dot_is_two_flops_per_multiply_add():
    module = hlo.parse(DOT)
    assert dot_flops(module.instructions["d"], module) == 2 * 8 * 64 * 16 * 32


def test_a_padded_convolution_counts_only_taps_inside_the_input():
    module = hlo.parse(CONV)
    # the 3-wide window over 10 positions with one zero pad each side: 10·3 − 2 taps land on the padding
    x, w = np.ones((10,)), np.ones((3,))
    taps = int(np.convolve(x, w, mode="same").sum())
    assert taps == 10 * 3 - 2
    assert convolution_flops(module.instructions["c"], module) == 2 * 2 * 4 * 3 * taps


def test_a_cublas_gemm_is_counted_from_its_dimension_numbers():
    module = hlo.parse(GEMM)
    assert gemm_flops(module.instructions["g"], module) == 2 * 128 * 512 * 256
