"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Queries: optional low-rank compression (q_lora_rank; null in DeepSeek-V2-Lite). Keys/values: one joint latent
c_kv of kv_lora_rank (RMSNorm'd) up-projected per head into k_nope and v, plus a decoupled RoPE key of
qk_rope_head_dim shared by all heads. For inference only the latent and the RoPE key are cached
((kv_lora_rank + qk_rope_head_dim) values per token per layer), and decoding absorbs the key up-projection into the
query and the value up-projection into the output, so the cache is never expanded.

Training attention is flash-style (:func:`attention`): it keeps q, k, v, the output and one fp32 log-sum-exp per
(query, head) and recomputes the probabilities in the backward, query block by query block, so no S x S matrix is
ever kept. With ``recompute='v3'`` (DeepSeek-V3 §3.2.3) the block keeps even less: the attention RMSNorm and the
down-projections keep only the block input, and :class:`_MLACore` keeps the two latents, the attention output and
the log-sum-exp, recomputing the latent norms, the up-projections and RoPE in its backward.

Legend: B batch, S query length, L key length, H heads, C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim,
V v_head_dim, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hai.config import ModelConfig
from hai.model.layers import Linear, RMSNorm, apply_rope, rope_cos_sin, softmax_scale
from hai.model.recompute import LinearOp, norm_linears
from hai.model.regions import LOCAL, Region

__all__ = ["MLA", "KVCache", "attention", "attention_forward", "attention_backward"]


@dataclass
class KVCache:
    """Per-layer latent cache: c_kv (B, L, C) and the roped shared key k_pe (B, L, R), keyed by layer id (an MTP
    block keeps its own entry under its id)."""

    c_kv: dict = field(default_factory=dict)
    k_pe: dict = field(default_factory=dict)

    def length(self, layer: int) -> int:
        return self.c_kv[layer].shape[1] if layer in self.c_kv else 0

    def append(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.c_kv:
            self.c_kv[layer], self.k_pe[layer] = c_kv, k_pe
        else:
            self.c_kv[layer] = torch.cat([self.c_kv[layer], c_kv], dim=1)
            self.k_pe[layer] = torch.cat([self.k_pe[layer], k_pe], dim=1)
        return self.c_kv[layer], self.k_pe[layer]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer (a rejected speculative draft)."""
        for layer in self.c_kv:
            self.c_kv[layer] = self.c_kv[layer][:, :length]
            self.k_pe[layer] = self.k_pe[layer][:, :length]

    def bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        return sum((self.c_kv[i].shape[-1] + self.k_pe[i].shape[-1]) * bytes_per_elem for i in self.c_kv)


_Q_BLOCK = 256  # queries per block of the flash-style attention (bounds the transient scores to 256 x L per head)


def attention_forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q (B, S, H, K) over k (B, L, H, K), v (B, L, H, V) (queries are the last S positions):
    (o (B, S, H, V) in v's dtype, lse (B, H, S) fp32). Scores, softmax and the weighted sum in fp32."""
    B, S, H, _ = q.shape
    L = k.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, S|L, .)
        o = torch.empty(B, H, S, vh.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
        keys = torch.arange(L, device=q.device)
        for s0 in range(0, S, _Q_BLOCK):
            s1 = min(S, s0 + _Q_BLOCK)
            sc = (qh[:, :, s0:s1] @ kh.transpose(-1, -2)) * scale
            sc.masked_fill_(keys[None, :] > torch.arange(s0, s1, device=q.device)[:, None] + (L - S), float("-inf"))
            lse[:, :, s0:s1] = torch.logsumexp(sc, dim=-1)
            o[:, :, s0:s1] = torch.exp(sc - lse[:, :, s0:s1, None]) @ vh
    return o.transpose(1, 2).to(v.dtype).contiguous(), lse  # contiguous: the out-projection input is a view of it


def attention_backward(q, k, v, o, lse, do, scale: float) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of :func:`attention_forward`, the probabilities recomputed from q, k and the log-sum-exp."""
    S, L = q.shape[1], k.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        qh, kh, vh, oh, doh = (t.transpose(1, 2).float() for t in (q, k, v, o, do))
        delta = (doh * oh).sum(-1)  # (B, H, S): rowsum(dO * O)
        dq, dk, dv = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
        keys = torch.arange(L, device=q.device)
        for s0 in range(0, S, _Q_BLOCK):
            s1 = min(S, s0 + _Q_BLOCK)
            sc = (qh[:, :, s0:s1] @ kh.transpose(-1, -2)) * scale
            sc.masked_fill_(keys[None, :] > torch.arange(s0, s1, device=q.device)[:, None] + (L - S), float("-inf"))
            p = torch.exp(sc - lse[:, :, s0:s1, None])
            do_b = doh[:, :, s0:s1]
            dv += p.transpose(-1, -2) @ do_b
            ds = p * (do_b @ vh.transpose(-1, -2) - delta[:, :, s0:s1, None])
            dq[:, :, s0:s1] = (ds @ kh) * scale
            dk += (ds.transpose(-1, -2) @ qh[:, :, s0:s1]) * scale
    return tuple(g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return (*attention_backward(q, k, v, o, lse, do, ctx.scale), None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal flash-style attention (module docstring): keeps q, k, v, o and the fp32 log-sum-exp."""
    return _FlashAttention.apply(q, k, v, scale)


class _MLACore(torch.autograd.Function):
    """Latents -> up-projections + RoPE -> attention -> output projection, keeping the latents, o and lse."""

    @staticmethod
    def forward(ctx, mla, q_in, kv, *weights):
        q, k, v = mla._qkv(q_in, kv)
        o, lse = attention_forward(q, k, v, mla.softmax_scale)
        y = mla.wo(o.flatten(2))
        ctx.save_for_backward(q_in, kv, o, lse)
        ctx.mla = mla
        return y

    @staticmethod
    def backward(ctx, dy):
        q_in, kv, o, lse = ctx.saved_tensors
        mla = ctx.mla
        do = mla.wo.backward(o.flatten(2), dy).view_as(o)
        with torch.enable_grad():
            q_leaf, kv_leaf = q_in.detach().requires_grad_(), kv.detach().requires_grad_()
            q, k, v = mla._qkv(q_leaf, kv_leaf)
            grads = attention_backward(q, k, v, o, lse, do, mla.softmax_scale)
            torch.autograd.backward([q, k, v], list(grads))
        return (None, q_leaf.grad, kv_leaf.grad, *([None] * (len(ctx.needs_input_grad) - 3)))


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
        self.softmax_scale = softmax_scale(cfg)
        self.n_heads = H  # heads on this rank (H / tp under tensor parallelism)
        self.tp: Region = LOCAL  # hai.model.regions: under TP heads split, latents replicated

    def _rope(self, S: int, device, offset: int):
        if offset + S > self.cfg.max_seq_len:
            raise ValueError(f"positions {offset}..{offset + S - 1} exceed model.max_seq_len={self.cfg.max_seq_len}: "
                             f"shorten the sequence (train.seq_len) or raise model.max_seq_len")
        return rope_cos_sin(S, self.cfg, device, offset)

    def _q_down(self) -> Linear:
        return self.wq if self.cfg.q_lora_rank is None else self.wq_a

    def _qkv(self, q_in: torch.Tensor, kv: torch.Tensor, offset: int = 0):
        """From the down-projections' outputs (q latent, or q without q_lora; [c_kv | k_pe]) to the attention's
        q (B, S, H, N+R), k (B, S, H, N+R) and v (B, S, H, V)."""
        H, N, R, V, C = (self.n_heads, self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim,
                         self.cfg.v_head_dim, self.cfg.kv_lora_rank)
        B, S, _ = kv.shape
        cos, sin = self._rope(S, kv.device, offset)
        q = q_in if self.cfg.q_lora_rank is None else self.wq_b(self.q_norm(q_in))
        q = q.view(B, S, H, N + R)
        q = torch.cat([q[..., :N], apply_rope(q[..., N:], cos, sin)], dim=-1)
        kvb = self.wkv_b(self.kv_norm(kv[..., :C])).view(B, S, H, N + V)
        k_pe = apply_rope(kv[..., C:].unsqueeze(2), cos, sin)
        k = torch.cat([kvb[..., :N], k_pe.expand(B, S, H, R)], dim=-1)
        return q, k, kvb[..., N:]

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Causal self-attention over x (already normed). With ``cache``, x continues the cached sequence (absorbed
        decode).

        Under tensor parallelism (``self.tp`` split) the down-projections run replicated on this rank's positions,
        the region is entered on their outputs (the latents, much narrower than the hidden state), this rank's heads
        attend, and the out-projection's partial sums leave the region; on one device both crossings are the
        identity."""
        if cache is not None:
            return self._decode(self._q_down()(x_BSD), self.wkv_a(x_BSD), cache, layer)
        kv = self.tp.enter(self.wkv_a(x_BSD))
        q_in = self.tp.enter(self.wq_a(x_BSD)) if self.cfg.q_lora_rank else self.wq(self.tp.enter(x_BSD))
        q, k, v = self._qkv(q_in, kv)
        o = attention(q, k, v, self.softmax_scale)
        return self.tp.exit(self.wo(o.flatten(2)))

    def forward_recompute(self, x_BSD: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """attn(norm(x)) under V3's recipe: keeps x, the latents, the attention output and the log-sum-exp."""
        if self.tp.split and self.cfg.q_lora_rank is None:  # wq is head-split: its input must enter first
            return self.forward(norm(x_BSD))
        ops = [LinearOp(m.forward, m.backward, m.weight) for m in (self._q_down(), self.wkv_a)]
        q_in, kv = norm_linears([x_BSD], [norm], ops)
        weights = [p for p in self.parameters() if p.requires_grad]
        q_in, kv = self.tp.enter(q_in), self.tp.enter(kv)
        return self.tp.exit(_MLACore.apply(self, q_in, kv, *weights))

    def _decode(self, q_in, kv, cache: KVCache, layer: int) -> torch.Tensor:
        """Decode path: scores and outputs computed against the latent cache without expanding it."""
        H, N, R, C = self.cfg.num_heads, self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim, self.cfg.kv_lora_rank
        B, S, _ = kv.shape
        start = cache.length(layer)
        cos, sin = self._rope(S, kv.device, start)
        q = (q_in if self.cfg.q_lora_rank is None else self.wq_b(self.q_norm(q_in))).view(B, S, H, N + R)
        q_nope, q_pe = q[..., :N], apply_rope(q[..., N:], cos, sin)
        c_kv = self.kv_norm(kv[..., :C])
        k_pe = apply_rope(kv[..., C:].unsqueeze(2), cos, sin).squeeze(2)
        c_kv, k_pe = cache.append(layer, c_kv, k_pe)
        return self._absorbed(q_nope, q_pe, c_kv, k_pe, start)

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
