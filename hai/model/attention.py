"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Queries: optional low-rank compression (q_lora_rank; null in DeepSeek-V2-Lite). Keys/values: one joint latent
c_kv of kv_lora_rank (RMSNorm'd) up-projected per head into k_nope and v, plus a decoupled RoPE key of
qk_rope_head_dim shared by all heads. For inference only the latent and the RoPE key are cached
((kv_lora_rank + qk_rope_head_dim) values per token per layer), and decoding absorbs the key up-projection into the
query and the value up-projection into the output, so the cache is never expanded.

Legend: B batch, S query length, L key length, H heads, C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim,
V v_head_dim, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hai.config import ModelConfig
from hai.model.layers import Linear, RMSNorm, apply_rope, rope_cos_sin

__all__ = ["MLA", "KVCache"]


@dataclass
class KVCache:
    """Per-layer latent cache: c_kv (B, L, C) and the roped shared key k_pe (B, L, R)."""

    c_kv: list = field(default_factory=list)
    k_pe: list = field(default_factory=list)

    def length(self, layer: int) -> int:
        return 0 if layer >= len(self.c_kv) else self.c_kv[layer].shape[1]

    def append(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.c_kv):
            self.c_kv.append(c_kv)
            self.k_pe.append(k_pe)
        else:
            self.c_kv[layer] = torch.cat([self.c_kv[layer], c_kv], dim=1)
            self.k_pe[layer] = torch.cat([self.k_pe[layer], k_pe], dim=1)
        return self.c_kv[layer], self.k_pe[layer]

    def bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        return sum((c.shape[-1] + k.shape[-1]) * bytes_per_elem for c, k in zip(self.c_kv, self.k_pe))


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, N, R, V, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        fp8 = cfg.precision == "fp8"
        if cfg.q_lora_rank is None:
            self.wq = Linear(cfg.hidden_size, H * (N + R), fp8)
        else:
            self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank, fp8)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, H * (N + R), fp8)
        self.wkv_a = Linear(cfg.hidden_size, C + R, fp8)
        self.kv_norm = RMSNorm(C, cfg.rms_norm_eps)
        self.wkv_b = Linear(C, H * (N + V), fp8)
        self.wo = Linear(H * V, cfg.hidden_size, fp8)
        self.softmax_scale = (N + R) ** -0.5

    def _queries(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank is None:
            q = self.wq(x_BSD)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        B, S, _ = x_BSD.shape
        return q.view(B, S, self.cfg.num_heads, self.cfg.qk_head_dim)

    def _latent(self, x_BSD: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        C = self.cfg.kv_lora_rank
        kv = self.wkv_a(x_BSD)
        c_kv_BSC = self.kv_norm(kv[..., :C])
        k_pe_BSR = apply_rope(kv[..., C:].unsqueeze(2), cos, sin).squeeze(2)
        return c_kv_BSC, k_pe_BSR

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Causal self-attention over x. With ``cache``, x continues the cached sequence (absorbed decode)."""
        B, S, _ = x_BSD.shape
        start = 0 if cache is None else cache.length(layer)
        cos, sin = rope_cos_sin(S, self.cfg.qk_rope_head_dim, self.cfg.rope_theta, x_BSD.device, offset=start)
        N = self.cfg.qk_nope_head_dim
        q_BSHK = self._queries(x_BSD)
        q_nope, q_pe = q_BSHK[..., :N], apply_rope(q_BSHK[..., N:], cos, sin)
        c_kv, k_pe = self._latent(x_BSD, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.append(layer, c_kv, k_pe)
            return self._absorbed(q_nope, q_pe, c_kv, k_pe, start)
        return self._expanded(q_nope, q_pe, c_kv, k_pe)

    def _expanded(self, q_nope, q_pe, c_kv_BLC, k_pe_BLR) -> torch.Tensor:
        """Training path: up-project the latent to per-head keys/values and run causal SDPA."""
        H, N, V = self.cfg.num_heads, self.cfg.qk_nope_head_dim, self.cfg.v_head_dim
        B, L, _ = c_kv_BLC.shape
        kv = self.wkv_b(c_kv_BLC).view(B, L, H, N + V)
        k_nope, v_BLHV = kv[..., :N], kv[..., N:]
        k_BLHK = torch.cat([k_nope, k_pe_BLR.unsqueeze(2).expand(B, L, H, -1)], dim=-1)
        q_BSHK = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(
            q_BSHK.transpose(1, 2), k_BLHK.transpose(1, 2), v_BLHV.transpose(1, 2),
            is_causal=True, scale=self.softmax_scale,
        )  # (B, H, S, V)
        return self.wo(o.transpose(1, 2).flatten(2))

    def _absorbed(self, q_nope, q_pe, c_kv_BLC, k_pe_BLR, start: int) -> torch.Tensor:
        """Decode path: scores and outputs computed against the latent cache without expanding it."""
        H, N, V, C = self.cfg.num_heads, self.cfg.qk_nope_head_dim, self.cfg.v_head_dim, self.cfg.kv_lora_rank
        w = self.wkv_b.weight.view(H, N + V, C)
        q_lat_BSHC = torch.einsum("bshn,hnc->bshc", q_nope.float(), w[:, :N].float())
        scores = (torch.einsum("bshc,blc->bshl", q_lat_BSHC, c_kv_BLC.float())
                  + torch.einsum("bshr,blr->bshl", q_pe.float(), k_pe_BLR.float())) * self.softmax_scale
        S, L = q_nope.shape[1], c_kv_BLC.shape[1]
        q_pos = torch.arange(start, start + S, device=scores.device)[:, None]
        mask = torch.arange(L, device=scores.device)[None, :] > q_pos  # (S, L)
        scores = scores.masked_fill(mask[None, :, None, :], float("-inf")).softmax(dim=-1)
        o_lat_BSHC = torch.einsum("bshl,blc->bshc", scores, c_kv_BLC.float())
        o_BSHV = torch.einsum("bshc,hvc->bshv", o_lat_BSHC, w[:, N:].float())
        return self.wo(o_BSHV.flatten(2).type_as(q_nope))
