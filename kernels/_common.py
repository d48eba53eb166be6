"""Shared pieces of hai.kernels: the Triton import guard, the Triton-or-torch dispatch, e4m3 constants, padding."""

from __future__ import annotations

import os

import torch

try:  # Triton is a Linux x86_64 dependency; elsewhere every op runs its torch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False

    class _NoTriton:
        """Stand-in so `@triton.jit` and `tl.constexpr` annotations still import; launching raises."""

        constexpr = object

        @staticmethod
        def jit(fn):
            return fn

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = tl = _NoTriton()  # type: ignore[assignment]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
AMAX_EPS = 1e-12  # amax floor: an all-zero block gets scale 1e-12/448 (no 0/0), its bytes stay 0
BLOCK = 128  # quantization block edge and GEMM K step (the FP32 promotion interval)
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def _interpreted_at_import() -> bool:
    """`@triton.jit` picks the interpreter when TRITON_INTERPRET=1 is set at decoration time: Triton's own library
    (tl.max, ...) is decorated when triton is imported, our kernels when hai.kernels is. Both must have seen it."""
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


_DECORATED_INTERPRETED = _interpreted_at_import()


def use_triton(t: torch.Tensor) -> bool:
    """Triton path for CUDA tensors, or for CPU tensors when TRITON_INTERPRET=1 (now and when hai.kernels was
    imported); otherwise the torch reference, so models run on a plain CPU without the interpreter."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return _DECORATED_INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"


def check_float_2d(name: str, x: torch.Tensor) -> None:
    """Quantizer input checks: 2-D, fp32/bf16/fp16, contiguous."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}: reshape to (-1, {name}.shape[-1])")
    if x.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"{name} dtype {x.dtype} is not supported: cast to float32, bfloat16 or float16")
    if not x.is_contiguous():
        raise ValueError(f"{name} with shape {tuple(x.shape)} and strides {x.stride()} is not contiguous: "
                         f"call .contiguous() first")


def check_multiple(name: str, dim: str, size: int, why: str) -> None:
    if size % BLOCK != 0:
        raise ValueError(f"{name}: {dim}={size} is not a multiple of {BLOCK} ({why}): pad {dim} to "
                         f"{-(-size // BLOCK) * BLOCK} with zeros (fp8_linear / fp8_grouped_linear pad for you)")


def round_up(n: int, multiple: int = BLOCK) -> int:
    return -(-n // multiple) * multiple


def pad_2d(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the bottom/right to (rows, cols); returns `t` itself (contiguous) when no pad."""
    if t.shape[0] == rows and t.shape[1] == cols:
        return t.contiguous()
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))
