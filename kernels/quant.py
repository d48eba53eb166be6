"""Fine-grained e4m3 quantizers (DeepSeek-V3 style): 1x128, 128x1 and 128x128 blocks.

Every quantizer maps a block b of the input to ``scale_b = max(amax_b, AMAX_EPS) / 448`` (fp32) and
``q = e4m3(x / scale_b)``, where the division is IEEE round-to-nearest, the quotient is saturated to ±448 and rounded
to the nearest e4m3 value, ties to even (exactly what torch's ``.to(torch.float8_e4m3fn)`` does). Dequantize with
``q.float() * scale_b``. An all-zero block gets scale 1e-12/448 and zero bytes (no division by zero).

Each quantizer comes three ways: ``quant_*`` (dispatch: Triton on CUDA or under TRITON_INTERPRET=1, else torch),
``quant_*_triton`` (the typed launcher) and ``quant_*_ref`` (pure torch, the same bytes). Inputs must already be
multiples of 128 where a block spans that dim: the launchers raise ValueError naming the shape and the fix; padding is
done by the callers that can do it exactly (fp8_linear, fp8_grouped_linear).

Shape legend: M rows (tokens or output features), K columns; Mb = M/128, Kb = K/128.
"""

from __future__ import annotations

import torch

from ._common import (AMAX_EPS, BLOCK, FP8_DTYPE, FP8_MAX, check_float_2d, check_multiple, tl, triton,
                      use_triton)

__all__ = [
    "quant_1x128", "quant_128x1", "quant_128x128",
    "quant_1x128_triton", "quant_128x1_triton", "quant_128x128_triton",
    "quant_1x128_ref", "quant_128x1_ref", "quant_128x128_ref",
]


# ---------------------------------------------------------------------------------------------------------- Triton
@triton.jit
def _to_e4m3(x, scale):
    """e4m3(x / scale) with torch's rounding: saturate to ±448, round to nearest even on the fp32 bits, then cast.

    The interpreter's fp32->fp8 cast neither rounds to nearest nor saturates, so the value is made exactly
    representable first; the final cast is then exact on every backend. -0.0 and negatives that round to 0 keep
    their sign bit, as in torch.
    """
    v = tl.math.div_rn(x, scale)
    neg = (v.to(tl.uint32, bitcast=True) >> 31) != 0
    a = tl.minimum(tl.abs(v), 448.0)
    a_bits = a.to(tl.uint32, bitcast=True)
    # normals (a >= 2**-6): keep 3 of the 23 mantissa bits, round half to even
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # subnormals: multiples of 2**-9; adding 2**14 makes the fp32 ulp 2**-9, so the FPU rounds half to even
    subnormal = (a + 16384.0) - 16384.0
    r = tl.where(a < 0.015625, subnormal, normal)
    return tl.where(neg, -r, r).to(tl.float8e4nv)


@triton.jit
def _block_scale(amax, EPS: tl.constexpr):
    return tl.math.div_rn(tl.maximum(amax, EPS), 448.0)


