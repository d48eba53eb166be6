"""FP8 linear layers: all three GEMMs of y = x·Wᵀ in e4m3 with fine-grained scales, as DeepSeek-V3.

  fprop  y  = x(1x128) · W(128x128)ᵀ
  dgrad  dx = dy(1x128) · W(128x128)          (W's 128x128 blocks written transposed: Wᵀ[K, N], the same bytes)
  wgrad  dW = dy(128x1)ᵀ · x(128x1)           (both quantized in 128-token blocks along the reduced token dim and
                                               written transposed, token-contiguous)
Every GEMM thus reads both operands contiguous along its reduced dim (K-major; hai.kernels.gemm).

The activation cache is V3's (§3.3.2, and its note on the transposed-GEMM workflow): the input is quantized once in
1x128 tiles for fprop and that FP8 copy (1 byte per element + one fp32 scale per 128) is what the backward keeps
(:class:`Fp8Rows`); the wgrad dequantizes it and re-quantizes in 128x1 tiles. The weight is kept by reference and
re-quantized 128x128 in the backward (deterministic: the same bytes as forward's) instead of an FP8 copy per
micro-batch.

The functional pieces (``quantize_rows``, ``fp8_fprop``/``fp8_dgrad``/``fp8_wgrad`` and their grouped forms) are
what the recompute regions of ``hai.model`` call directly; ``fp8_linear`` / ``fp8_grouped_linear`` are the autograd
layers built from them.

Any K, N and token count work: they are zero-padded to multiples of 128 internally (zero rows/columns add exact zeros
to every product and do not change any non-zero block's amax), and outputs are sliced back. Inputs of any float dtype;
y and dx come back in x's dtype, dW in the weight's dtype (computed in fp32). Autocast is off inside: the FP8 GEMMs
choose their own precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ._common import BLOCK, pad_2d, round_up, to_device
from .gemm import fp8_gemm, fp8_grouped_gemm, fp8_k_grouped_gemm
from .quant import quant_1x128, quant_128x1, quant_128x128

__all__ = ["fp8_linear", "fp8_grouped_linear", "Fp8Rows", "quantize_rows", "fp8_fprop", "fp8_dgrad", "fp8_wgrad",
           "fp8_grouped_fprop", "fp8_grouped_dgrad", "fp8_grouped_wgrad", "expert_counts"]

Counts = Union[Sequence[int], torch.Tensor]


def _quant_input(t: torch.Tensor) -> torch.Tensor:
    """Quantizers read fp32/bf16/fp16; anything else (fp64) is read as fp32."""
    return t if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t.float()


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype} {tuple(t.shape)}")


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


# ------------------------------------------------------------------------------------------------ cached inputs
@dataclass
class Fp8Rows:
    """An activation x[M, K] kept as 1x128 e4m3 tiles: q[M, Kp] e4m3, s[M, Kp/128] fp32 (Kp = K padded to 128)."""

    q: torch.Tensor
    s: torch.Tensor
    K: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.s.numel() * self.s.element_size()

    def dequant(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        M, Kp = self.q.shape
        x = (self.q.float().view(M, Kp // BLOCK, BLOCK) * self.s[:, :, None]).view(M, Kp)[:, :self.K]
        return x.to(dtype or self.dtype)


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """x[..., K] -> 1x128 tiles of x[M, K] (M = all leading dims)."""
    x_MK = _quant_input(x.reshape(-1, x.shape[-1]))
    M, K = x_MK.shape
    q, s = quant_1x128(pad_2d(x_MK, M, round_up(K)))
    return Fp8Rows(q, s, K, x.dtype)


def _weight_blocks(w_NK: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks of W padded to 128: (w_q[Np, Kp], w_s[Np/128, Kp/128]), or Wᵀ's with transpose."""
    N, K = w_NK.shape
    return quant_128x128(pad_2d(_quant_input(w_NK), round_up(N), round_up(K)), transpose)


