"""DeepSeek-V3's activation recipe (§3.2.3, §3.3.2): recompute regions whose backward rebuilds what they did not keep.

``train.recompute``:

- ``none``: every op keeps what its backward needs (plain autograd over the fused pieces of ``hai.model.layers``);
- ``v3``: V3's recipe, through the regions below: every RMSNorm output is recomputed in the backward
  (:func:`norm_linears`: a norm and the Linears it feeds keep only the norm's input), the MLA up-projections are
  recomputed (``hai.model.attention``: the attention keeps its latents, its output and the log-sum-exp), the SwiGLU
  inputs are kept and the SwiGLU output recomputed (:func:`swiglu_down`, :func:`expert_ffn`), and the routed experts
  form the gradient of their gate from ``<W2ᵀ·dy, s>`` instead of keeping their output rows. Under
  ``model.precision=fp8`` the kept Linear and SwiGLU inputs are FP8 1x128 tiles (``hai.kernels.Fp8Rows``); the
  attention output (the input of the output projection) stays bf16 (V3 used E5M6; bf16 is what this code keeps and
  what the plan counts);
- ``full``: each block's compute segments (attention sub-layer, MoE front, routed experts, dense MLP) are
  recomputed from their inputs (``torch.utils.checkpoint``); communication is never recomputed.

A region's forward runs without autograd and saves (``ctx.save_for_backward``, so saved-tensor hooks see exactly
what is kept) only its inputs or the listed caches. Its backward recomputes the rest and differentiates by hand:
Linear gradients through ``Linear.backward`` (the weight-gradient GEMM deferred to the pipeline's W action when the
zero-bubble store records), norm weights through the Function's own gradient outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from hai.model.grouped import expert_offsets, expert_wgrad, grouped_dgrad, grouped_fprop
from hai.model.layers import rms_norm_backward, rms_norm_forward, swiglu_backward, swiglu_forward
from hai.model.wgrad import accumulate_wgrad, defer_or_run

__all__ = ["RECOMPUTE_MODES", "norm_linears", "swiglu_down", "expert_ffn", "pack", "unpack", "LinearOp"]

RECOMPUTE_MODES = ("none", "v3", "full")


@dataclass(frozen=True)
class LinearOp:
    """A linear map a region applies to its (recomputed) input: ``forward(x) -> y`` without autograd and
    ``backward(x, dy) -> dx`` which also accumulates (or defers) the weight gradient."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weight: torch.Tensor


# ------------------------------------------------------------------------------------------- saved tensors
def _cache(x: torch.Tensor, fp8: bool):
    if not fp8:
        return x
    from hai.kernels import quantize_rows

    return quantize_rows(x)


def pack(ctx, *items) -> None:
    """Save tensors and ``Fp8Rows`` caches through ``save_for_backward`` (so saved-tensor hooks see them)."""
    from hai.kernels import Fp8Rows

    tensors, layout = [], []
    for it in items:
        if isinstance(it, Fp8Rows):
            layout.append(("fp8", it.K, it.dtype, it.q.shape[:-1]))
            tensors += [it.q, it.s]
        else:
            layout.append(("t",))
            tensors.append(it)
    ctx.save_for_backward(*tensors)
    ctx.pack_layout = layout


def unpack(ctx, shapes: Sequence[torch.Size | None] = ()) -> list:
    """The packed items, FP8 caches dequantized to their dtype (reshaped to ``shapes[i]`` when given)."""
    from hai.kernels import Fp8Rows

    saved, out, i = ctx.saved_tensors, [], 0
    for j, entry in enumerate(ctx.pack_layout):
        if entry[0] == "fp8":
            x = Fp8Rows(saved[i], saved[i + 1], entry[1], entry[2]).dequant()
            if j < len(shapes) and shapes[j] is not None:
                x = x.view(shapes[j])
            out.append(x)
            i += 2
        else:
            out.append(saved[i])
            i += 1
    return out


# --------------------------------------------------------------------------------------------- norm + linears
class _NormLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n_in: int, eps: float, ops: tuple, keep_norm: bool, *tensors):
        xs, ws = tensors[:n_in], tensors[n_in:2 * n_in]
        parts = [rms_norm_forward(x, w, eps)[0] for x, w in zip(xs, ws)]
        z = parts[0] if n_in == 1 else torch.cat(parts, dim=-1)
        outs = tuple(op.forward(z) for op in ops)
        ctx.save_for_backward(*xs, *ws)
        ctx.n_in, ctx.eps, ctx.ops, ctx.keep_norm = n_in, eps, ops, keep_norm
        return (z, *outs) if keep_norm else outs

    @staticmethod
    def backward(ctx, *grads):
        n, saved = ctx.n_in, ctx.saved_tensors
        xs, ws = saved[:n], saved[n:]
        normed = [rms_norm_forward(x, w, ctx.eps) for x, w in zip(xs, ws)]
        z = normed[0][0] if n == 1 else torch.cat([y for y, _ in normed], dim=-1)
        g_norm, g_ops = (grads[0], grads[1:]) if ctx.keep_norm else (None, grads)
        dz = torch.zeros(z.shape, dtype=torch.float32, device=z.device) if g_norm is None else g_norm.float()
        for op, dy in zip(ctx.ops, g_ops):
            if dy is not None:
                dz = dz + op.backward(z, dy).float()
        dparts = dz.split([x.shape[-1] for x in xs], dim=-1)
        dxs, dws = [], []
        for (x, w), (_, rstd), dp in zip(zip(xs, ws), normed, dparts):
            dx, dw = rms_norm_backward(x, w, rstd, dp)
            dxs.append(dx)
            dws.append(dw.to(w.dtype))
        return (None, None, None, None, *dxs, *dws, *([None] * len(ctx.ops)))


