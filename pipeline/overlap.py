"""Overlapped forward/backward (DualPipe's F&B): one micro-batch's all-to-alls in flight during another's compute.

A stage's forward is recorded on a :class:`Tape` as a chain of *segments* cut at the MoE communication seams:

    attention + router + shared expert  |dispatch|  routed experts  |combine|  residual add   (per MoE block)

A compute segment is an ordinary autograd graph whose inputs are detached leaves, so its backward can run on its
own (``torch.autograd.backward`` on its outputs, then read the leaves' ``.grad``). A communication node has no
autograd: its forward and its backward are the dispatcher's raw seams (``dispatch_start`` / ``combine_start`` and
their ``*_backward_start``), each issued asynchronously and returning a ``Pending``.

Forward and backward of a chunk are generators that yield (seam, Pending) right after issuing a collective.
:func:`run_fb` drives the forward chunk of one micro-batch and the backward chunk of another in turn, so each chunk's
all-to-all is in flight while the other chunk computes:

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
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from hai.model.moe import MoE
from hai.parallel.pending import Pending

__all__ = ["Tape", "PlainTape", "block_forward", "run_fb", "supports_seams"]


class _Box:
    """Gradients handed across a cut: ``grad`` of one segment input, ``grads`` of one segment's outputs."""

    __slots__ = ("grad", "grads")

    def __init__(self) -> None:
        self.grad, self.grads = None, None


class _Cut(torch.autograd.Function):
    """Segment input: a view of a detached value whose backward puts the incoming gradient into ``box``. Unlike a
    ``detach().requires_grad_()`` leaf it saves nothing, so the value's storage lives only as long as the segment's
    own ops save it (as in one autograd graph)."""

    @staticmethod
    def forward(ctx, anchor, value, box):
        ctx.box = box
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        ctx.box.grad = grad if ctx.box.grad is None else ctx.box.grad + grad
        return None, None, None


class _Exit(torch.autograd.Function):
    """Segment outputs gathered under one scalar root: backward hands the gradients put in ``box.grads`` to the
    outputs. The tape keeps the scalar, not the outputs (autograd saves what the ops need)."""

    @staticmethod
    def forward(ctx, box, *outputs):
        ctx.box = box
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grads, ctx.box.grads = ctx.box.grads, None
        return (None, *grads)


@dataclass
class _Compute:
    inputs: list[tuple[int, _Box]]  # (serial of the value cut, the box its gradient arrives in)
    outputs: list[int] = field(default_factory=list)  # serials of the outputs, in _Exit's order
    root: torch.Tensor | None = None  # _Exit's scalar
    box: _Box | None = None
    seeds: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (scalar, its constant gradient)


@dataclass
class _Comm:
    name: str
    inputs: list[tuple[int, torch.dtype, bool]]  # (serial, dtype, carries gradient)
    outputs: list[tuple[int, torch.Size, torch.dtype, torch.device]]  # (serial, shape, dtype, device)
    backward: Callable[[list[torch.Tensor]], Pending]  # output gradients -> Pending(input gradient(s))