def _tokens_128x1(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x1 tiles (weight-gradient operand) of x[M, K], rows and columns padded to 128, written transposed:
    (xᵀ_q[Kp, Mp], xᵀ_s[Kp, Mp/128])."""
    M, K = x_MK.shape
    return quant_128x1(pad_2d(_quant_input(x_MK), round_up(M), round_up(K)), transpose=True)


# --------------------------------------------------------------------------------------------- dense functional
def fp8_fprop(x: Fp8Rows, w_NK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """y[M, N] = x · Wᵀ from the 1x128 tiles of x."""
    w_q, w_s = _weight_blocks(w_NK)
    return fp8_gemm(x.q, x.s, w_q, w_s, _gemm_dtype(out_dtype))[:, :w_NK.shape[0]].to(out_dtype).contiguous()


def fp8_dgrad(dy_MN: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """dx[M, K] = dy · W: dy in 1x128 tiles, W's 128x128 blocks written transposed (Wᵀ[K, N])."""
    (N, K), M = w_NK.shape, dy_MN.shape[0]
    dy_q, dy_s = quant_1x128(pad_2d(_quant_input(dy_MN), M, round_up(N)))
    wt_q, wt_s = _weight_blocks(w_NK, transpose=True)
    return fp8_gemm(dy_q, dy_s, wt_q, wt_s, _gemm_dtype(out_dtype))[:, :K].to(out_dtype).contiguous()


def fp8_wgrad(dy_MN: torch.Tensor, x: Fp8Rows | torch.Tensor) -> torch.Tensor:
    """dW[N, K] (fp32) = dyᵀ · x, both in 128x1 tiles written token-contiguous (x re-quantized from its 1x128 cache
    when given one)."""
    x_MK = x.dequant(torch.float32) if isinstance(x, Fp8Rows) else x.reshape(-1, x.shape[-1])
    N, K = dy_MN.shape[1], x_MK.shape[1]
    dyt_q, dyt_s = _tokens_128x1(dy_MN)
    xt_q, xt_s = _tokens_128x1(x_MK)
    return fp8_gemm(dyt_q, dyt_s, xt_q, xt_s, torch.float32)[:N, :K]


# ------------------------------------------------------------------------------------------- dense autograd layer
class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with _no_autocast(x):
            cache = quantize_rows(x)
            y = fp8_fprop(cache, weight, x.dtype)
        keep = ctx.needs_input_grad[1]  # the cached input serves the weight gradient only
        ctx.save_for_backward(cache.q if keep else None, cache.s if keep else None, weight)
        ctx.x_meta = (x.shape, x.dtype, cache.K)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, s, weight = ctx.saved_tensors
        x_shape, x_dtype, K = ctx.x_meta
        dy_MN = dy.reshape(-1, weight.shape[0])
        dx = dw = None
        with _no_autocast(dy):
            if ctx.needs_input_grad[0]:
                dx = fp8_dgrad(dy_MN, weight, x_dtype).reshape(x_shape)
            if ctx.needs_input_grad[1]:
                dw = fp8_wgrad(dy_MN, Fp8Rows(q, s, K, x_dtype)).to(weight.dtype).contiguous()
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[..., N] = x[..., K] · weight[N, K]ᵀ (nn.Linear convention, no bias) with FP8 fprop, dgrad and wgrad.

    Returns x's dtype. Keeps x as 1x128 e4m3 tiles (+ fp32 scales) and the weight by reference (module docstring)."""
    _check_float("fp8_linear x", x)
    _check_float("fp8_linear weight", weight)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear needs x[..., K] and weight[N, K]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}: weight must be 2-D with weight.shape[1] == x.shape[-1]")
    return _Fp8LinearFn.apply(x, weight)


# ------------------------------------------------------------------------------------------- grouped functional
def expert_counts(tokens_per_expert: Counts, experts: int, rows: int, name: str = "fp8_grouped_linear") -> tuple:
    """Validated per-expert row counts as a tuple of ints (one host read for a device tensor)."""
    counts = tuple(int(c) for c in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
                                    else tokens_per_expert))
    if len(counts) != experts or any(c < 0 for c in counts) or sum(counts) != rows:
        raise ValueError(f"{name}: tokens_per_expert={list(counts)} must have E={experts} non-negative entries "
                         f"summing to T={rows}")
    return counts


def _aligned_layout(counts: Sequence[int], device: torch.device) -> tuple[torch.Tensor, list[int], int]:
    """Row map from the packed per-expert layout to one where every expert starts on a 128-row boundary: built on
    the device from the experts' end rows and start shifts (2E int64 copied from pinned memory, not T)."""
    ends, shifts, row, dst_row, aligned = [], [], 0, 0, []
    for c in counts:
        aligned.append(round_up(c))
        shifts.append(dst_row - row)  # how far this expert's rows move
        row, dst_row = row + c, dst_row + aligned[-1]
        ends.append(row)
    ends_E, shift_E = to_device(torch.tensor([ends, shifts], dtype=torch.int64, device="cpu"), device)
    t_T = torch.arange(row, dtype=torch.int64, device=device)
    dst_T = t_T + shift_E[torch.searchsorted(ends_E, t_T, right=True)]  # expert of row t: first end > t
    return dst_T, aligned, dst_row


def _scatter_rows(t_TC: torch.Tensor, dst_T: torch.Tensor, rows: int) -> torch.Tensor:
    out = t_TC.new_zeros((rows, t_TC.shape[1]))
    out[dst_T] = t_TC
    return out


