"""Fine-grained e4m3 quantizers (DeepSeek-V3 style): 1x128, 128x1 and 128x128 blocks.

Every quantizer maps a block b of the input to ``scale_b = max(amax_b, AMAX_EPS) / 448`` (fp32) and
``q = e4m3(x / scale_b)``, where the division is IEEE round-to-nearest, the quotient is saturated to ±448 and rounded
to the nearest e4m3 value, ties to even (exactly what torch's ``.to(torch.float8_e4m3fn)`` does). Dequantize with
``q.float() * scale_b``. An all-zero block gets scale 1e-12/448 and zero bytes (no division by zero).

Each quantizer comes three ways: ``quant_*`` (dispatch: Triton on CUDA or under TRITON_INTERPRET=1, else torch),
``quant_*_triton`` (the typed launcher) and ``quant_*_ref`` (pure torch, the same bytes). Inputs must already be
multiples of 128 where a block spans that dim: the launchers raise ValueError naming the shape and the fix; padding is
done by the callers that can do it exactly (fp8_linear, fp8_grouped_linear).

The 128x1 and 128x128 quantizers can write their output transposed (``transpose=True``: q[K, M] with scales
[K, Mb], or q[.., K, N] with scales [.., Kb, Nb]): the layout the dgrad and wgrad GEMMs need so that both of their
operands are contiguous along the reduced dim (DeepGEMM's rule on SM90: fp8 wgmma reads K-major operands, and only
K-contiguous tiles are copied asynchronously into shared memory). The bytes are those of the untransposed output.
The 128x1 scales stay where the untransposed quantizer writes them ([Mb, K]; the transposed result is a view): the
weight-gradient GEMM then reads each K block's per-row scales as one contiguous vector (DeepGEMM's MN-major scales).

Shape legend: M rows (tokens or output features), K columns; Mb = M/128, Kb = K/128; E experts (a leading batch dim
of the 128x128 quantizer).
"""

from __future__ import annotations

import torch

from ._common import (AMAX_EPS, BLOCK, FP8_DTYPE, FP8_MAX, FP_FUSION, check_float, check_multiple, compiled, tl,
                      triton, use_triton)

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
def _quant_128x1_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_qm, stride_qk, BLOCK_K: tl.constexpr, EPS: tl.constexpr):
    # x_MK -> q (q_MK, or q_KM when transposed), s_MbK; program = one 128-row block x BLOCK_K columns
    rows = tl.program_id(0) * 128 + tl.arange(0, 128)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols[None, :] < K
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _block_scale(tl.max(tl.abs(x), axis=0), EPS)
    q_offs = rows[:, None].to(tl.int64) * stride_qm + cols[None, :].to(tl.int64) * stride_qk
    tl.store(q_ptr + q_offs, _to_e4m3(x, scale[None, :]), mask=mask)
    tl.store(s_ptr + tl.program_id(0).to(tl.int64) * K + cols, scale, mask=cols < K)


