"""FP8 linear layers (autograd): all three GEMMs of y = x·Wᵀ in e4m3 with fine-grained scales, as DeepSeek-V3.

  fprop  y  = x(1x128) · W(128x128)ᵀ
  dgrad  dx = dy(1x128) · W(128x128)          (W's bytes and transposed block scales, no re-quantization of Wᵀ)
  wgrad  dW = dy(128x1)ᵀ · x(128x1)           (both quantized in 128-token blocks along the reduced token dim)

Saved for backward (per call): x quantized 128x1 along tokens in e4m3 (1 byte/element + one fp32 scale per 128
tokens per channel), quantized once from the original x in forward — not re-quantized from the 1x128 copy, so wgrad
sees a single rounding — and the weight by reference; W is re-quantized 128x128 in backward (deterministic, so the
bytes equal forward's) instead of keeping an FP8 copy per micro-batch alive.

Any K, N and token count work: they are zero-padded to multiples of 128 internally (zero rows/columns add exact zeros
to every product and do not change any non-zero block's amax), and outputs are sliced back. Inputs of any float dtype;
y and dx come back in x's dtype, dW in the weight's dtype (computed in fp32).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ._common import BLOCK, pad_2d, round_up
from .gemm import fp8_gemm, fp8_grouped_gemm, fp8_k_grouped_gemm
from .quant import quant_1x128, quant_128x1, quant_128x128

__all__ = ["fp8_linear", "fp8_grouped_linear"]

Counts = Union[Sequence[int], torch.Tensor]


def _quant_input(t: torch.Tensor) -> torch.Tensor:
    """Quantizers read fp32/bf16/fp16; anything else (fp64) is read as fp32."""
    return t if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t.float()


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype} {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------------------- dense
class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        (N, K), x_MK = weight.shape, _quant_input(x.reshape(-1, x.shape[-1]))
        M, Kp, Np = x_MK.shape[0], round_up(K), round_up(N)
        x_MKp = pad_2d(x_MK, M, Kp)
        x_q, x_s = quant_1x128(x_MKp)
        w_q, w_s = quant_128x128(pad_2d(_quant_input(weight), Np, Kp))
        y_MN = fp8_gemm(x_q, x_s, w_q, w_s, _gemm_dtype(x.dtype))[:, :N]
        xt_q = xt_s = None
        if ctx.needs_input_grad[1]:
            xt_q, xt_s = quant_128x1(pad_2d(x_MKp, round_up(M), Kp))  # saved for wgrad: FP8 + scales
        ctx.save_for_backward(xt_q, xt_s, weight)
        ctx.x_meta = (x.shape, x.dtype)
        return y_MN.to(x.dtype).contiguous().reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xt_q, xt_s, weight = ctx.saved_tensors
        (x_shape, x_dtype), (N, K) = ctx.x_meta, weight.shape
        dy_MN = _quant_input(dy.reshape(-1, N))
        M, Kp, Np = dy_MN.shape[0], round_up(K), round_up(N)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = quant_1x128(pad_2d(dy_MN, M, Np))
            w_q, w_s = quant_128x128(pad_2d(_quant_input(weight), Np, Kp))
            dx = fp8_gemm(dy_q, dy_s, w_q.t(), w_s.t(), _gemm_dtype(x_dtype))[:, :K]
            dx = dx.to(x_dtype).contiguous().reshape(x_shape)
        if ctx.needs_input_grad[1]:
            dyt_q, dyt_s = quant_128x1(pad_2d(dy_MN, round_up(M), Np))
            dw = fp8_gemm(dyt_q.t(), dyt_s.t(), xt_q.t(), xt_s.t(), torch.float32)[:N, :K]
            dw = dw.to(weight.dtype).contiguous()
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[..., N] = x[..., K] · weight[N, K]ᵀ (nn.Linear convention, no bias) with FP8 fprop, dgrad and wgrad.

    Returns x's dtype. Saves x as e4m3 128x1 (+ fp32 scales) and the weight by reference (module docstring)."""
    _check_float("fp8_linear x", x)
    _check_float("fp8_linear weight", weight)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear needs x[..., K] and weight[N, K]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}: weight must be 2-D with weight.shape[1] == x.shape[-1]")
    return _Fp8LinearFn.apply(x, weight)


