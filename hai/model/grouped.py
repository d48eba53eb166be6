"""The routed experts' bf16/fp32 GEMMs over rows grouped by expert, one grouped GEMM each instead of E_l GEMMs.

The rows of a dispatched buffer are contiguous per local expert (``counts``); the three GEMMs of a routed-expert
Linear are

- fprop ``y_e = x_e · W[e]ᵀ``: ``grouped_mm(x, Wᵀ, offs)`` (W is (E, N, K); its transposed view is the column-major
  operand the CUDA kernel wants),
- dgrad ``dx_e = dy_e · W[e]``: ``grouped_mm(dy, W, offs)``,
- wgrad ``dW[e] = dy_eᵀ · x_e`` in fp32: ``grouped_mm(dyᵀ, x, offs)`` on the CPU (both operands 2-D, grouped along
  K; an expert with no rows gets a zero gradient); on CUDA one fp32-output ``mm`` per expert (torch's grouped
  kernel writes no fp32 output for bf16 inputs: :func:`cuda_wgrad_mm`); added to the fp32 ``main_grad`` (or
  deferred to the pipeline's W action, ``hai.model.wgrad``),

through ``torch.nn.functional.grouped_mm`` (``offs``: the int32 running row counts, on the device, built once per
layer call from the host counts with a pinned non-blocking copy). Where it runs: the CPU (any float dtype; the same
bits as the per-expert loop, ``tests/test_grouped.py``) and CUDA bf16 with 16-byte-aligned rows (K and N multiples of
8, torch's kernel requirement; every V3 size). Elsewhere (an fp32 or fp16 model on CUDA, a torch without
``grouped_mm``) the per-expert loop below computes the same thing. FP8 experts use HAI's own grouped kernels
(``hai.kernels.fp8_grouped_*``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hai.model.wgrad import WeightGradStore, accumulate_wgrad, defer_or_run, weight_grad_output

__all__ = ["expert_offsets", "grouped_fprop", "grouped_dgrad", "grouped_wgrad", "grouped_linear", "expert_wgrad",
           "uses_grouped_mm", "cuda_wgrad_mm"]

_GROUPED_MM = getattr(F, "grouped_mm", None)


def expert_offsets(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """int32 end row of each expert's group (``grouped_mm``'s ``offs``), on ``device`` without a host sync."""
    from hai.kernels import to_device

    ends, total = [], 0
    for c in counts:
        total += int(c)
        ends.append(total)
    return to_device(torch.tensor(ends, dtype=torch.int32, device="cpu"), device)  # built on the host, then moved


def uses_grouped_mm(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether a GEMM of ``x``'s device and dtype with per-expert (n, k) weights goes through ``grouped_mm`` (the
    module docstring) rather than the per-expert loop."""
    if _GROUPED_MM is None:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and n % 8 == 0 and k % 8 == 0
    return x.device.type == "cpu"


def cuda_wgrad_mm(dy_RN: torch.Tensor, x_RK: torch.Tensor, counts: Sequence[int], offs: torch.Tensor) -> torch.Tensor:
    """The CUDA wgrad: fp32 (E, N, K) from bf16 operands, as Megatron's fused wgrad accumulation keeps it. torch
    2.13's grouped kernel writes no fp32 output for bf16 inputs, and rounding each micro-batch's dW to bf16 costs
    measurable loss (``docs/gpu.md``), so each expert with rows is one ``mm`` with an fp32 output (``aten::mm.dtype``,
    a CUDA kernel; E_l large GEMMs); a torch without it gets the grouped kernel's bf16 result. Checked against the
    CUDA rules on the meta device (``tests/test_grouped.py``)."""
    if not hasattr(torch.ops.aten.mm, "dtype"):
        return _zero_empty(_GROUPED_MM(dy_RN.t(), x_RK, offs=offs), counts)
    return _per_expert_wgrad(dy_RN, x_RK, counts, lambda dy, x: torch.mm(dy.t(), x, out_dtype=torch.float32))