@triton.jit
def _quant_128x128_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_qn, stride_qk, stride_sn, stride_sk, EPS: tl.constexpr):
    # w_ENK -> q (q_ENK, or q_EKN when transposed), s (s_ENbKb or s_EKbNb); program = one 128x128 block of expert
    # program_id(2) (E = 1 for a 2-D weight)
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * 128 + tl.arange(0, 128)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    w = tl.load(w_ptr + e * N * K + rows[:, None].to(tl.int64) * K + cols[None, :]).to(tl.float32)
    scale = _block_scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), EPS)
    q_offs = rows[:, None].to(tl.int64) * stride_qn + cols[None, :].to(tl.int64) * stride_qk
    tl.store(q_ptr + e * N * K + q_offs, _to_e4m3(w, scale))
    s_off = tl.program_id(0).to(tl.int64) * stride_sn + tl.program_id(1).to(tl.int64) * stride_sk
    tl.store(s_ptr + e * (N // 128) * (K // 128) + s_off, scale)


# --------------------------------------------------------------------------------------------------------- checks
def _check_1x128(x_MK: torch.Tensor) -> None:
    check_float("quant_1x128 input x", x_MK, (2,))
    check_multiple(f"quant_1x128 input x{tuple(x_MK.shape)}", "K", x_MK.shape[1], "1x128 blocks run along K")


def _check_128x1(x_MK: torch.Tensor) -> None:
    check_float("quant_128x1 input x", x_MK, (2,))
    check_multiple(f"quant_128x1 input x{tuple(x_MK.shape)}", "M", x_MK.shape[0], "128x1 blocks run along M")


def _check_128x128(w_NK: torch.Tensor) -> None:
    check_float("quant_128x128 input w", w_NK, (2, 3))
    for dim, size in (("N", w_NK.shape[-2]), ("K", w_NK.shape[-1])):
        check_multiple(f"quant_128x128 input w{tuple(w_NK.shape)}", dim, size, "128x128 blocks")


def _empty_fp8(x: torch.Tensor, shape: tuple, scale_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(shape, dtype=FP8_DTYPE, device=x.device)
    return q, torch.empty(scale_shape, dtype=torch.float32, device=x.device)


def _swap(shape: tuple, transpose: bool) -> tuple:
    """The shape with its last two dims swapped when transposed."""
    return (*shape[:-2], shape[-1], shape[-2]) if transpose else tuple(shape)


def _strides_2d(t: torch.Tensor, transpose: bool) -> tuple[int, int]:
    """(row, column) strides of the untransposed view of an output written transposed or not."""
    return (t.stride(-1), t.stride(-2)) if transpose else (t.stride(-2), t.stride(-1))


# ------------------------------------------------------------------------------------------------------ launchers
def quant_1x128_triton(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton 1x128 quantizer: x[M, K] (K % 128 == 0) -> (q[M, K] e4m3, scale[M, K/128] fp32)."""
    _check_1x128(x_MK)
    M, K = x_MK.shape
    q_MK, s_MKb = _empty_fp8(x_MK, (M, K), (M, K // BLOCK))
    block_m = 32 if compiled(x_MK) else 128  # the interpreter pays per program, a GPU per register
    if M > 0:
        _quant_1x128_kernel[(triton.cdiv(M, block_m), K // BLOCK)](
            x_MK, q_MK, s_MKb, M, K, BLOCK_M=block_m, EPS=AMAX_EPS, enable_fp_fusion=FP_FUSION)
    return q_MK, s_MKb


def quant_128x1_triton(x_MK: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton 128x1 quantizer: x[M, K] (M % 128 == 0) -> (q[M, K] e4m3, scale[M/128, K] fp32), or with transpose
    (q[K, M], scale[K, M/128] a view of the [M/128, K] buffer): the 1x128 tiles of xᵀ, K-major for the weight-gradient
    GEMM."""
    _check_128x1(x_MK)
    M, K = x_MK.shape
    q, s_MbK = _empty_fp8(x_MK, _swap((M, K), transpose), (M // BLOCK, K))
    block_k = 32 if compiled(x_MK) else 128
    if M > 0 and K > 0:
        _quant_128x1_kernel[(M // BLOCK, triton.cdiv(K, block_k))](
            x_MK, q, s_MbK, M, K, *_strides_2d(q, transpose), BLOCK_K=block_k, EPS=AMAX_EPS,
            enable_fp_fusion=FP_FUSION)
    return q, (s_MbK.t() if transpose else s_MbK)


def quant_128x128_triton(w_NK: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton 128x128 quantizer: w[(E,) N, K] (N, K % 128 == 0) -> (q[(E,) N, K] e4m3, scale[(E,) N/128, K/128]
    fp32), or with transpose (q[(E,) K, N], scale[(E,) K/128, N/128]): Wᵀ's blocks, K-major for the dgrad GEMM."""
    _check_128x128(w_NK)
    (N, K), E = w_NK.shape[-2:], (w_NK.shape[0] if w_NK.dim() == 3 else 1)
    q, s = _empty_fp8(w_NK, _swap(w_NK.shape, transpose), _swap((*w_NK.shape[:-2], N // BLOCK, K // BLOCK), transpose))
    if N > 0 and K > 0 and E > 0:
        _quant_128x128_kernel[(N // BLOCK, K // BLOCK, E)](
            w_NK, q, s, N, K, *_strides_2d(q, transpose), *_strides_2d(s, transpose), EPS=AMAX_EPS, num_warps=8,
            enable_fp_fusion=FP_FUSION)
    return q, s


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


def _transposed(q: torch.Tensor, s: torch.Tensor, transpose: bool, s_view: bool = False) -> tuple:
    """The transposed layout of the Triton launchers: q copied, s copied (or a view where they return one)."""
    if not transpose:
        return q, s
    s_t = s.transpose(-1, -2)
    return q.transpose(-1, -2).contiguous(), (s_t if s_view else s_t.contiguous())


def quant_128x1_ref(x_MK: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of quant_128x1 (same bytes)."""
    _check_128x1(x_MK)
    M, K = x_MK.shape
    x_MbBK = x_MK.float().view(M // BLOCK, BLOCK, K)
    s_MbK = _scale_ref(x_MbBK.abs().amax(dim=1))
    return _transposed(_cast_ref(x_MbBK / s_MbK[:, None, :]).view(M, K), s_MbK, transpose, s_view=True)


def quant_128x128_ref(w_NK: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of quant_128x128 (same bytes)."""
    _check_128x128(w_NK)
    lead, (N, K) = w_NK.shape[:-2], w_NK.shape[-2:]
    w_NbBKbB = w_NK.float().view(*lead, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    s_NbKb = _scale_ref(w_NbBKbB.abs().amax(dim=(-3, -1)))
    q = _cast_ref(w_NbBKbB / s_NbKb[..., :, None, :, None]).view(w_NK.shape)
    return _transposed(q, s_NbKb, transpose)


# ------------------------------------------------------------------------------------------------------- dispatch
def quant_1x128(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, per 128 columns: x[M, K] -> (q[M, K] e4m3, scale[M, K/128] fp32). K % 128 == 0."""
    return quant_1x128_triton(x_MK) if use_triton(x_MK) else quant_1x128_ref(x_MK)


def quant_128x1(x_MK: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128 rows, per column (weight-gradient operands): x[M, K] -> (q[M, K], scale[M/128, K]), or transposed
    (q[K, M], scale[K, M/128]). M % 128 == 0."""
    fn = quant_128x1_triton if use_triton(x_MK) else quant_128x1_ref
    return fn(x_MK, transpose)


def quant_128x128(w_NK: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block (weights): w[(E,) N, K] -> (q[(E,) N, K] e4m3, scale[(E,) N/128, K/128] fp32), or
    transposed (q[(E,) K, N], scale[(E,) K/128, N/128]). N, K % 128 == 0."""
    fn = quant_128x128_triton if use_triton(w_NK) else quant_128x128_ref
    return fn(w_NK, transpose)
