"""Row movement for expert parallelism: hops of ``all_to_all_single``, wire formats, byte counts, autograd.

A *route* is a list of hops over one EP process group. Each hop sends rows of the previous buffer (``send_idx``,
grouped by destination rank, with uneven ``send_splits``) and receives ``recv_splits`` rows from every rank. Two
directions:

* ``gather`` (dispatch direction): copy rows forward along the hops;
* ``reduce`` (combine direction): send rows back along the hops in reverse and sum the copies of a row.

One is the other's adjoint, so the autograd functions here are a ``gather`` whose backward is a ``reduce`` and a
``reduce`` whose backward is a ``gather``. A *codec* decides what travels: the native dtype, a bf16 cast, or 1x128
e4m3 bytes plus fp32 scales (``.view(torch.uint8)``: gloo has no fp8 collectives).

Legend: N rows of a hop buffer, S rows sent by a hop, W wire row width (elements of the wire dtype), D hidden,
P ep ranks.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hai.parallel.pending import Chain

__all__ = ["Hop", "Route", "Links", "CastCodec", "Fp8Codec", "GatherFn", "ReduceFn", "quant_1x128_torch",
           "resolve_quant_1x128", "new_traffic", "TRAFFIC_PHASES"]

TRAFFIC_PHASES = ("dispatch", "combine", "meta", "dispatch_bwd", "combine_bwd")
_FP8_MAX, _AMAX_EPS, _BLOCK = 448.0, 1e-12, 128


def new_traffic() -> dict[str, int]:
    """Bytes sent per phase and link class: keys ``{phase}_intra`` / ``{phase}_inter``."""
    return {f"{p}_{link}": 0 for p in TRAFFIC_PHASES for link in ("intra", "inter")}


# ---------------------------------------------------------------------------------------------------------- hops
@dataclass
class Hop:
    send_idx: torch.Tensor  # (S,) rows of the previous buffer, grouped by destination rank
    send_splits: list[int]  # (P,) rows to each rank
    recv_splits: list[int]  # (P,) rows from each rank
    num_in: int  # rows of the previous buffer (the reduce direction sums back into this many)

    @property
    def num_out(self) -> int:
        return sum(self.recv_splits)


def a2a(buf: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, async_op: bool = False):
    """``all_to_all_single`` along dim 0 with uneven splits; returns (received rows, work or None)."""
    out = buf.new_empty((sum(recv_splits),) + tuple(buf.shape[1:]))
    work = dist.all_to_all_single(out, buf.contiguous(), recv_splits, send_splits, group=group, async_op=async_op)
    return out, work


class Links:
    """Classifies ep ranks by node (group rank a is on node a // ranks_per_node), counts bytes per link class, and
    the host time spent blocked in this dispatcher's collectives (``blocked_s``: on gloo the exposed communication
    time; NCCL collectives do not block the host, so there it is only launch overhead)."""

    def __init__(self, rank: int, ranks_per_node: int):
        self.rank, self.ranks_per_node = rank, ranks_per_node
        self.blocked_s = 0.0
        self.rows: dict[str, int] = {p: 0 for p in TRAFFIC_PHASES}  # rows sent to other ranks, per phase

    @contextmanager
    def blocking(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.blocked_s += time.perf_counter() - t0

    def node_of(self, r: int) -> int:
        return r // self.ranks_per_node

    def count(self, traffics: list[dict], phase: str, splits: list[int], row_bytes: int) -> None:
        """Add ``splits[p] * row_bytes`` sent to each rank p; self-sends are free."""
        me = self.node_of(self.rank)
        intra = sum(n for p, n in enumerate(splits) if p != self.rank and self.node_of(p) == me) * row_bytes
        inter = sum(n for p, n in enumerate(splits) if self.node_of(p) != me) * row_bytes
        for t in traffics:
            t[f"{phase}_intra"] += intra
            t[f"{phase}_inter"] += inter
        self.rows[phase] += sum(n for p, n in enumerate(splits) if p != self.rank)


def _row_bytes(buf: torch.Tensor) -> int:
    return buf[0].numel() * buf.element_size() if buf.dim() > 1 else buf.element_size()


# -------------------------------------------------------------------------------------------------------- codecs
class CastCodec:
    """Rows travel as ``wire`` (None: unchanged) and arrive as ``out``."""

    def __init__(self, wire: torch.dtype | None, out: torch.dtype):
        self.wire, self.out = wire, out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.wire is None else x.to(self.wire)

    def decode(self, b: torch.Tensor) -> torch.Tensor:
        return b.to(self.out)


def quant_1x128_torch(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference 1x128 e4m3 quantizer (K % 128 == 0): scale = max(amax, 1e-12) / 448 per 1x128 tile."""
    M, K = x_MK.shape
    x_MKbB = x_MK.float().reshape(M, K // _BLOCK, _BLOCK)
    s_MKb = x_MKbB.abs().amax(dim=2).clamp_min(_AMAX_EPS) / _FP8_MAX
    q = (x_MKbB / s_MKb[:, :, None]).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(M, K), s_MKb


def resolve_quant_1x128() -> tuple[Callable, str]:
    """``hai.kernels.quant_1x128`` when the kernels package exports it, else the torch reference above."""
    import hai.kernels

    fn = getattr(hai.kernels, "quant_1x128", None)
    if fn is not None:
        return fn, "hai.kernels.quant_1x128"
    return quant_1x128_torch, "hai.parallel.expert_comm.quant_1x128_torch"


class Fp8Codec:
    """Rows travel as uint8: [e4m3 bytes of the D padded to Dp = 128k | fp32 scales (Dp/128 of them) as bytes]."""

    def __init__(self, dim: int, out: torch.dtype, quant: Callable):
        self.dim, self.out, self.quant = dim, out, quant
        self.padded = -(-dim // _BLOCK) * _BLOCK

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        x = F.pad(x_ND, (0, self.padded - self.dim)).contiguous() if self.padded != self.dim else x_ND.contiguous()
        q_ND, s_NKb = self.quant(x)
        return torch.cat([q_ND.view(torch.uint8), s_NKb.float().contiguous().view(torch.uint8)], dim=1)

    def decode(self, b_NW: torch.Tensor) -> torch.Tensor:
        N, Dp = b_NW.shape[0], self.padded
        q_ND = b_NW[:, :Dp].contiguous().view(torch.float8_e4m3fn)
        s_NKb = b_NW[:, Dp:].contiguous().view(torch.float32)
        x = (q_ND.float().view(N, Dp // _BLOCK, _BLOCK) * s_NKb[:, :, None]).view(N, Dp)
        return x[:, :self.dim].to(self.out)


# --------------------------------------------------------------------------------------------------------- route
class Route:
    """The hops of one dispatch over ``group``; counts what it sends into ``traffics``."""

    def __init__(self, hops: list[Hop], group, links: Links, traffics: list[dict], host_blocking: bool = True):
        self.hops, self.group, self.links, self.traffics = hops, group, links, traffics
        self.host_blocking = host_blocking  # gloo waits block the host; NCCL waits are stream dependencies

    def send(self, buf: torch.Tensor, send: list[int], recv: list[int], phase: str, async_op: bool = False,
             group=None):
        """One all-to-all of rows, counted under ``phase`` (over ``group``, default the route's)."""
        self.links.count(self.traffics, phase, send, _row_bytes(buf) if buf.shape[0] else 0)
        group = self.group if group is None else group
        if async_op:
            return a2a(buf, send, recv, group, True)
        with self.links.blocking():
            return a2a(buf, send, recv, group, False)

    def gather(self, x_ND: torch.Tensor, codec, phase: str, async_op: bool = False) -> Callable[[], torch.Tensor]:
        """Copy rows forward; the first hop is issued now (async if asked), the returned call finishes the rest."""
        return _finisher(self.gather_chain(x_ND, codec, phase), async_op)

    def reduce(self, z_ND: torch.Tensor, codec, phase: str, async_op: bool = False) -> Callable[[], torch.Tensor]:
        """Send rows back along the hops, summing the copies of each row (in ``codec.out``) after every hop."""
        return _finisher(self.reduce_chain(z_ND, codec, phase), async_op)

    def gather_chain(self, x_ND: torch.Tensor, codec, phase: str) -> Chain:
        """``gather`` as a :class:`Chain`: every hop issued asynchronously once the previous one has arrived."""
        return Chain(self._gather_hops(x_ND, codec, phase), self.host_blocking)

    def reduce_chain(self, z_ND: torch.Tensor, codec, phase: str) -> Chain:
        return Chain(self._reduce_hops(z_ND, codec, phase), self.host_blocking)

    def _gather_hops(self, x_ND, codec, phase):
        b = codec.encode(x_ND)
        for h in self.hops:
            out, work = self.send(b.index_select(0, h.send_idx), h.send_splits, h.recv_splits, phase, True)
            del b
            yield work
            with self.links.blocking():
                work.wait()
            b = out
        return codec.decode(b)

    def _reduce_hops(self, z_ND, codec, phase):
        b = z_ND
        for h in reversed(self.hops):
            out, work = self.send(codec.encode(b), h.recv_splits, h.send_splits, phase, True)
            del b
            yield work
            with self.links.blocking():
                work.wait()
            b = _sum_rows(codec.decode(out), h)
        return b


def _finisher(chain: Chain, async_op: bool) -> Callable[[], torch.Tensor]:
    """``chain.wait`` to call later (async), or its result now, behind the same call."""
    if async_op:
        return chain.wait
    out = chain.wait()
    return lambda: out


def _sum_rows(rows_SW: torch.Tensor, hop: Hop) -> torch.Tensor:
    return rows_SW.new_zeros((hop.num_in,) + tuple(rows_SW.shape[1:])).index_add_(0, hop.send_idx, rows_SW)


# ------------------------------------------------------------------------------------------------------ autograd
class GatherFn(torch.autograd.Function):
    """Outputs = ``produce()``: the rows gathers delivered for each input (maybe prefetched asynchronously).

    Backward reduces each gradient back along the route (the gradient combine of a dispatch), input by input with
    ``bwd[i] = (codec, phase)``, all in this one node: every rank issues these collectives in the same order whatever
    the rest of its autograd graph looks like. Unused outputs get zero gradients (autograd materializes them).
    """

    @staticmethod
    def forward(ctx, route: Route, produce, bwd, *inputs):
        ctx.route, ctx.bwd, ctx.dtypes = route, bwd, [t.dtype for t in inputs]
        return tuple(produce())

    @staticmethod
    def backward(ctx, *grads):
        out = [ctx.route.reduce(g.contiguous(), codec, phase)().to(dtype)
               for g, (codec, phase), dtype in zip(grads, ctx.bwd, ctx.dtypes)]
        return (None, None, None, *out)


class ReduceFn(torch.autograd.Function):
    """Output = ``produce()`` (the rows a reduce delivered); backward gathers the gradient forward (a dispatch)."""

    @staticmethod
    def forward(ctx, z, route: Route, produce, bwd_codec, bwd_phase: str):
        ctx.route, ctx.codec, ctx.phase, ctx.dtype = route, bwd_codec, bwd_phase, z.dtype
        return produce()

    @staticmethod
    def backward(ctx, g):
        grad = ctx.route.gather(g.contiguous(), ctx.codec, ctx.phase)()
        return grad.to(ctx.dtype), None, None, None, None
