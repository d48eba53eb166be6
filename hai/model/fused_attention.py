"""``model.attention=sdpa``: the attention core through PyTorch's fused scaled-dot-product-attention kernels.

Same contract as the reference (:func:`hai.model.attention.attention_forward` / ``attention_backward``): forward
returns (o (B, S, H, V), lse (B, H, S) fp32), backward takes the kept (q, k, v, o, lse) and the output gradient.
The fused kernels are the aten ops behind ``torch.nn.functional.scaled_dot_product_attention`` that also return
the log-sum-exp (the public function does not): ``_scaled_dot_product_flash_attention_for_cpu`` on CPU and the
memory-efficient kernel (``_scaled_dot_product_efficient_attention``, which takes q/k head dim 192 with v 128 and
an additive bias) on CUDA. The CPU kernel needs v's head dim equal to q/k's: v is zero-padded (o's padding is
zero and sliced off; the log-sum-exp does not depend on v).

Masks without materializing S x L: a run of n queries at global positions g0..g0+n-1 (``AttnMask.runs``) sees the
keys [0, g0) entirely and the keys [g0, g0+n) causally. The two blocks are two kernel calls (no mask, and a square
``is_causal`` one) merged with their log-sum-exps: lse = logaddexp(lse_1, lse_2), o = Σ_i exp(lse_i - lse) o_i.
Their backwards take the merged o and lse (the kernel forms P = exp(S - lse) and rowsum(dO · O) from them), so
each block's gradient is exact and dq is their sum. With documents (``AttnMask.q_seg``) a run is one call with an
additive mask of its (n, g0+n) block (causal and same document), as FlashAttention's varlen kernels avoid on GPU.

Legend: B batch, H heads, S queries, L keys, K q/k head dim, V v head dim.
"""

from __future__ import annotations

import torch

__all__ = ["sdpa_forward", "sdpa_backward"]


def _bhsk(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _bias(mask, q0: int, q1: int, g0: int, dtype, device) -> torch.Tensor:
    bad = mask.block(q0, q1, g0, device)
    return torch.zeros(bad.shape, dtype=dtype, device=device).masked_fill_(bad, float("-inf"))


def _fwd(q, k, v, scale: float, causal: bool, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel call on (B, H, ., .) operands: (o (B, H, S, V), lse (B, H, S) fp32)."""
    V = v.shape[-1]
    if q.device.type == "cpu":
        if V < q.shape[-1]:
            v = torch.nn.functional.pad(v, (0, q.shape[-1] - V))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                            scale=scale)
        return o[..., :V], lse.float()
    o, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal,
                                                                          scale=scale)
    return o, lse[..., :q.shape[2]].float()


def _bwd(do, q, k, v, o, lse, scale: float, causal: bool, bias) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of one kernel call, given the (merged) output and log-sum-exp of its queries."""
    V = v.shape[-1]
    if q.device.type == "cpu":
        pad = q.shape[-1] - V
        if pad:
            v, o, do = (torch.nn.functional.pad(t, (0, pad)) for t in (v, o, do))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, attn_mask=bias, scale=scale)
        return dq, dk, dv[..., :V]
    S = q.shape[2]
    lse_p = lse.new_zeros(*lse.shape[:-1], -(-S // 32) * 32)  # the kernel's log-sum-exp is padded to 32 rows
    lse_p[..., :S] = lse
    seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, bias, o, lse_p, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


def _pieces(mask, S: int, L: int, dtype, device):
    """(local query start, end, [(key start, key end, causal, bias)]) per run of the mask."""
    for q0, n, g0 in (((0, S, L - S),) if mask is None else mask.runs):  # None: plain causal
        if mask is not None and mask.q_seg is not None:
            yield q0, q0 + n, [(0, g0 + n, False, _bias(mask, q0, q0 + n, g0, dtype, device))]
        else:
            yield q0, q0 + n, ([(0, g0, False, None)] if g0 else []) + [(g0, g0 + n, True, None)]


def sdpa_forward(q, k, v, scale: float, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention of q (B, S, H, K) over k (B, L, H, K), v (B, L, H, V) under ``mask`` (default causal):
    (o (B, S, H, V) in v's dtype, lse (B, H, S) fp32)."""
    B, S, H, _ = q.shape
    qh, kh, vh = _bhsk(q), _bhsk(k), _bhsk(v)
    o = torch.empty(B, H, S, v.shape[-1], dtype=v.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    for q0, q1, parts in _pieces(mask, S, k.shape[1], q.dtype, q.device):
        outs = [_fwd(qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1], scale, causal, bias)
                for k0, k1, causal, bias in parts]
        if len(outs) == 1:
            o[:, :, q0:q1], lse[:, :, q0:q1] = outs[0]
            continue
        (o1, l1), (o2, l2) = outs
        lse_r = torch.logaddexp(l1, l2)
        o[:, :, q0:q1] = (o1.float() * (l1 - lse_r).exp()[..., None]
                          + o2.float() * (l2 - lse_r).exp()[..., None]).to(v.dtype)
        lse[:, :, q0:q1] = lse_r
    return o.transpose(1, 2).contiguous(), lse


def sdpa_backward(q, k, v, o, lse, do, scale: float, mask=None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of :func:`sdpa_forward` through the fused backward kernels."""
    qh, kh, vh, oh, doh = (_bhsk(t) for t in (q, k, v, o, do))
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (qh, kh, vh))
    for q0, q1, parts in _pieces(mask, q.shape[1], k.shape[1], q.dtype, q.device):
        args = [t[:, :, q0:q1].contiguous() for t in (doh, qh)]
        o_r, lse_r = oh[:, :, q0:q1].contiguous(), lse[:, :, q0:q1].contiguous()
        for k0, k1, causal, bias in parts:
            g = _bwd(args[0], args[1], kh[:, :, k0:k1].contiguous(), vh[:, :, k0:k1].contiguous(), o_r, lse_r,
                     scale, causal, bias)
            dq[:, :, q0:q1] += g[0].float()
            dk[:, :, k0:k1] += g[1].float()
            dv[:, :, k0:k1] += g[2].float()
    return tuple(g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))
