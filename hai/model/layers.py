"""Small building blocks: RMSNorm, SwiGLU, rotary embeddings, and the linear layer that honours precision.

The elementwise pieces are fused autograd functions whose saved tensors are exactly their inputs (RMSNorm: the input
and one fp32 rstd per row; SwiGLU: its two inputs), so what a block keeps for the backward is the short list
the planner counts, on every device. ``Linear.backward`` is the layer's gradient for callers that keep (or
recompute) its input themselves: the recompute regions of :mod:`hai.model.recompute`.

Shape legend: B batch, S sequence, D hidden, H heads, F ffn width, T tokens (B*S).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hai.model.regions import LOCAL, Region
from hai.model.wgrad import accumulate_wgrad, defer_or_run

__all__ = ["RMSNorm", "Linear", "SwiGLU", "rope_cos_sin", "apply_rope", "rms_norm", "rms_norm_forward",
           "rms_norm_backward", "swiglu", "swiglu_forward", "swiglu_backward", "cross_entropy", "rope_inv_freq",
           "softmax_scale", "yarn_mscale", "compile_elementwise", "ELEMENTWISE"]


# ------------------------------------------------------------------------------------------ compiled elementwise
_COMPILED: dict[str, Callable] = {}  # name -> torch.compile'd function, while compile_elementwise(True) holds
ELEMENTWISE: list[Callable] = []  # the eager definitions compile_elementwise compiles


def _compilable(fn: Callable) -> Callable:
    """Route calls of ``fn`` (pure tensor math: no autograd inside, no data-dependent Python) to its compiled form
    while ``train.compile`` is on; ``.eager`` is the definition."""
    name = fn.__name__

    @functools.wraps(fn)
    def call(*args):
        return _COMPILED.get(name, fn)(*args)

    call.eager = fn
    ELEMENTWISE.append(fn)
    return call


def compile_elementwise(enabled: bool) -> None:
    """``train.compile``: the block's elementwise math (RMSNorm and SwiGLU forward and backward, RoPE) runs through
    ``torch.compile`` (inductor; one graph each, no breaks: ``fullgraph=True``; dynamic shapes, so the micro-batch,
    CP and MTP shapes share one kernel), or eagerly. Process-wide, like the compiled kernels themselves. The GEMMs,
    attention core, collectives and the autograd Functions around the math stay eager, so the zero-bubble weight
    split, the overlap tape and the recompute regions see the same tensors either way."""
    if _COMPILED:  # drop compiled code of an earlier setting (or inherited by a forked rank)
        _COMPILED.clear()
        torch._dynamo.reset()
    if enabled:
        for fn in ELEMENTWISE:
            _COMPILED[fn.__name__] = torch.compile(fn, fullgraph=True, dynamic=True)


# ------------------------------------------------------------------------------------------------------- RMSNorm
@_compilable
def rms_norm_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in x's dtype, rstd fp32 (..., 1)); computed in fp32."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * w.float()).to(x.dtype), rstd


@_compilable
def rms_norm_backward(x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor):
    """(dx in x's dtype, dw fp32) of y = x * rstd * w."""
    x_hat = x.float() * rstd
    dy32 = dy.float()
    dw = (dy32 * x_hat).reshape(-1, x.shape[-1]).sum(0)
    g = dy32 * w.float()
    dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps: float):
        y, rstd = rms_norm_forward(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(x, w, rstd, dy)
        return dx, dw.to(w.dtype), None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, output in x's dtype; keeps x and one fp32 rstd per row for the backward."""
    return _RMSNormFn.apply(x, w, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# -------------------------------------------------------------------------------------------------------- SwiGLU
@_compilable
def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.silu(a.float()) * b.float()).to(a.dtype)


@_compilable
def swiglu_backward(a: torch.Tensor, b: torch.Tensor, ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) of s = silu(a) * b, computed in fp32."""
    a32, ds32 = a.float(), ds.float()
    sig = torch.sigmoid(a32)
    da = ds32 * b.float() * sig * (1 + a32 * (1 - sig))
    db = ds32 * a32 * sig
    return da.to(a.dtype), db.to(b.dtype)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, ds):
        return swiglu_backward(*ctx.saved_tensors, ds)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (fp32 math), keeping only a and b for the backward."""
    return _SwiGLUFn.apply(a, b)


# -------------------------------------------------------------------------------------------------------- Linear
class Linear(nn.Linear):
    """``nn.Linear`` without bias whose GEMM runs in FP8 (1x128 x 128x128 block scales) when ``fp8`` is set.

    The FP8 path is V3's recipe: the weight stays in the module's precision (fp32 master copy in the optimizer), and
    the three training GEMMs quantize their operands on the fly (``hai.kernels.fp8_linear``). With a
    ``wgrad_store`` attached (the pipeline's zero-bubble split), the weight-gradient GEMM can be deferred.
    """

    def __init__(self, in_features: int, out_features: int, fp8: bool = False, dtype=None):
        super().__init__(in_features, out_features, bias=False, dtype=dtype)
        self.fp8 = fp8
        self.wgrad_store = None  # set by the pipeline for the zero-bubble weight-gradient split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            from hai.kernels import fp8_linear

            return fp8_linear(x, self.weight)
        if self.wgrad_store is not None:
            from hai.model.wgrad import deferred_linear

            return deferred_linear(x, self.weight, self.wgrad_store)
        return F.linear(x, self.weight)

    def backward(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """dx of y = self(x) given dy, for a caller that kept or recomputed x; the weight gradient goes into
        ``main_grad`` (or ``.grad``) now, or into the wgrad store when it is recording."""
        w = self.weight
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        if self.fp8:
            from hai.kernels import fp8_dgrad, fp8_wgrad

            with torch.autocast(dy.device.type, enabled=False):
                dx = fp8_dgrad(dy2, w, x.dtype)
            defer_or_run(self.wgrad_store, lambda: accumulate_wgrad(w, fp8_wgrad(dy2, x2)))
        else:
            dx = (dy2 @ w.to(dy2.dtype)).to(x.dtype)
            defer_or_run(self.wgrad_store, lambda: accumulate_wgrad(w, dy2.t().float() @ x2.float()))
        return dx.reshape(x.shape)


class SwiGLU(nn.Module):
    """Dense gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter: int, fp8: bool = False):
        super().__init__()
        self.w1 = Linear(dim, inter, fp8)
        self.w3 = Linear(dim, inter, fp8)
        self.w2 = Linear(inter, dim, fp8)
        self.tp: Region = LOCAL  # hai.model.regions: w1/w3 column-split, w2 row-split under TP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp.enter(x)
        return self.tp.exit(self.w2(swiglu(self.w1(x), self.w3(x))))


# ------------------------------------------------------------------------------------------------- cross-entropy
class _CrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy from logits in their own dtype (bf16 under V3's recipe), softmax in fp32;
    keeps the logits, one fp32 log-sum-exp and the target per row. A negative target is padding (MTP's shifted
    positions past the window under sequence or context parallelism): no loss, no gradient, not counted."""

    @staticmethod
    def forward(ctx, logits_TV, target_T):
        with torch.autocast(logits_TV.device.type, enabled=False):
            l32 = logits_TV.float()
            lse = torch.logsumexp(l32, dim=-1)
            tl = l32.gather(1, target_T.clamp_min(0)[:, None]).squeeze(1)
            valid = target_T >= 0
            loss = ((lse - tl) * valid).sum() / valid.sum().clamp_min(1)
        ctx.save_for_backward(logits_TV, lse, target_T)
        return loss

    @staticmethod
    def backward(ctx, g):
        logits, lse, target = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            p = torch.exp(logits.float() - lse[:, None])
            valid = target >= 0
            p[torch.arange(p.shape[0], device=p.device), target.clamp_min(0)] -= 1.0
            scale = valid.float() * (g / valid.sum().clamp_min(1))
            return (p * scale[:, None]).to(logits.dtype), None


def cross_entropy(logits_TV: torch.Tensor, target_T: torch.Tensor) -> torch.Tensor:
    return _CrossEntropy.apply(logits_TV, target_T)


# ---------------------------------------------------------------------------------------------------------- RoPE
def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(cfg, device=None) -> torch.Tensor:
    """RoPE inverse frequencies (float64) of the qk_rope_head_dim dims; with ``rope_factor > 1`` YaRN's
    (DeepSeek-V2/V3): interpolated by the factor below the correction range, extrapolated above, a linear ramp
    between (bounds from beta_fast / beta_slow rotations at the original context length)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    if cfg.rope_factor <= 1:
        return freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.rope_original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low)
            / ((high - low) if high != low else 0.001)).clamp(0, 1)
    extrapolate = 1.0 - ramp
    return freq / cfg.rope_factor * (1 - extrapolate) + freq * extrapolate


def rope_cos_sin(seq_len: int, cfg, device=None, offset: int = 0) -> tuple[torch.Tensor, ...]:
    """cos/sin tables (S, R/2) for positions offset..offset+seq_len-1 (float64 angles, returned fp32), scaled by
    YaRN's attention factor mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float64, device=device)
    ang = torch.outer(pos, rope_inv_freq(cfg, device))
    m = yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
    return (ang.cos() * m).float(), (ang.sin() * m).float()


def softmax_scale(cfg) -> float:
    """1/sqrt(qk head dim), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's definition)."""
    return (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * yarn_mscale(cfg.rope_factor,
                                                                                cfg.rope_mscale_all_dim) ** 2


@_compilable
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x: (B, S, H, R) ; cos/sin: (S, R/2), or (B, S, R/2) when the
    positions differ per sequence (``data.reset_positions``)."""
    x32 = x.float().unflatten(-1, (-1, 2))  # (B, S, H, R/2, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    c = cos[None, :, None, :] if cos.dim() == 2 else cos[:, :, None, :]
    s = sin[None, :, None, :] if sin.dim() == 2 else sin[:, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)