# ------------------------------------------------------------------------------------------------------- experts
def _aligned_layout(counts: Sequence[int], device: torch.device) -> tuple[torch.Tensor, list[int], int]:
    """Row map from the packed per-expert layout to one where every expert starts on a 128-row boundary."""
    counts_E = torch.tensor(list(counts), dtype=torch.int64)
    aligned_E = (counts_E + BLOCK - 1) // BLOCK * BLOCK
    shift_E = (aligned_E.cumsum(0) - aligned_E) - (counts_E.cumsum(0) - counts_E)  # start moves per expert
    dst_T = torch.arange(int(counts_E.sum()), dtype=torch.int64) + torch.repeat_interleave(shift_E, counts_E)
    return dst_T.to(device), aligned_E.tolist(), int(aligned_E.sum())


def _scatter_rows(t_TC: torch.Tensor, dst_T: torch.Tensor, rows: int) -> torch.Tensor:
    out = t_TC.new_zeros((rows, t_TC.shape[1]))
    out[dst_T] = t_TC
    return out


def _quant_experts(w_ENK: torch.Tensor, Np: int, Kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 quantization per expert: -> (w_q[E, Np, Kp], w_s[E, Np/128, Kp/128])."""
    E, N, K = w_ENK.shape
    w = torch.nn.functional.pad(_quant_input(w_ENK), (0, Kp - K, 0, Np - N)).reshape(E * Np, Kp)
    w_q, w_s = quant_128x128(w)
    return w_q.view(E, Np, Kp), w_s.view(E, Np // BLOCK, Kp // BLOCK)


class _Fp8GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TK: torch.Tensor, w_ENK: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        (T, K), (E, N, _) = x_TK.shape, w_ENK.shape
        Kp, Np = round_up(K), round_up(N)
        x_TKp = pad_2d(_quant_input(x_TK), T, Kp)
        x_q, x_s = quant_1x128(x_TKp)
        w_q, w_s = _quant_experts(w_ENK, Np, Kp)
        y_TN = fp8_grouped_gemm(x_q, x_s, w_q, w_s, counts, _gemm_dtype(x_TK.dtype))[:, :N]
        xt_q = xt_s = None
        if ctx.needs_input_grad[1]:
            dst_T, _, Tp = _aligned_layout(counts, x_TK.device)
            xt_q, xt_s = quant_128x1(_scatter_rows(x_TKp, dst_T, Tp))  # 128-token blocks never span experts
        ctx.save_for_backward(xt_q, xt_s, w_ENK)
        ctx.meta = (counts, x_TK.dtype)
        return y_TN.to(x_TK.dtype).contiguous()

    @staticmethod
    def backward(ctx, dy_TN: torch.Tensor):
        xt_q, xt_s, w_ENK = ctx.saved_tensors
        (counts, x_dtype), (E, N, K) = ctx.meta, w_ENK.shape
        Kp, Np, T = round_up(K), round_up(N), dy_TN.shape[0]
        dy_TNp = pad_2d(_quant_input(dy_TN), T, Np)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = quant_1x128(dy_TNp)
            w_q, w_s = _quant_experts(w_ENK, Np, Kp)
            dx = fp8_grouped_gemm(dy_q, dy_s, w_q.transpose(1, 2), w_s.transpose(1, 2), counts,
                                  _gemm_dtype(x_dtype))[:, :K].to(x_dtype).contiguous()
        if ctx.needs_input_grad[1]:
            dst_T, aligned, Tp = _aligned_layout(counts, dy_TN.device)
            dyt_q, dyt_s = quant_128x1(_scatter_rows(dy_TNp, dst_T, Tp))
            dw = fp8_k_grouped_gemm(dyt_q.t(), dyt_s.t(), xt_q.t(), xt_s.t(), aligned, torch.float32)
            dw = dw[:, :N, :K].to(w_ENK.dtype).contiguous()
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
    counts = [int(c) for c in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
                               else tokens_per_expert)]
    if len(counts) != w_ENK.shape[0] or any(c < 0 for c in counts) or sum(counts) != x_TK.shape[0]:
        raise ValueError(f"fp8_grouped_linear: tokens_per_expert={counts} must have E={w_ENK.shape[0]} "
                         f"non-negative entries summing to T={x_TK.shape[0]}")
    return _Fp8GroupedLinearFn.apply(x_TK, w_ENK, tuple(counts))