def _quant_experts(w_ENK: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 quantization per expert: -> (w_q[E, Np, Kp], w_s[E, Np/128, Kp/128]), or each expert's Wᵀ with
    transpose (w_q[E, Kp, Np], w_s[E, Kp/128, Np/128])."""
    N, K = w_ENK.shape[1:]
    w = torch.nn.functional.pad(_quant_input(w_ENK), (0, round_up(K) - K, 0, round_up(N) - N))
    return quant_128x128(w.contiguous(), transpose)


def fp8_grouped_fprop(x: Fp8Rows, w_ENK: torch.Tensor, counts: Sequence[int], out_dtype: torch.dtype) -> torch.Tensor:
    """y[T, N]: expert e's rows of x (1x128 tiles) times w[e]ᵀ."""
    w_q, w_s = _quant_experts(w_ENK)
    y = fp8_grouped_gemm(x.q, x.s, w_q, w_s, counts, _gemm_dtype(out_dtype))
    return y[:, :w_ENK.shape[1]].to(out_dtype).contiguous()


def fp8_grouped_dgrad(dy_TN: torch.Tensor, w_ENK: torch.Tensor, counts: Sequence[int],
                      out_dtype: torch.dtype) -> torch.Tensor:
    """dx[T, K]: expert e's rows of dy (1x128 tiles) times w[e], each expert's 128x128 blocks written transposed."""
    (_, N, K), T = w_ENK.shape, dy_TN.shape[0]
    dy_q, dy_s = quant_1x128(pad_2d(_quant_input(dy_TN), T, round_up(N)))
    wt_q, wt_s = _quant_experts(w_ENK, transpose=True)
    dx = fp8_grouped_gemm(dy_q, dy_s, wt_q, wt_s, counts, _gemm_dtype(out_dtype))
    return dx[:, :K].to(out_dtype).contiguous()


def fp8_grouped_wgrad(dy_TN: torch.Tensor, x: Fp8Rows | torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """dW[E, N, K] (fp32): per expert dy_eᵀ · x_e, both in 128x1 tiles written token-contiguous, with each
    expert's tokens padded to 128."""
    x_TK = x.dequant(torch.float32) if isinstance(x, Fp8Rows) else x
    N, K = dy_TN.shape[1], x_TK.shape[1]
    dst_T, aligned, Tp = _aligned_layout(counts, dy_TN.device)
    dyt_q, dyt_s = quant_128x1(_scatter_rows(pad_2d(_quant_input(dy_TN), dy_TN.shape[0], round_up(N)), dst_T, Tp),
                               transpose=True)
    xt_q, xt_s = quant_128x1(_scatter_rows(pad_2d(_quant_input(x_TK), x_TK.shape[0], round_up(K)), dst_T, Tp),
                             transpose=True)
    return fp8_k_grouped_gemm(dyt_q, dyt_s, xt_q, xt_s, aligned, torch.float32)[:, :N, :K]


# ----------------------------------------------------------------------------------------- grouped autograd layer
class _Fp8GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TK: torch.Tensor, w_ENK: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        with _no_autocast(x_TK):
            cache = quantize_rows(x_TK)
            y = fp8_grouped_fprop(cache, w_ENK, counts, x_TK.dtype)
        keep = ctx.needs_input_grad[1]
        ctx.save_for_backward(cache.q if keep else None, cache.s if keep else None, w_ENK)
        ctx.meta = (counts, x_TK.dtype, cache.K)
        return y.contiguous()

    @staticmethod
    def backward(ctx, dy_TN: torch.Tensor):
        q, s, w_ENK = ctx.saved_tensors
        counts, x_dtype, K = ctx.meta
        dx = dw = None
        with _no_autocast(dy_TN):
            if ctx.needs_input_grad[0]:
                dx = fp8_grouped_dgrad(dy_TN, w_ENK, counts, x_dtype)
            if ctx.needs_input_grad[1]:
                dw = fp8_grouped_wgrad(dy_TN, Fp8Rows(q, s, K, x_dtype), counts).to(w_ENK.dtype).contiguous()
        return dx, dw, None


def fp8_grouped_linear(x_TK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert: Counts) -> torch.Tensor:
    """y[T, N]: expert e applies w[e] (nn.Linear convention [N, K]) to its rows of x[T, K], which arrive contiguous
    per expert with tokens_per_expert[e] rows (zero allowed). FP8 fprop, dgrad and wgrad as fp8_linear; wgrad pads
    each expert's tokens to a multiple of 128. tokens_per_expert is read on the host (one sync for a device tensor)."""
    _check_float("fp8_grouped_linear x_TK", x_TK)
    _check_float("fp8_grouped_linear w_ENK", w_ENK)
    if x_TK.dim() != 2 or w_ENK.dim() != 3 or x_TK.shape[1] != w_ENK.shape[2]:
        raise ValueError(f"fp8_grouped_linear needs x[T, K] and w[E, N, K]; got x {tuple(x_TK.shape)}, w "
                         f"{tuple(w_ENK.shape)}: flatten tokens to 2-D and match K")
    counts = expert_counts(tokens_per_expert, w_ENK.shape[0], x_TK.shape[0])
    return _Fp8GroupedLinearFn.apply(x_TK, w_ENK, counts)