def norm_linears(xs: Sequence[torch.Tensor], norms: Sequence, ops: Sequence[LinearOp],
                 keep_norm: bool = False) -> tuple[torch.Tensor, ...]:
    """``ops`` applied to z = cat(RMSNorm_i(x_i)); keeps only the x_i (z is recomputed in the backward). Returns
    the ops' outputs, preceded by z itself with ``keep_norm`` (when z also feeds something else, e.g. the
    dispatch)."""
    n = len(xs)
    return _NormLinears.apply(n, norms[0].eps, tuple(ops), keep_norm, *xs, *(m.weight for m in norms),
                              *(op.weight for op in ops))


# ------------------------------------------------------------------------------------------ SwiGLU + down-proj
class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h1, h3, op: LinearOp, fp8: bool, weight):
        y = op.forward(swiglu_forward(h1, h3))
        pack(ctx, _cache(h1, fp8), _cache(h3, fp8))
        ctx.op, ctx.shape = op, h1.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        h1, h3 = unpack(ctx, (ctx.shape, ctx.shape))
        ds = ctx.op.backward(swiglu_forward(h1, h3), dy)
        dh1, dh3 = swiglu_backward(h1, h3, ds)
        return dh1, dh3, None, None, None


def swiglu_down(h1: torch.Tensor, h3: torch.Tensor, op: LinearOp, fp8: bool = False) -> torch.Tensor:
    """op(silu(h1) * h3), keeping h1 and h3 (FP8 1x128 with ``fp8``) and recomputing the SwiGLU output."""
    return _SwiGLUDown.apply(h1, h3, op, fp8, op.weight)


# --------------------------------------------------------------------------------------------- routed experts
class _ExpertFFN(torch.autograd.Function):
    """y_r = g_r * W2[e](silu(W1[e] x_r) * W3[e] x_r) for the rows r of expert e; keeps x, the SwiGLU inputs and the
    gates. Backward: u = dy·W2 (the down-projection's dgrad of the *ungated* output gradient), dg = <u, s>, ds = g·u,
    dW2 = (g·dy)ᵀ s with s recomputed from the kept SwiGLU inputs."""

    @staticmethod
    def forward(ctx, x_RD, g_R, w1, w3, w2, experts, counts: tuple):
        dt = x_RD.dtype
        if experts.fp8:
            from hai.kernels import fp8_grouped_fprop, quantize_rows

            xc = quantize_rows(x_RD)
            h1, h3 = (fp8_grouped_fprop(xc, w, counts, dt) for w in (w1, w3))
            y = fp8_grouped_fprop(quantize_rows(swiglu_forward(h1, h3)), w2, counts, dt)
        else:
            xc, offs = x_RD, expert_offsets(counts, x_RD.device)
            h1, h3 = grouped_fprop(x_RD, w1, counts, offs), grouped_fprop(x_RD, w3, counts, offs)
            y = grouped_fprop(swiglu_forward(h1, h3), w2, counts, offs)
            ctx.offs = offs
        pack(ctx, xc, _cache(h1, experts.fp8), _cache(h3, experts.fp8), g_R)
        ctx.experts, ctx.counts, ctx.shapes = experts, counts, (x_RD.shape, h1.shape, h1.shape)
        return y * g_R.unsqueeze(-1).to(dt)

    @staticmethod
    def backward(ctx, dy_RD):
        x, h1, h3, g = unpack(ctx, ctx.shapes)
        experts, counts = ctx.experts, ctx.counts
        w1, w2, w3 = experts.w1, experts.w2, experts.w3
        s = swiglu_forward(h1, h3)
        gdy = dy_RD * g.unsqueeze(-1).to(dy_RD.dtype)
        store = experts.wgrad_store
        if experts.fp8:
            from hai.kernels import fp8_grouped_dgrad, fp8_grouped_wgrad

            with torch.autocast(dy_RD.device.type, enabled=False):
                u = fp8_grouped_dgrad(dy_RD, w2, counts, x.dtype)
            defer_or_run(store, lambda: accumulate_wgrad(w2, fp8_grouped_wgrad(gdy, s, counts)))
        else:
            u = grouped_dgrad(dy_RD, w2, counts, ctx.offs)
            expert_wgrad(store, gdy, s, counts, w2, ctx.offs)
        dg = (u.float() * s.float()).sum(-1)
        dh1, dh3 = swiglu_backward(h1, h3, (u.float() * g.unsqueeze(-1)).to(h1.dtype))
        if experts.fp8:
            with torch.autocast(dy_RD.device.type, enabled=False):
                dx = fp8_grouped_dgrad(dh1, w1, counts, x.dtype) + fp8_grouped_dgrad(dh3, w3, counts, x.dtype)
            defer_or_run(store, lambda: (accumulate_wgrad(w1, fp8_grouped_wgrad(dh1, x, counts)),
                                         accumulate_wgrad(w3, fp8_grouped_wgrad(dh3, x, counts))))
        else:
            dx = grouped_dgrad(dh1, w1, counts, ctx.offs) + grouped_dgrad(dh3, w3, counts, ctx.offs)
            expert_wgrad(store, dh1, x, counts, w1, ctx.offs)
            expert_wgrad(store, dh3, x, counts, w3, ctx.offs)
        return dx.to(x.dtype), dg.to(g.dtype), None, None, None, None, None


def expert_ffn(experts, x_RD: torch.Tensor, g_R: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Gated routed-expert rows (V3's recipe, module docstring)."""
    return _ExpertFFN.apply(x_RD, g_R, experts.w1, experts.w3, experts.w2, experts, tuple(int(c) for c in counts))
