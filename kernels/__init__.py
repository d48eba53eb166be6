"""hai.kernels: FP8 (e4m3) fine-grained quantization, block-scaled GEMMs (dense and grouped) and FP8 linear layers.

Each op is a Triton kernel + typed launcher (``*_triton``) with a torch reference of the same math (``*_ref``) in its
submodule (quant, gemm, linear); the names below dispatch: Triton for CUDA tensors of an FP8-capable GPU or under
TRITON_INTERPRET=1, the torch reference otherwise. ``check_fp8_device`` refuses FP8 on a GPU older than capability 8.9;
``hai.kernels.aot`` compiles every launch variant ahead of time for sm_90 / sm_100.
"""
if __name__ != "hai.kernels":  # imported as a bare `kernels` from the checkout root: see hai/_shadow.py
    from hai._shadow import step_aside

    step_aside(__name__, __file__)  # the lines below then only import hai.kernels

from hai.kernels._common import check_fp8_device, to_device
from hai.kernels.gemm import fp8_gemm, fp8_grouped_gemm, fp8_k_grouped_gemm
from hai.kernels.linear import (Fp8Rows, expert_counts, fp8_dgrad, fp8_fprop, fp8_grouped_dgrad, fp8_grouped_fprop,
                                fp8_grouped_linear, fp8_grouped_wgrad, fp8_linear, fp8_wgrad, quantize_rows)
from hai.kernels.quant import quant_1x128, quant_128x1, quant_128x128

__all__ = [
    "quant_1x128", "quant_128x1", "quant_128x128",
    "fp8_gemm", "fp8_grouped_gemm", "fp8_k_grouped_gemm",
    "fp8_linear", "fp8_grouped_linear", "Fp8Rows", "quantize_rows", "fp8_fprop", "fp8_dgrad", "fp8_wgrad",
    "fp8_grouped_fprop", "fp8_grouped_dgrad", "fp8_grouped_wgrad", "expert_counts", "check_fp8_device", "to_device",
]