def _zero_empty(out_ENK: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Zeros for the experts without rows, written here rather than left to a grouped kernel."""
    for e, c in enumerate(counts):
        if not c:
            out_ENK[e].zero_()
    return out_ENK


def _per_expert_wgrad(dy_RN, x_RK, counts: Sequence[int], mm) -> torch.Tensor:
    """fp32 (E, N, K) with ``mm(dy_e, x_e)`` for every expert with rows, zeros for the others."""
    out = torch.zeros(len(counts), dy_RN.shape[1], x_RK.shape[1], dtype=torch.float32, device=dy_RN.device)
    for e, (dy, x) in enumerate(zip(torch.split(dy_RN, list(counts)), torch.split(x_RK, list(counts)))):
        if dy.shape[0]:
            out[e] = mm(dy, x)
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's where it is on (bf16 training), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def grouped_fprop(x_RK: torch.Tensor, w_ENK: torch.Tensor, counts: Sequence[int],
                  offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows of x grouped per expert times W[e]ᵀ: (R, N), in the dtype F.linear would use (autocast's when on)."""
    dt = _compute_dtype(x_RK)
    x, w = x_RK.to(dt), w_ENK.to(dt)
    if x.shape[0] == 0:  # no rows on this rank: no kernel (CUDA's grouped GEMM is not exercised with M = 0)
        return x.new_zeros(0, w.shape[1])
    if uses_grouped_mm(x, *w.shape[1:]):
        offs = expert_offsets(counts, x.device) if offs is None else offs
        with torch.autocast(x.device.type, enabled=False):
            return _GROUPED_MM(x, w.transpose(-2, -1), offs=offs)
    outs = [F.linear(xe, w[e]) for e, xe in enumerate(torch.split(x, list(counts))) if xe.shape[0]]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


def grouped_dgrad(dy_RN: torch.Tensor, w_ENK: torch.Tensor, counts: Sequence[int],
                  offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dy grouped per expert times W[e]: (R, K), in dy's dtype."""
    w = w_ENK.to(dy_RN.dtype)
    if dy_RN.shape[0] == 0:
        return dy_RN.new_zeros(0, w.shape[2])
    if uses_grouped_mm(dy_RN, *w.shape[1:]):
        offs = expert_offsets(counts, dy_RN.device) if offs is None else offs
        with torch.autocast(dy_RN.device.type, enabled=False):
            return _GROUPED_MM(dy_RN, w, offs=offs)
    outs = [dy @ w[e] for e, dy in enumerate(torch.split(dy_RN, list(counts))) if dy.shape[0]]
    return torch.cat(outs) if outs else dy_RN.new_zeros(0, w.shape[2])


def grouped_wgrad(dy_RN: torch.Tensor, x_RK: torch.Tensor, counts: Sequence[int],
                  offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dW[e] = dy_eᵀ·x_e for every expert, fp32 (E, N, K): fp32 operands on the CPU (the arithmetic of the
    per-expert ``dy.t().float() @ x.float()``), bf16 operands with an fp32 output on CUDA (:func:`cuda_wgrad_mm`).
    An expert without rows gets zeros (written here, not left to the kernel)."""
    E, N, K = len(counts), dy_RN.shape[1], x_RK.shape[1]
    if x_RK.dtype != dy_RN.dtype:
        x_RK = x_RK.to(dy_RN.dtype)
    if dy_RN.shape[0] == 0:
        return torch.zeros(E, N, K, dtype=torch.float32, device=dy_RN.device)
    with torch.autocast(dy_RN.device.type, enabled=False):
        if uses_grouped_mm(dy_RN, N, K):
            offs = expert_offsets(counts, dy_RN.device) if offs is None else offs
            if dy_RN.device.type == "cuda":
                return cuda_wgrad_mm(dy_RN, x_RK, counts, offs)
            return _zero_empty(_GROUPED_MM(dy_RN.t().float(), x_RK.float(), offs=offs), counts)
        return _per_expert_wgrad(dy_RN, x_RK, counts, lambda dy, x: dy.t().float() @ x.float())


class _GroupedLinear(torch.autograd.Function):
    """y = x_e·W[e]ᵀ per expert group; the backward's weight gradient goes through the zero-bubble store when it
    records, else into ``main_grad`` (or back to autograd without an optimizer)."""

    @staticmethod
    def forward(ctx, x_RK, w_ENK, counts: tuple, offs, store):
        ctx.save_for_backward(x_RK)
        ctx.weight, ctx.counts, ctx.offs, ctx.store = w_ENK, counts, offs, store
        return grouped_fprop(x_RK, w_ENK, counts, offs)

    @staticmethod
    def backward(ctx, dy_RN):
        (x,) = ctx.saved_tensors
        weight, counts, offs = ctx.weight, ctx.counts, ctx.offs
        dx = grouped_dgrad(dy_RN, weight, counts, offs)
        if ctx.store is not None and ctx.store.put(
                lambda: accumulate_wgrad(weight, grouped_wgrad(dy_RN, x, counts, offs))):
            return dx, None, None, None, None
        return dx, weight_grad_output(weight, grouped_wgrad(dy_RN, x, counts, offs)), None, None, None


def grouped_linear(x_RK: torch.Tensor, w_ENK: torch.Tensor, counts: Sequence[int], offs: Optional[torch.Tensor] = None,
                   store: Optional[WeightGradStore] = None) -> torch.Tensor:
    """Differentiable :func:`grouped_fprop` (``offs`` shared by a layer's GEMMs: build it once with
    :func:`expert_offsets`)."""
    counts = tuple(int(c) for c in counts)
    offs = expert_offsets(counts, x_RK.device) if offs is None else offs
    return _GroupedLinear.apply(x_RK, w_ENK, counts, offs, store)


def expert_wgrad(store: Optional[WeightGradStore], dy_RN: torch.Tensor, x_RK: torch.Tensor, counts: Sequence[int],
                 w_ENK: torch.Tensor, offs: Optional[torch.Tensor] = None) -> None:
    """dW += dyᵀ·x per expert into ``w_ENK``'s fp32 gradient, now or at the pipeline's W action."""
    defer_or_run(store, lambda: accumulate_wgrad(w_ENK, grouped_wgrad(dy_RN, x_RK, counts, offs)))
