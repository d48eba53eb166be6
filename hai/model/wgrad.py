"""Zero-bubble weight-gradient split: linear layers whose backward can defer the weight-gradient GEMM.

When a :class:`WeightGradStore` is attached to a layer (``layer.wgrad_store = store``, done by the pipeline) and the
store is recording, the layer's backward computes only the input gradient dx = dy·W and queues the closure
dW += dyᵀ·x; the pipeline's W action runs the queued closures later (DualPipe's ``WeightGradStore`` idea). Without a
store, or when it is not recording, the weight gradient is computed at once. Either way it is accumulated (fp32)
into the parameter's ``main_grad`` (the optimizer's flat buffer) or, without an optimizer, into ``weight.grad``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Optional

import torch

__all__ = ["WeightGradStore", "deferred_linear", "accumulate_wgrad", "defer_or_run", "weight_grad_output",
           "inner_backward", "in_inner_backward"]

_INNER = threading.local()


@contextmanager
def inner_backward() -> Iterator[None]:
    """Around a backward that a region runs inside its own backward (``hai.model.attention`` differentiates its
    recomputed graph, head range by head range): the gradients it accumulates into parameters are partial. The
    region lists those parameters among its inputs, so each one's own node in the outer graph runs after the region,
    once its gradient is whole; what watches for final gradients (the overlapped reduce-scatter of
    ``hai.parallel.zero``) ignores the accumulations made in here (:func:`in_inner_backward`)."""
    depth = getattr(_INNER, "depth", 0)
    _INNER.depth = depth + 1
    try:
        yield
    finally:
        _INNER.depth = depth


def in_inner_backward() -> bool:
    return getattr(_INNER, "depth", 0) > 0


class WeightGradStore:
    def __init__(self) -> None:
        self.recording = False
        self._pending: list[Callable[[], None]] = []
        self._queued: dict[Hashable, list[Callable[[], None]]] = {}
        self.filled = 0  # closures run by run_one (inside an overlapped F&B pair) since construction

    def put(self, fn: Callable[[], None]) -> bool:
        """Queue ``fn`` if recording (returns True), else let the caller run it now (returns False)."""
        if not self.recording:
            return False
        self._pending.append(fn)
        return True

    def close(self, key: Hashable) -> None:
        """File everything queued since the last close under ``key`` (one B action's weight work)."""
        self._queued.setdefault(key, []).extend(self._pending)
        self._pending = []

    def run(self, key: Hashable) -> None:
        for fn in self._queued.pop(key, []):
            fn()

    def run_one(self) -> bool:
        """Run the oldest closure recorded since the last close (gap filler inside an overlapped F&B pair; the rest
        keeps its order). Returns False when there is none."""
        if not self._pending:
            return False
        self._pending.pop(0)()
        self.filled += 1
        return True

    def empty(self) -> bool:
        return not self._pending and not self._queued


@torch.no_grad()
def accumulate_wgrad(weight: torch.Tensor, g: torch.Tensor) -> None:
    """Add a weight gradient computed outside autograd: into the optimizer's fp32 ``main_grad`` when the parameter
    has one (the ZeRO-1 optimizer's flat buffer), else into ``weight.grad``."""
    target = getattr(weight, "main_grad", None)
    if target is None:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        target = weight.grad
    # a bf16 gradient into fp32: add_ widens it exactly, without a full-size fp32 copy first
    widen = target.dtype == torch.float32 and g.dtype in (torch.bfloat16, torch.float16)
    target.add_(g if widen else g.to(target.dtype))


def weight_grad_output(weight: torch.Tensor, g: torch.Tensor) -> Optional[torch.Tensor]:
    """For a Function that forms its weight's gradient ``g`` (fp32) itself: with the optimizer's ``main_grad`` (HAI's
    trainer) it is accumulated there in fp32 and the Function returns None; otherwise it is returned, in the weight's
    dtype, for autograd to accumulate like any other gradient (``.grad``, hooks, and graph-based weight/input splits
    such as PyTorch's pipelining schedules see it)."""
    if getattr(weight, "main_grad", None) is not None:
        accumulate_wgrad(weight, g)
        return None
    return g.to(weight.dtype)


def defer_or_run(store: Optional[WeightGradStore], fn: Callable[[], None]) -> None:
    """Queue a weight-gradient closure in ``store`` when it is recording, else run it now."""
    if store is None or not store.put(fn):
        fn()


class _DeferredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, store):
        ctx.save_for_backward(x)
        # the Parameter itself, whose main_grad receives the gradient (a saved tensor may come back as another
        # object, e.g. when the forward is recomputed)
        ctx.weight, ctx.store = weight, store
        return torch.nn.functional.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        dx = dy @ weight.to(dy.dtype)

        def wgrad(dy=dy, x=x):
            dy_TO, x_TI = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            accumulate_wgrad(weight, dy_TO.t().float() @ x_TI.float())

        defer_or_run(ctx.store, wgrad)
        return dx, None, None


def deferred_linear(x: torch.Tensor, weight: torch.Tensor, store: WeightGradStore) -> torch.Tensor:
    """y = x · weightᵀ whose weight gradient goes through ``store`` (the routed experts' grouped GEMMs:
    ``hai.model.grouped``)."""
    return _DeferredLinear.apply(x, weight, store)
