"""hai.kernels: FP8 (e4m3) fine-grained quantization, block-scaled GEMMs (dense and grouped) and FP8 linear layers.

Each op is a Triton kernel + typed launcher (``*_triton``) with a torch reference of the same math (``*_ref``) in its
submodule (quant, gemm, linear); the names below dispatch: Triton for CUDA tensors or under TRITON_INTERPRET=1,
the torch reference otherwise.
"""

from .gemm import fp8_gemm, fp8_grouped_gemm, fp8_k_grouped_gemm
from .linear import fp8_grouped_linear, fp8_linear
from .quant import quant_1x128, quant_128x1, quant_128x128

__all__ = [
    "quant_1x128", "quant_128x1", "quant_128x128",
    "fp8_gemm", "fp8_grouped_gemm", "fp8_k_grouped_gemm",
    "fp8_linear", "fp8_grouped_linear",
]