class Tape:
    """One chunk's forward as compute segments and communication nodes; ``backward`` replays it in reverse.

    Values are known by a serial number (``id`` plus a weak reference, so a freed tensor's reused ``id`` is a new
    value); the tape itself holds no activation: gradients cross cuts through :class:`_Cut` / :class:`_Exit`.
    """

    cuts = True

    def __init__(self) -> None:
        self.nodes: list[_Compute | _Comm] = []
        self._serials: dict[int, tuple[int, weakref.ref]] = {}
        self._next = 0
        self._diff: set[int] = set()  # serials of communication outputs that carry gradient
        self._grads: dict[int, torch.Tensor] = {}
        self._anchor = torch.zeros((), requires_grad=True)  # gives every cut a graph node

    def _serial(self, t: torch.Tensor) -> int:
        hit = self._serials.get(id(t))
        if hit is not None and hit[1]() is t:
            return hit[0]
        self._next += 1
        self._serials[id(t)] = (self._next, weakref.ref(t))
        return self._next

    def _requires_grad(self, t: torch.Tensor) -> bool:
        return t.requires_grad or self._serial(t) in self._diff

    # ---------------------------------------------------------------------------------------- forward
    def begin(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Start a compute segment on ``values``; returns the tensors to compute on."""
        node = _Compute([])
        cuts = []
        for v in values:
            if self._requires_grad(v):
                box = _Box()
                node.inputs.append((self._serial(v), box))
                cuts.append(_Cut.apply(self._anchor, v.detach(), box))
            else:
                cuts.append(v.detach())
        self.nodes.append(node)
        return cuts

    def end(self, *outputs: torch.Tensor | None, seeds=()) -> None:
        """Close the segment begun last: ``outputs`` feed later nodes; ``seeds`` are (scalar, gradient) pairs with a
        fixed gradient (the balance loss)."""
        node = self.nodes[-1]
        assert isinstance(node, _Compute) and node.root is None and not node.seeds, "end() without begin()"
        outs = [o for o in outputs if o is not None and o.requires_grad]
        if outs:
            node.outputs, node.box = [self._serial(o) for o in outs], _Box()
            node.root = _Exit.apply(node.box, *outs)
        node.seeds = list(seeds)

    def comm(self, name: str, inputs: list[torch.Tensor], backward: Callable[[list[torch.Tensor]], Pending]) -> _Comm:
        """Record a communication of ``inputs`` (call it when issuing it) and how to send gradients back; pass its
        results to :meth:`comm_done` when they arrive."""
        node = _Comm(name, [(self._serial(t), t.dtype, self._requires_grad(t)) for t in inputs], [], backward)
        self.nodes.append(node)
        return node

    def comm_done(self, node: _Comm, outputs: list[torch.Tensor]) -> None:
        node.outputs = [(self._serial(t), t.shape, t.dtype, t.device) for t in outputs]
        if any(diff for _, _, diff in node.inputs):
            self._diff.update(s for s, *_ in node.outputs)

    # ---------------------------------------------------------------------------------------- backward
    def _add(self, serial: int, grad: torch.Tensor) -> None:
        self._grads[serial] = grad if serial not in self._grads else self._grads[serial] + grad

    def _backward_compute(self, node: _Compute) -> None:
        grads = [self._grads.pop(s, None) for s in node.outputs]
        roots, root_grads = [], []
        if any(g is not None for g in grads):
            node.box.grads = grads
            roots.append(node.root)
            root_grads.append(torch.zeros_like(node.root))
        for t, g in node.seeds:
            roots.append(t)
            root_grads.append(g)
        if roots:
            torch.autograd.backward(roots, root_grads)
        for serial, box in node.inputs:
            if box.grad is not None:
                self._add(serial, box.grad)

    def backward(self, roots: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[str]:
        """Back-propagate ``roots`` (value, gradient) through the tape, yielding after issuing each collective (and
        each further hop of one)."""
        for value, grad in roots:
            self._add(self._serial(value), grad)
        while self.nodes:
            node = self.nodes.pop()  # frees each segment's graph as soon as it is done
            if isinstance(node, _Compute):
                self._backward_compute(node)
                continue
            # every rank of the group must take part, so a missing gradient travels as zeros
            grads = [self._grads.pop(s, None) for s, *_ in node.outputs]
            grads = [torch.zeros(shape, dtype=dt, device=dev) if g is None else g
                     for (_, shape, dt, dev), g in zip(node.outputs, grads)]
            pending = node.backward(grads)
            del grads
            yield f"{node.name}_bwd", pending
            while pending.step():
                yield f"{node.name}_bwd", pending
            got = pending.wait()
            for (serial, dtype, diff), g in zip(node.inputs, (got,) if isinstance(got, torch.Tensor) else got):
                if diff:
                    self._add(serial, g.to(dtype))
            del got, pending

    def grad(self, value: torch.Tensor) -> torch.Tensor | None:
        """Gradient accumulated for a value that no node produced (the chunk's input), after ``backward``."""
        return self._grads.pop(self._serial(value), None)


class PlainTape:
    """The tape's interface over one ordinary autograd graph: no cuts, no seams, nothing yielded (the executor's
    path when there is nothing to overlap)."""

    cuts = False

    def begin(self, *values: torch.Tensor) -> list[torch.Tensor]:
        return list(values)

    def end(self, *outputs, seeds=()) -> None:
        pass

    def backward(self, roots: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator:
        torch.autograd.backward([t for t, _ in roots], [g for _, g in roots])
        yield from ()

    def grad(self, value: torch.Tensor) -> torch.Tensor | None:
        return value.grad


# -------------------------------------------------------------------------------------------- the model's seams
def supports_seams(block: nn.Module) -> bool:
    return isinstance(getattr(block, "ffn", None), MoE)


def block_forward(block: nn.Module, h_BSD: torch.Tensor, tape: Tape | PlainTape, docs=None) -> Iterator:
    """Run one transformer block on the tape (generator; its return value is the block's output): the block's own
    seams (``attention_part``, ``moe_front``, ``MoE.expert_rows``, ``MoE.finish``) as compute segments, the
    dispatcher's raw seams between them. ``docs``: the micro-batch's documents (``hai.model.sequence``)."""
    if not tape.cuts or not supports_seams(block):
        (h,) = tape.begin(h_BSD)
        out = block(h, docs=docs)
        tape.end(out)
        return out
    moe: MoE = block.ffn
    disp = moe.dispatcher
    # attention, router, shared expert
    (h,) = tape.begin(h_BSD)
    h1 = block.segment(block.attention_part, h, docs)
    x_TD, route, aux, shared = block.segment(block.moe_front, h1)
    moe.router.count(route)
    w_TK = route.topk_weight
    seeds = [(aux, torch.full_like(aux, moe.aux_grad_scale))] if aux is not None else []
    tape.end(h1, x_TD, w_TK, shared, seeds=seeds)
    # dispatch
    handle, pending = disp.dispatch_start(x_TD.detach(), route.topk_idx, w_TK.detach())
    node = tape.comm("dispatch", [x_TD, w_TK], lambda g: disp.dispatch_backward_start(*g, handle))
    del h, route, x_TD, w_TK
    yield "dispatch", pending
    while pending.step():  # a hierarchical route: the next hop
        yield "dispatch", pending
    x_ND, w_NK = pending.wait()
    tape.comm_done(node, [x_ND, w_NK])
    del pending
    # routed experts
    x_in, w_in = tape.begin(x_ND, w_NK)
    del x_ND, w_NK
    z_ND = moe.expert_rows(x_in, w_in, handle)
    del x_in, w_in
    tape.end(z_ND)
    # combine
    pending = disp.combine_start(z_ND.detach(), handle)
    node = tape.comm("combine", [z_ND], lambda g: disp.combine_backward_start(g[0], handle))
    del z_ND
    yield "combine", pending
    while pending.step():
        yield "combine", pending
    out_TD = pending.wait()
    tape.comm_done(node, [out_TD])
    del pending
    # shared expert + residual (the balance loss is a seed of the first segment, not injected here)
    ins = tape.begin(h1, out_TD, *([shared] if shared is not None else []))
    y_TD = moe.finish(ins[1], ins[2] if shared is not None else None, None)
    out = ins[0] + y_TD.view_as(ins[0])
    tape.end(out)
    return out


def run_fb(forward: Iterator, backward: Iterator, *, sequential: bool = False, log: list | None = None,
           fill: Callable[[], bool] | None = None) -> None:
    """Drive a forward chunk and a backward chunk: in turn, switching whenever one has issued a collective (or,
    with ``sequential``, the forward to its end and then the backward). The chunks yield (seam name, Pending).
    ``log`` receives (chunk, seam, time).

    ``fill`` runs one unit of other work (DualPipe's deferred weight gradients) and says whether there was any. Where a
    wait blocks the host (gloo), it is called before a chunk resumes, for as long as that chunk's collective is still
    in flight, so the wait is spent computing. Where it does not (NCCL: ``wait()`` is a stream dependency and the host
    cannot tell when the transfer ends), one unit is enqueued right after each collective is issued, so the GPU runs
    it, and the other chunk's compute, while the transfer is on the wire (``hai.parallel.pending``).
    """
    chunks = [("F", forward), ("B", backward)]
    if sequential:
        for name, gen in chunks:
            for seam, _ in gen:
                if log is not None:
                    log.append((name, seam, time.perf_counter()))
        return
    waiting: dict[str, Pending] = {}
    while chunks:
        for item in list(chunks):
            name, gen = item
            pending = waiting.pop(name, None)
            if fill is not None and pending is not None:
                while not pending.ready() and fill():
                    pass
            got = next(gen, None)
            if got is None:
                chunks.remove(item)
                continue
            seam, waiting[name] = got
            if log is not None:
                log.append((name, seam, time.perf_counter()))
            if fill is not None and not waiting[name].host_blocking:
                fill()  # NCCL: enqueued behind the collective just issued, ahead of its consumer
