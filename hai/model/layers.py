"""Small building blocks: RMSNorm, rotary embeddings, SwiGLU MLP, and the linear layer that honours precision.

Shape legend: B batch, S sequence, D hidden, H heads, F ffn width, T tokens (B*S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "Linear", "SwiGLU", "rope_cos_sin", "apply_rope"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose GEMM runs in FP8 (1x128 x 128x128 block scales) when ``fp8`` is set.

    The FP8 path is V3's recipe: the weight stays in high precision (master copy in the optimizer), and the three
    training GEMMs quantize their operands on the fly (see ``hai.kernels.fp8_linear``).
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


class SwiGLU(nn.Module):
    """Dense gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter: int, fp8: bool = False):
        super().__init__()
        self.w1 = Linear(dim, inter, fp8)
        self.w3 = Linear(dim, inter, fp8)
        self.w2 = Linear(inter, dim, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_cos_sin(seq_len: int, dim: int, theta: float, device=None, offset: int = 0) -> tuple[torch.Tensor, ...]:
    """cos/sin tables of shape (S, dim/2) for positions offset..offset+seq_len-1 (computed in float64, returned f32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float64, device=device)
    ang = torch.outer(pos, inv_freq)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x: (B, S, H, R) ; cos/sin: (S, R/2)."""
    x32 = x.float().unflatten(-1, (-1, 2))  # (B, S, H, R/2, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)
