"""Overlapped forward/backward (DualPipe's F&B): one micro-batch's all-to-alls in flight during another's compute.

A stage's forward is recorded on a :class:`Tape` as a chain of *segments* cut at the MoE communication seams:

    attention + router + shared expert  |dispatch|  routed experts  |combine|  residual add   (per MoE block)

A compute segment is an ordinary autograd graph whose inputs are detached leaves, so its backward can run on its
own (``torch.autograd.backward`` on its outputs, then read the leaves' ``.grad``). A communication node has no
autograd: its forward and its backward are the dispatcher's raw seams (``dispatch_start`` / ``combine_start`` and
their ``*_backward_start``), each issued asynchronously and returning a ``Pending``.

Forward and backward of a chunk are generators that yield right after issuing a collective. :func:`run_fb` drives
the forward chunk of one micro-batch and the backward chunk of another in turn, so each chunk's all-to-all is in
flight while the other chunk computes:

    F: attn_0 -> [dispatch_0 issued]            B: tail_L -> [combine_bwd_L issued]
    F: wait, experts_0 -> [combine_0 issued]     B: wait, experts_bwd_L -> [dispatch_bwd_L issued]
    F: wait, add_0, attn_1 -> [dispatch_1] ...   B: wait, attn_bwd_L, tail_{L-1} -> [combine_bwd_{L-1}] ...

Each chunk runs exactly the operations it would run alone, in the same order, so the interleaved results are
bitwise those of the two chunks run one after the other (``sequential=True``, tested). Ranks of an EP group run
the same schedule, hence issue their collectives in the same order.

Dense blocks, the embedding and the output head (with MTP, whose MoE blocks use the synchronous autograd seams) are
single compute segments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from hai.model.moe import MoE, Pending

__all__ = ["Tape", "block_forward", "run_fb", "supports_seams"]


@dataclass
class _Compute:
    inputs: list[tuple[torch.Tensor, torch.Tensor]]  # (value it was cut from, leaf the segment computed on)
    outputs: list[torch.Tensor] = field(default_factory=list)
    seeds: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (tensor, its constant gradient)


@dataclass
class _Comm:
    name: str
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    backward: Callable[[list[torch.Tensor]], Pending]  # output gradients -> Pending(input gradient(s))


class Tape:
    """One chunk's forward as compute segments and communication nodes; ``backward`` replays it in reverse."""

    def __init__(self) -> None:
        self.nodes: list[_Compute | _Comm] = []
        self._diff: set[int] = set()  # ids of communication outputs that carry gradient
        self._grads: dict[int, torch.Tensor] = {}

    def _requires_grad(self, t: torch.Tensor) -> bool:
        return t.requires_grad or id(t) in self._diff

    # ---------------------------------------------------------------------------------------- forward
    def begin(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Start a compute segment on ``values``; returns the leaves to compute on."""
        leaves = [v.detach().requires_grad_(self._requires_grad(v)) for v in values]
        self.nodes.append(_Compute(list(zip(values, leaves))))
        return leaves

    def end(self, *outputs: torch.Tensor | None, seeds=()) -> None:
        """Close the segment begun last: ``outputs`` feed later nodes; ``seeds`` are (tensor, gradient) pairs with a
        fixed gradient (the balance loss)."""
        node = self.nodes[-1]
        assert isinstance(node, _Compute) and not node.outputs, "end() without begin()"
        node.outputs = [o for o in outputs if o is not None and o.requires_grad]
        node.seeds = list(seeds)

    def comm(self, name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
             backward: Callable[[list[torch.Tensor]], Pending]) -> None:
        """Record a finished communication ``inputs -> outputs`` and how to send gradients back."""
        self.nodes.append(_Comm(name, list(inputs), list(outputs), backward))
        if any(self._requires_grad(t) for t in inputs):
            self._diff.update(id(t) for t in outputs)

    # ---------------------------------------------------------------------------------------- backward
    def _add(self, value: torch.Tensor, grad: torch.Tensor) -> None:
        key = id(value)
        self._grads[key] = grad if key not in self._grads else self._grads[key] + grad

    def backward(self, roots: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[str]:
        """Back-propagate ``roots`` (value, gradient) through the tape, yielding after issuing each collective."""
        for value, grad in roots:
            self._add(value, grad)
        while self.nodes:
            node = self.nodes.pop()  # frees each segment's graph as soon as it is done
            if isinstance(node, _Compute):
                outs = [(o, self._grads.pop(id(o))) for o in node.outputs if id(o) in self._grads] + node.seeds
                if outs:
                    torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
                for value, leaf in node.inputs:
                    if leaf.grad is not None:
                        self._add(value, leaf.grad)
            else:
                # every rank of the group must take part, so a missing gradient travels as zeros
                grads = [self._grads.pop(id(o), None) for o in node.outputs]
                grads = [torch.zeros_like(o) if g is None else g for o, g in zip(node.outputs, grads)]
                pending = node.backward(grads)
                yield f"{node.name}_bwd"
                got = pending.wait()
                for value, g in zip(node.inputs, (got,) if isinstance(got, torch.Tensor) else got):
                    if self._requires_grad(value):
                        self._add(value, g.to(value.dtype))

    def grad(self, value: torch.Tensor) -> torch.Tensor | None:
        """Gradient accumulated for a value that no node produced (the chunk's input), after ``backward``."""
        return self._grads.pop(id(value), None)


# -------------------------------------------------------------------------------------------- the model's seams
def supports_seams(block: nn.Module) -> bool:
    return isinstance(getattr(block, "ffn", None), MoE)


def block_forward(block: nn.Module, h_BSD: torch.Tensor, tape: Tape) -> Iterator[str]:
    """Run one transformer block on the tape (generator; its return value is the block's output)."""
    if not supports_seams(block):
        (h,) = tape.begin(h_BSD)
        out = block(h)
        tape.end(out)
        return out
    moe: MoE = block.ffn
    disp = moe.dispatcher
    # attention, router, shared expert
    (h,) = tape.begin(h_BSD)
    h1 = h + block.attn(block.attn_norm(h))
    x_TD, route, aux = moe.front(block.ffn_norm(h1))
    shared = moe.shared(x_TD) if moe.shared is not None else None
    w_TK = route.topk_weight
    seeds = [(aux, torch.full_like(aux, moe.aux_grad_scale))] if aux is not None else []
    tape.end(h1, x_TD, w_TK, shared, seeds=seeds)
    # dispatch
    handle, pending = disp.dispatch_start(x_TD.detach(), route.topk_idx, w_TK.detach())
    yield "dispatch"
    x_ND, w_NK = pending.wait()
    tape.comm("dispatch", [x_TD, w_TK], [x_ND, w_NK], lambda g: disp.dispatch_backward_start(*g, handle))
    # routed experts
    x_leaf, w_leaf = tape.begin(x_ND, w_NK)
    z_ND = moe.expert_rows(x_leaf, w_leaf, handle)
    tape.end(z_ND)
    # combine
    pending = disp.combine_start(z_ND.detach(), handle)
    yield "combine"
    out_TD = pending.wait()
    tape.comm("combine", [z_ND], [out_TD], lambda g: disp.combine_backward_start(g[0], handle))
    # residual
    vals = [h1, out_TD] + ([shared] if shared is not None else [])
    leaves = tape.begin(*vals)
    y_TD = leaves[1] + leaves[2] if shared is not None else leaves[1]
    out = leaves[0] + y_TD.view_as(leaves[0])
    tape.end(out)
    return out


def run_fb(forward: Iterator[str], backward: Iterator[str], *, sequential: bool = False,
           log: list | None = None) -> None:
    """Drive a forward chunk and a backward chunk: in turn, switching whenever one has issued a collective (or,
    with ``sequential``, the forward to its end and then the backward). ``log`` receives (chunk, seam, time)."""
    chunks = [("F", forward), ("B", backward)]
    if sequential:
        for name, gen in chunks:
            for seam in gen:
                if log is not None:
                    log.append((name, seam, time.perf_counter()))
        return
    while chunks:
        for item in list(chunks):
            name, gen = item
            seam = next(gen, None)
            if seam is None:
                chunks.remove(item)
            elif log is not None:
                log.append((name, seam, time.perf_counter()))