@triton.jit
def _quant_1x128_kernel(x_ptr, q_ptr, s_ptr, M, K, BLOCK_M: tl.constexpr, EPS: tl.constexpr):
    # x_MK -> q_MK, s_MKb; program = BLOCK_M rows x one 128-column block
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    mask = rows[:, None] < M
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = _block_scale(tl.max(tl.abs(x), axis=1), EPS)
    tl.store(q_ptr + offs, _to_e4m3(x, scale[:, None]), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * (K // 128) + tl.program_id(1), scale, mask=rows < M)


@triton.jit
def _quant_128x1_kernel(x_ptr, q_ptr, s_ptr, M, K, BLOCK_K: tl.constexpr, EPS: tl.constexpr):
    # x_MK -> q_MK, s_MbK; program = one 128-row block x BLOCK_K columns
    rows = tl.program_id(0) * 128 + tl.arange(0, 128)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    mask = cols[None, :] < K
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = _block_scale(tl.max(tl.abs(x), axis=0), EPS)
    tl.store(q_ptr + offs, _to_e4m3(x, scale[None, :]), mask=mask)
    tl.store(s_ptr + tl.program_id(0).to(tl.int64) * K + cols, scale, mask=cols < K)


@triton.jit
def _quant_128x128_kernel(w_ptr, q_ptr, s_ptr, N, K, EPS: tl.constexpr):
    # w_NK -> q_NK, s_NbKb; program = one 128x128 block
    rows = tl.program_id(0) * 128 + tl.arange(0, 128)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    w = tl.load(w_ptr + offs).to(tl.float32)
    scale = _block_scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), EPS)
    tl.store(q_ptr + offs, _to_e4m3(w, scale))
    tl.store(s_ptr + tl.program_id(0) * (K // 128) + tl.program_id(1), scale)


# --------------------------------------------------------------------------------------------------------- checks
def _check_1x128(x_MK: torch.Tensor) -> None:
    check_float_2d("quant_1x128 input x", x_MK)
    check_multiple(f"quant_1x128 input x{tuple(x_MK.shape)}", "K", x_MK.shape[1], "1x128 blocks run along K")


def _check_128x1(x_MK: torch.Tensor) -> None:
    check_float_2d("quant_128x1 input x", x_MK)
    check_multiple(f"quant_128x1 input x{tuple(x_MK.shape)}", "M", x_MK.shape[0], "128x1 blocks run along M")


def _check_128x128(w_NK: torch.Tensor) -> None:
    check_float_2d("quant_128x128 input w", w_NK)
    for dim, size in (("N", w_NK.shape[0]), ("K", w_NK.shape[1])):
        check_multiple(f"quant_128x128 input w{tuple(w_NK.shape)}", dim, size, "128x128 blocks")


def _empty_like_fp8(x: torch.Tensor, scale_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    return q, torch.empty(scale_shape, dtype=torch.float32, device=x.device)


# ------------------------------------------------------------------------------------------------------ launchers
def quant_1x128_triton(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton 1x128 quantizer: x[M, K] (K % 128 == 0) -> (q[M, K] e4m3, scale[M, K/128] fp32)."""
    _check_1x128(x_MK)
    M, K = x_MK.shape
    q_MK, s_MKb = _empty_like_fp8(x_MK, (M, K // BLOCK))
    block_m = 32 if x_MK.is_cuda else 128  # the interpreter pays per program, a GPU per register
    if M > 0:
        _quant_1x128_kernel[(triton.cdiv(M, block_m), K // BLOCK)](
            x_MK, q_MK, s_MKb, M, K, BLOCK_M=block_m, EPS=AMAX_EPS)
    return q_MK, s_MKb


def quant_128x1_triton(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton 128x1 quantizer: x[M, K] (M % 128 == 0) -> (q[M, K] e4m3, scale[M/128, K] fp32)."""
    _check_128x1(x_MK)
    M, K = x_MK.shape
    q_MK, s_MbK = _empty_like_fp8(x_MK, (M // BLOCK, K))
    block_k = 32 if x_MK.is_cuda else 128
    if M > 0 and K > 0:
        _quant_128x1_kernel[(M // BLOCK, triton.cdiv(K, block_k))](
            x_MK, q_MK, s_MbK, M, K, BLOCK_K=block_k, EPS=AMAX_EPS)
    return q_MK, s_MbK


def quant_128x128_triton(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton 128x128 quantizer: w[N, K] (both % 128 == 0) -> (q[N, K] e4m3, scale[N/128, K/128] fp32)."""
    _check_128x128(w_NK)
    N, K = w_NK.shape
    q_NK, s_NbKb = _empty_like_fp8(w_NK, (N // BLOCK, K // BLOCK))
    if N > 0 and K > 0:
        _quant_128x128_kernel[(N // BLOCK, K // BLOCK)](w_NK, q_NK, s_NbKb, N, K, EPS=AMAX_EPS, num_warps=8)
    return q_NK, s_NbKb


# ----------------------------------------------------------------------------------------------- torch references
def _scale_ref(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp_min(AMAX_EPS) / FP8_MAX


def _cast_ref(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # torch rounds to nearest even


def quant_1x128_ref(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of quant_1x128 (same bytes)."""
    _check_1x128(x_MK)
    M, K = x_MK.shape
    x_MKbB = x_MK.float().view(M, K // BLOCK, BLOCK)
    s_MKb = _scale_ref(x_MKbB.abs().amax(dim=2))
    return _cast_ref(x_MKbB / s_MKb[:, :, None]).view(M, K), s_MKb


def quant_128x1_ref(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of quant_128x1 (same bytes)."""
    _check_128x1(x_MK)
    M, K = x_MK.shape
    x_MbBK = x_MK.float().view(M // BLOCK, BLOCK, K)
    s_MbK = _scale_ref(x_MbBK.abs().amax(dim=1))
    return _cast_ref(x_MbBK / s_MbK[:, None, :]).view(M, K), s_MbK


def quant_128x128_ref(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of quant_128x128 (same bytes)."""
    _check_128x128(w_NK)
    N, K = w_NK.shape
    w_NbBKbB = w_NK.float().view(N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    s_NbKb = _scale_ref(w_NbBKbB.abs().amax(dim=(1, 3)))
    return _cast_ref(w_NbBKbB / s_NbKb[:, None, :, None]).view(N, K), s_NbKb


# ------------------------------------------------------------------------------------------------------- dispatch
def quant_1x128(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, per 128 columns: x[M, K] -> (q[M, K] e4m3, scale[M, K/128] fp32). K % 128 == 0."""
    return quant_1x128_triton(x_MK) if use_triton(x_MK) else quant_1x128_ref(x_MK)


def quant_128x1(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128 rows, per column (weight-gradient operands): x[M, K] -> (q[M, K], scale[M/128, K]). M % 128 == 0."""
    return quant_128x1_triton(x_MK) if use_triton(x_MK) else quant_128x1_ref(x_MK)


def quant_128x128(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block (weights): w[N, K] -> (q[N, K] e4m3, scale[N/128, K/128] fp32). N, K % 128 == 0."""
    return quant_128x128_triton(w_NK) if use_triton(w_NK) else quant_128x128_ref(w_NK)
