"""Shared pieces of hai.kernels: the Triton import guard, the Triton-or-torch dispatch (and the GPUs it refuses),
launch options, host-to-device metadata copies, e4m3 constants, padding."""

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
FP8_MIN_CAPABILITY = (8, 9)  # e4m3 tensor-core MMA and Triton's fp8e4nv: Ada (8.9), Hopper (9.0), Blackwell (10.x)
# Every launch pins Triton's fp_fusion (its default is "on" in 3.9 and "off" from 3.10): off, so the promotion step
# `acc += dot * sa * sb` is a rounded multiply, a rounded multiply and a rounded add, exactly what the torch
# references compute (and the interpreter runs) on every Triton version; fused, it would be one FMA whose bits the
# references cannot reproduce. The cost is one extra FP32 op per output element per 128-deep K block.
FP_FUSION = False


def _interpreted_at_import() -> bool:
    """`@triton.jit` picks the interpreter when TRITON_INTERPRET=1 is set at decoration time: Triton's own library
    (tl.max, ...) is decorated when triton is imported, our kernels when hai.kernels is. Both must have seen it."""
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


_DECORATED_INTERPRETED = _interpreted_at_import()


def use_triton(t: torch.Tensor) -> bool:
    """Triton path for CUDA tensors of an FP8-capable GPU (capability >= 8.9), or for CPU tensors when
    TRITON_INTERPRET=1 (now and when hai.kernels was imported); otherwise the torch reference, so models run on a
    plain CPU without the interpreter and an older GPU never reaches an fp8e4nv kernel Triton cannot compile."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return fp8_capable(t.device)
    return _DECORATED_INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"


def fp8_capable(device: torch.device | str) -> bool:
    """Whether the FP8 kernels can run on ``device``: any non-CUDA device (the interpreter or the torch reference
    runs there), or a CUDA GPU of compute capability >= 8.9."""
    device = torch.device(device)
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def check_fp8_device(device: torch.device | str) -> None:
    """Refuse ``model.precision=fp8`` on a CUDA GPU without FP8 tensor cores (capability < 8.9: V100, T4, A100,
    A10, ...) before anything launches; a no-op elsewhere."""
    if fp8_capable(device):
        return
    device = torch.device(device)
    major, minor = torch.cuda.get_device_capability(device)
    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    raise ValueError(f"model.precision=fp8 needs a GPU of CUDA compute capability {need} or newer (Ada, Hopper, "
                     f"Blackwell) for its e4m3 kernels; {device} ({torch.cuda.get_device_name(device)}) has "
                     f"capability {major}.{minor}: set model.precision=bf16")


def compiled(t: torch.Tensor) -> bool:
    """Launch options for a compiled GPU kernel: every device but the CPU the interpreter runs on (CUDA, and the
    meta tensors hai.kernels.aot records launches with)."""
    return t.device.type != "cpu"


def capability(t: torch.Tensor) -> tuple[int, int]:
    """The CUDA compute capability kernels for ``t`` are compiled for; (9, 0) for tensors of no GPU (the meta tensors
    hai.kernels.aot records launches with patch this per target)."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (9, 0)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Small host-built metadata (tile tables, offsets, row maps) onto ``device``. From pageable memory a copy waits
    for the stream (a host sync); from pinned memory with ``non_blocking`` it does not, and torch's caching host
    allocator keeps the pinned block until the copy has run. On the CPU the tensor itself."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def check_float(name: str, x: torch.Tensor, dims: tuple[int, ...]) -> None:
    """Quantizer input checks: 2-D (or another of ``dims``), fp32/bf16/fp16, contiguous."""
    if x.dim() not in dims:
        raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(x.shape)}: "
                         f"reshape to (-1, {name}.shape[-1])")
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
