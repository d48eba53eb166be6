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
from hai.model.sequence import LOCAL_SEQ, Documents, SequenceSplit
from hai.model.wgrad import inner_backward

__all__ = ["MLA", "KVCache", "AttnMask", "attention", "attention_forward", "attention_backward", "head_chunks",
           "HEAD_CHUNK_BYTES"]


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
HEAD_CHUNK_BYTES = 1 << 30  # V3's recompute region: k, v (+ fp32 gradients) of at most this many bytes at a time


def head_chunks(heads: int, bytes_per_head: int) -> list[tuple[int, int]] | None:
    """Equal head ranges of at most ``HEAD_CHUNK_BYTES`` each (a divisor of ``heads`` per range); None: one range."""
    n = max(1, min(heads, HEAD_CHUNK_BYTES // max(1, bytes_per_head)))
    while heads % n:
        n -= 1
    return None if n == heads else [(h, h + n) for h in range(0, heads, n)]


@dataclass(frozen=True)
class AttnMask:
    """Which keys each query sees. Keys are global positions 0..L-1; the queries come in contiguous ``runs`` of
    (first local query, count, global position of the first): query q0+j sits at position g0+j and sees the keys at
    positions <= g0+j (causal), and with ``q_seg`` (B, S) / ``k_seg`` (B, L) only those of its own document. Plain
    causal attention of S queries over L keys is one run (0, S, L-S); context parallelism's zig-zag chunks are two."""

    runs: tuple[tuple[int, int, int], ...]
    q_seg: torch.Tensor | None = None
    k_seg: torch.Tensor | None = None

    @staticmethod
    def causal(S: int, L: int) -> "AttnMask":
        return AttnMask(((0, S, L - S),))

    def block(self, q0: int, q1: int, g0: int, device) -> torch.Tensor:
        """Masked-out (True) entries of local queries [q0, q1) at global g0.. against keys [0, g0 + q1 - q0):
        (q1-q0, keys), or (B, 1, q1-q0, keys) with documents."""
        kend = g0 + q1 - q0
        bad = torch.arange(kend, device=device)[None, :] > torch.arange(g0, kend, device=device)[:, None]
        if self.q_seg is None:
            return bad
        return bad | (self.k_seg[:, None, None, :kend] != self.q_seg[:, None, q0:q1, None])


def _blocks(mask: AttnMask):
    """(local query start, end, global position of the start) of every query block of every run."""
    for q0, n, g0 in mask.runs:
        for s0 in range(0, n, _Q_BLOCK):
            s1 = min(n, s0 + _Q_BLOCK)
            yield q0 + s0, q0 + s1, g0 + s0


def attention_forward(q, k, v, scale: float, mask: AttnMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, S, H, K) over k (B, L, H, K), v (B, L, H, V) under ``mask`` (default: causal, the queries
    the last S positions): (o (B, S, H, V) in v's dtype, lse (B, H, S) fp32). Scores, softmax and the weighted sum
    in fp32, query block by query block against the keys the block can see."""
    B, S, H, _ = q.shape
    mask = mask or AttnMask.causal(S, k.shape[1])
    with torch.autocast(q.device.type, enabled=False):
        qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, S|L, .)
        o = torch.zeros(B, H, S, vh.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, S), float("-inf"), dtype=torch.float32, device=q.device)
        for s0, s1, g0 in _blocks(mask):
            kend = g0 + s1 - s0
            sc = (qh[:, :, s0:s1] @ kh[:, :, :kend].transpose(-1, -2)) * scale
            sc.masked_fill_(mask.block(s0, s1, g0, q.device), float("-inf"))
            lse[:, :, s0:s1] = torch.logsumexp(sc, dim=-1)
            o[:, :, s0:s1] = torch.exp(sc - lse[:, :, s0:s1, None]) @ vh[:, :, :kend]
    return o.transpose(1, 2).to(v.dtype).contiguous(), lse  # contiguous: the out-projection input is a view of it


def attention_backward(q, k, v, o, lse, do, scale: float, mask: AttnMask | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of :func:`attention_forward`, the probabilities recomputed from q, k and the log-sum-exp."""
    mask = mask or AttnMask.causal(q.shape[1], k.shape[1])
    with torch.autocast(q.device.type, enabled=False):
        qh, kh, vh, oh, doh = (t.transpose(1, 2).float() for t in (q, k, v, o, do))
        delta = (doh * oh).sum(-1)  # (B, H, S): rowsum(dO * O)
        dq, dk, dv = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
        for s0, s1, g0 in _blocks(mask):
            kend = g0 + s1 - s0
            sc = (qh[:, :, s0:s1] @ kh[:, :, :kend].transpose(-1, -2)) * scale
            sc.masked_fill_(mask.block(s0, s1, g0, q.device), float("-inf"))
            p = torch.exp(sc - lse[:, :, s0:s1, None])
            do_b = doh[:, :, s0:s1]
            dv[:, :, :kend] += p.transpose(-1, -2) @ do_b
            ds = p * (do_b @ vh[:, :, :kend].transpose(-1, -2) - delta[:, :, s0:s1, None])
            dq[:, :, s0:s1] = (ds @ kh[:, :, :kend]) * scale
            dk[:, :, :kend] += (ds.transpose(-1, -2) @ qh[:, :, s0:s1]) * scale
    return tuple(g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))


def _core(impl: str):
    """(forward, backward) of the attention core ``model.attention`` names (looked up at call time, so tests can
    wrap the module's functions)."""
    if impl == "sdpa":
        from hai.model import fused_attention as f

        return f.sdpa_forward, f.sdpa_backward
    return attention_forward, attention_backward


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, mask: AttnMask | None, impl: str):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        fwd, _ = _core(impl)
        o, lse = fwd(q, k, v, scale) if mask is None else fwd(q, k, v, scale, mask)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.mask, ctx.impl = scale, mask, impl
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        _, bwd = _core(ctx.impl)
        return (*bwd(q, k, v, o, lse, do.contiguous(), ctx.scale, ctx.mask), None, None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: AttnMask | None = None,
              impl: str = "reference") -> torch.Tensor:
    """Flash-style attention (module docstring) under ``mask`` (default causal): keeps q, k, v, o and the fp32
    log-sum-exp. ``impl``: ``reference`` (:func:`attention_forward`, the tested definition) or ``sdpa`` (PyTorch's
    fused kernel, :mod:`hai.model.fused_attention`); both keep the same tensors."""
    return _FlashAttention.apply(q, k, v, scale, mask, impl)


class _MLACore(torch.autograd.Function):
    """Latents -> (gathered over CP) -> up-projections + RoPE -> attention -> output projection, keeping this
    rank's latents, o and lse; the backward gathers the latents again and reduce-scatters their gradient. Over long
    windows the keys and values are up-projected and attended a range of heads at a time (``MLA.head_chunks``)."""

    @staticmethod
    def forward(ctx, mla, docs, q_in, kv, *weights):
        kv_all = mla.cp.all_gather(kv)
        B, L = kv_all.shape[:2]
        mask = mla._mask(q_in.shape[1], L, docs)
        chunks = mla.head_chunks(B, L, kv_all.element_size())
        fwd, _ = _core(mla.cfg.attention)
        args = () if mask is None else (mask,)
        if chunks is None:
            q, k, v = mla._qkv(q_in, kv_all, docs)
            o, lse = fwd(q, k, v, mla.softmax_scale, *args)
        else:
            q, (c, k_pe) = mla._q(q_in, L, docs), mla._keys(kv_all, docs)
            parts = []
            for h0, h1 in chunks:
                k, v = mla._kv(c, k_pe, (h0, h1))
                parts.append(fwd(q[:, :, h0:h1].contiguous(), k.contiguous(), v.contiguous(), mla.softmax_scale,
                                 *args))
                del k, v
            o, lse = torch.cat([x for x, _ in parts], dim=2), torch.cat([x for _, x in parts], dim=1)
        y = mla.wo(o.flatten(2))
        ctx.save_for_backward(q_in, kv, o, lse)
        ctx.mla, ctx.docs, ctx.mask, ctx.chunks = mla, docs, mask, chunks
        return y

    @staticmethod
    def backward(ctx, dy):
        q_in, kv, o, lse = ctx.saved_tensors
        mla = ctx.mla
        do = mla.wo.backward(o.flatten(2), dy).view_as(o)
        kv_all = mla.cp.all_gather(kv)  # outside grad mode: the collective writes views of its output in place
        _, bwd = _core(mla.cfg.attention)
        with torch.enable_grad(), inner_backward():  # the weights' gradients here are partial (hai.model.wgrad)
            q_leaf, kv_leaf = q_in.detach().requires_grad_(), kv_all.detach().requires_grad_()
            if ctx.chunks is None:
                q, k, v = mla._qkv(q_leaf, kv_leaf, ctx.docs)
                grads = bwd(q, k, v, o, lse, do, mla.softmax_scale, ctx.mask)
                torch.autograd.backward([q, k, v], list(grads))
            else:
                _chunked_backward(mla, ctx, q_leaf, kv_leaf, o, lse, do, bwd)
        d_kv = mla.cp.reduce_scatter(kv_leaf.grad)
        return (None, None, q_leaf.grad, d_kv, *([None] * (len(ctx.needs_input_grad) - 4)))


def _chunked_backward(mla, ctx, q_leaf, kv_leaf, o, lse, do, bwd) -> None:
    """The attention backward a range of heads at a time: each range's k and v are up-projected from the (cut)
    latents, its q/k/v gradients formed and back-propagated into the latents' and the weight's gradients, then
    freed; q, the latents' norm and RoPE back-propagate once at the end."""
    q = mla._q(q_leaf, kv_leaf.shape[1], ctx.docs)
    c, k_pe = mla._keys(kv_leaf, ctx.docs)
    c_cut, pe_cut = c.detach().requires_grad_(), k_pe.detach().requires_grad_()
    dq = torch.empty_like(q)
    for h0, h1 in ctx.chunks:
        k, v = mla._kv(c_cut, pe_cut, (h0, h1))
        part = [t[:, :, h0:h1].contiguous() for t in (q.detach(), o)]
        g = bwd(part[0], k.detach().contiguous(), v.detach().contiguous(), part[1], lse[:, h0:h1].contiguous(),
                do[:, :, h0:h1].contiguous(), mla.softmax_scale, ctx.mask)
        dq[:, :, h0:h1] = g[0]
        torch.autograd.backward([k, v], [g[1], g[2]])
    torch.autograd.backward([q, c, k_pe], [dq, c_cut.grad, pe_cut.grad])


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
        self.cp: SequenceSplit = LOCAL_SEQ  # hai.model.sequence: under CP the latents gathered over the window

    def _rope(self, S: int, device, offset: int):
        if offset + S > self.cfg.max_seq_len:
            raise ValueError(f"positions {offset}..{offset + S - 1} exceed model.max_seq_len={self.cfg.max_seq_len}: "
                             f"shorten the sequence (train.seq_len) or raise model.max_seq_len")
        return rope_cos_sin(S, self.cfg, device, offset)

    def _rope_at(self, L: int, device, positions: torch.Tensor | None):
        """cos/sin at ``positions`` ((S,) or (B, S), all < L) of a window of L positions; None: 0..L-1."""
        cos, sin = self._rope(L, device, 0)
        if positions is None:
            return cos, sin
        return cos[positions], sin[positions]

    def _q_down(self) -> Linear:
        return self.wq if self.cfg.q_lora_rank is None else self.wq_a

    def _mask(self, S: int, L: int, docs: Documents | None) -> AttnMask | None:
        """The queries' mask: this rank's runs of positions (CP) and documents; None: plain causal."""
        runs = self.cp.runs(S) if self.cp.split else ((0, S, L - S),)
        seg = None if docs is None else docs.segment_BS
        if seg is None and not self.cp.split:
            return None
        return AttnMask(runs, None if seg is None else self.cp.take(seg), seg)

    def _q(self, q_in: torch.Tensor, L: int, docs: Documents | None) -> torch.Tensor:
        """q (B, S, H, N+R) of this rank's S positions of a window of L, RoPE at their global positions (or the
        documents' positions with ``data.reset_positions``)."""
        H, N, R = self.n_heads, self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim
        B, S, _ = q_in.shape
        pos = None if docs is None else docs.position_BS
        q_pos = self.cp.take(pos) if pos is not None else (self.cp.positions(S, q_in.device) if self.cp.split else
                                                           None if S == L else torch.arange(L - S, L,
                                                                                            device=q_in.device))
        cos_q, sin_q = self._rope_at(L, q_in.device, q_pos)
        q = q_in if self.cfg.q_lora_rank is None else self.wq_b(self.q_norm(q_in))
        q = q.view(B, S, H, N + R)
        return torch.cat([q[..., :N], apply_rope(q[..., N:], cos_q, sin_q)], dim=-1)

    def _keys(self, kv: torch.Tensor, docs: Documents | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed c_kv (B, L, C), roped k_pe (B, L, 1, R)) of the window's latents [c_kv | k_pe]."""
        C = self.cfg.kv_lora_rank
        cos_k, sin_k = self._rope_at(kv.shape[1], kv.device, None if docs is None else docs.position_BS)
        return self.kv_norm(kv[..., :C]), apply_rope(kv[..., C:].unsqueeze(2), cos_k, sin_k)

    def _kv(self, c_BLC: torch.Tensor, k_pe: torch.Tensor, heads: tuple[int, int] | None = None):
        """k (B, L, h, N+R) and v (B, L, h, V) of heads [h0, h1) (None: all, through the module's Linear; a range:
        through that slice of its weight, whose gradient is then formed at once, never deferred)."""
        N, R, V, C = self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim, self.cfg.v_head_dim, self.cfg.kv_lora_rank
        B, L, _ = c_BLC.shape
        if heads is None:
            h, kvb = self.n_heads, self.wkv_b(c_BLC)
        else:
            h = heads[1] - heads[0]
            w = self.wkv_b.weight.view(self.n_heads, N + V, C)[heads[0]:heads[1]].reshape(h * (N + V), C)
            if self.wkv_b.fp8:
                from hai.kernels import fp8_linear

                kvb = fp8_linear(c_BLC, w)
            else:
                kvb = torch.nn.functional.linear(c_BLC, w)
        kvb = kvb.view(B, L, h, N + V)
        return torch.cat([kvb[..., :N], k_pe.expand(B, L, h, R)], dim=-1), kvb[..., N:]

    def _qkv(self, q_in: torch.Tensor, kv: torch.Tensor, docs: Documents | None = None):
        """From the down-projections' outputs (q latent, or q without q_lora, for this rank's S positions;
        [c_kv | k_pe] for all L positions of the window) to the attention's q (B, S, H, N+R), k (B, L, H, N+R) and
        v (B, L, H, V)."""
        q = self._q(q_in, kv.shape[1], docs)
        k, v = self._kv(*self._keys(kv, docs))
        return q, k, v

    def head_chunks(self, B: int, L: int, elem_bytes: int) -> list[tuple[int, int]] | None:
        """Head ranges V3's recompute region up-projects and attends at a time, so one range's k, v and their fp32
        gradients over the window stay within ``HEAD_CHUNK_BYTES`` (heads are independent: exact); None: all at
        once."""
        return head_chunks(self.n_heads, B * L * (self.cfg.qk_head_dim + self.cfg.v_head_dim) * (elem_bytes + 4))

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                docs: Documents | None = None) -> torch.Tensor:
        """Causal self-attention over x (already normed). With ``cache``, x continues the cached sequence (absorbed
        decode). ``docs``: the window's documents (:mod:`hai.model.sequence`).

        Under tensor parallelism (``self.tp`` split) the down-projections run replicated on this rank's positions,
        the region is entered on their outputs (the latents, much narrower than the hidden state), this rank's heads
        attend, and the out-projection's partial sums leave the region; on one device both crossings are the
        identity. Under context parallelism (``self.cp`` split) the kv latents ([c_kv | k_pe], kv_lora_rank +
        qk_rope_head_dim values per position) are all-gathered over the CP ranks (their gradient reduce-scattered),
        so every rank up-projects the keys and values of the whole window and its queries attend to them by global
        position."""
        if cache is not None:
            return self._decode(self._q_down()(x_BSD), self.wkv_a(x_BSD), cache, layer)
        kv = self.cp.gather(self.tp.enter(self.wkv_a(x_BSD)))
        q_in = self.tp.enter(self.wq_a(x_BSD)) if self.cfg.q_lora_rank else self.wq(self.tp.enter(x_BSD))
        q, k, v = self._qkv(q_in, kv, docs)
        o = attention(q, k, v, self.softmax_scale, self._mask(q.shape[1], k.shape[1], docs), self.cfg.attention)
        return self.tp.exit(self.wo(o.flatten(2)))

    def forward_recompute(self, x_BSD: torch.Tensor, norm: RMSNorm, docs: Documents | None = None) -> torch.Tensor:
        """attn(norm(x)) under V3's recipe: keeps x, this rank's latents, the attention output and the
        log-sum-exp (under CP the latents are gathered again in the backward)."""
        if self.tp.split and self.cfg.q_lora_rank is None:  # wq is head-split: its input must enter first
            return self.forward(norm(x_BSD), docs=docs)
        ops = [LinearOp(m.forward, m.backward, m.weight) for m in (self._q_down(), self.wkv_a)]
        q_in, kv = norm_linears([x_BSD], [norm], ops)
        weights = [p for p in self.parameters() if p.requires_grad]
        q_in, kv = self.tp.enter(q_in), self.tp.enter(kv)
        return self.tp.exit(_MLACore.apply(self, docs, q_in, kv, *weights))

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
