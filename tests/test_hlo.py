"""hlo.py: the optimized-HLO parser, on hand-written HLO."""

from helpers import KERNELS
from jaxscale import hlo, hlo_cost


def test_an_instruction_whose_attributes_span_lines_is_read_whole():
    """Pallas kernels carry kernel metadata with line breaks (the splash-attention kernels do)."""
    text = KERNELS.replace('custom_call_target="tpu_custom_call", ',
                           'custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={\n'
                           '"xprof_metadata":"{\\"block_q\\": 128}"\n}}, ')
    module = hlo.parse(text)
    assert module.instructions["k"].target == "tpu_custom_call" and "r" in module.instructions
    assert hlo_cost.program_stats(module).matmul_flops == hlo_cost.program_stats(KERNELS).matmul_flops
