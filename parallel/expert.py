"""Expert parallelism: dropless all-to-all dispatch/combine over the "ep" axis, flat or node-limited hierarchical.

Routed expert j lives on ep rank ``j // E_l`` (E_l = E / ep local experts, :func:`shard_experts`). The dispatcher
implements the ``Dispatcher`` seams of :mod:`hai.model.moe`:

* ``dispatch(x, topk_idx, topk_weight) -> (recv_x, tokens_per_local_expert, handle)``: rows arrive grouped by local
  expert, in (local expert, source ep rank, source token) order; no capacity, nothing dropped.
* ``combine(y, handle) -> out``: out_t = sum_k w_tk * y[row(t, k)], back on the token's own rank.

Two routes (``mode``), giving the same rows in the same order:

* ``flat``: one ``all_to_all_single`` over the EP group; a token goes once to every rank owning one of its experts.
* ``hierarchical`` (DeepEP): a token crosses once to every destination *node*, landing on the rank with the sender's
  local index there, which forwards one copy to each rank of its node owning the token's experts. Combine reverses
  it: gated rows are summed on the expert rank, then on the forwarding rank (within the node), and one row per
  (token, destination node) crosses back. With node-limited routing (M nodes per token) a token's inter-node bytes
  are <= M rows each way.

Weights are applied on the expert side (so the hierarchical combine can pre-reduce within a node): the gates travel
with the tokens as K-wide fp32 rows and carry their gradient back. ``fp8=True``: the dispatched x is 1x128 e4m3 +
fp32 scales on the wire (dequantized on arrival, straight-through gradient), everything else (the gradient of
dispatch, combine and its gradient) is bf16 on the wire; sums are done in the tensor's own dtype.

Bytes sent are counted per link class (``handle.traffic`` per micro-batch, ``dispatcher.traffic`` cumulative): keys
``{phase}_{intra|inter}`` for phase in dispatch (x payload), combine (y payload), meta (split sizes, routing rows,
gates), dispatch_bwd, combine_bwd. Group rank a is on node a // min(gpus_per_node, ep) (EP groups are runs of
consecutive ranks aligned to nodes, see :class:`~hai.parallel.topology.Topology`).

Legend: T tokens on this rank, D hidden, K experts per token, E routed experts, E_l local experts, P ep ranks,
N rows of a hop buffer (meta rows: [source rank, source token, K expert ids]), R received rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hai.model.moe import gather_rows, scatter_rows
from hai.parallel.pending import Joint, Pending
from hai.parallel.expert_comm import (CastCodec, Fp8Codec, GatherFn, Hop, Links, ReduceFn, Route, a2a,
                                      new_traffic, resolve_quant_1x128)

__all__ = ["EPDispatcher", "EPHandle", "check_ep_config", "shard_experts", "expert_range"]

_MODES = ("flat", "hierarchical")
_FP32 = CastCodec(None, torch.float32)


def check_ep_config(num_experts: int, ep: int, gpus_per_node: int, mode: str = "flat") -> None:
    """Dispatcher-level checks (the config-level ones live in ``Topology.from_config``)."""
    if mode not in _MODES:
        raise ValueError(f"dispatch mode={mode!r} is not one of {list(_MODES)}: set parallel.dispatch to one of them")
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node={gpus_per_node} must be >= 1")
    if num_experts % ep:
        raise ValueError(f"ep={ep} does not divide num_experts={num_experts}: each EP rank holds num_experts/ep "
                         f"experts; use an EP group whose size divides {num_experts}")
    if ep % gpus_per_node and gpus_per_node % ep:
        raise ValueError(f"ep={ep} neither fills whole nodes nor fits in one (gpus_per_node={gpus_per_node}): "
                         f"choose ep as a multiple or a divisor of {gpus_per_node}")


def expert_range(num_experts: int, ep_rank: int, ep: int) -> tuple[int, int]:
    """Global ids [e0, e1) of the routed experts on ``ep_rank``."""
    n = num_experts // ep
    return ep_rank * n, (ep_rank + 1) * n


@torch.no_grad()
def shard_experts(moe: nn.Module, ep_rank: int, ep: int) -> nn.Module:
    """Keep rows [e0:e1) of ``moe.experts``' stacked w1/w2/w3 (new Parameters, so build optimizers afterwards; on
    ``meta`` this allocates nothing). ``experts.expert_offset`` records e0 (global expert id of local row 0)."""
    experts = moe.experts
    check_ep_config(experts.num_experts, ep, 1)
    e0, e1 = expert_range(experts.num_experts, ep_rank, ep)
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full[e0:e1].clone(), requires_grad=full.requires_grad))
    experts.num_experts = e1 - e0
    experts.expert_offset += e0
    return moe


@dataclass
class EPHandle:
    route: Route
    row_R: torch.Tensor  # (R,) row of the last hop buffer behind each received row
    slot_R: torch.Tensor  # (R,) its k in the source token's top-k
    weight_R: torch.Tensor  # (R,) gate of each received row (carries grad back to topk_weight); set by wait()
    src_rank_R: torch.Tensor  # (R,) ep rank the row's token came from
    src_token_R: torch.Tensor  # (R,) its index on that rank
    expert_R: torch.Tensor  # (R,) local expert id
    num_tokens: int  # T of this rank (combine's output rows)
    tokens_per_local_expert: list[int]
    tokens_per_rank_P: torch.Tensor  # (P,) this rank's tokens with >= 1 expert on each ep rank (on the device)
    tokens_per_node_G: torch.Tensor  # (nodes,) ... on each node of the EP group
    traffic: dict[str, int] = field(default_factory=new_traffic)

    @property
    def tokens_per_rank(self) -> list[int]:
        return self.tokens_per_rank_P.tolist()  # statistics: a host read when asked for

    @property
    def tokens_per_node(self) -> list[int]:
        return self.tokens_per_node_G.tolist()

    @property
    def num_rows(self) -> int:
        """N: rows of the last hop's buffer (what ``gather_rows`` indexes and the combine sends back)."""
        return self.route.hops[-1].num_out


class EPDispatcher:
    """Expert-parallel ``Dispatcher`` over ``ep_group`` (a ProcessGroup or a 1-D DeviceMesh)."""

    def __init__(self, ep_group, num_experts: int, *, gpus_per_node: int, mode: str = "flat", fp8: bool = False,
                 meta_group=None):
        self.group = ep_group.get_group() if hasattr(ep_group, "get_group") else ep_group
        # the count tables and routing rows of each hop travel on their own communicator over the same ranks (see
        # "Host syncs" below); None: on the payload's
        self.meta_group = self.group if meta_group is None else meta_group
        self.ep, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        check_ep_config(num_experts, self.ep, gpus_per_node, mode)
        self.num_experts, self.num_local_experts = num_experts, num_experts // self.ep
        self.ranks_per_node = min(gpus_per_node, self.ep)
        self.ep_nodes = self.ep // self.ranks_per_node
        self.mode, self.fp8 = mode, fp8
        self.links = Links(self.rank, self.ranks_per_node)
        self.host_blocking = dist.get_backend(self.group) != "nccl"  # see hai.parallel.pending (streams)
        self.traffic = new_traffic()
        self._quant, self.quantizer = resolve_quant_1x128() if fp8 else (None, None)

    # ------------------------------------------------------------------------------------------------ protocol
    def dispatch(self, x_TD, topk_idx_TK, topk_weight_TK):
        return self.dispatch_async(x_TD, topk_idx_TK, topk_weight_TK, async_op=False).wait()

    def combine(self, y_RD, handle: EPHandle, gated: bool = False):
        return self.combine_async(y_RD, handle, async_op=False, gated=gated).wait()

    def dispatch_async(self, x_TD, topk_idx_TK, topk_weight_TK, *, async_op: bool = True) -> Pending:
        """Exchange routing metadata now (small, blocking), issue the payload all-to-all (async); ``wait()`` gives
        ``(recv_x_RD, tokens_per_local_expert, handle)``."""
        handle = self._plan(topk_idx_TK)
        route, w_TK = handle.route, topk_weight_TK.float()
        x_fin = route.gather(x_TD.detach(), self._x_codec(x_TD), "dispatch", async_op)
        w_fin = route.gather(w_TK.detach(), _FP32, "meta", async_op)

        def finish():
            x_ND, w_NK = GatherFn.apply(route, lambda: (x_fin(), w_fin()), self._dispatch_bwd(x_TD.dtype), x_TD, w_TK)
            x_RD, handle.weight_R = gather_rows(x_ND, w_NK, handle)
            return x_RD, handle.tokens_per_local_expert, handle

        return Pending(finish)

    def combine_async(self, y_RD, handle: EPHandle, *, async_op: bool = True, gated: bool = False) -> Pending:
        """Apply the gates (unless the rows are ``gated`` already), pre-sum per last-hop row, issue the return
        all-to-all; ``wait()`` gives ``out_TD``."""
        z_ND = scatter_rows(y_RD, None if gated else handle.weight_R, handle)
        codec = self._y_codec(y_RD.dtype)
        fin = handle.route.reduce(z_ND.detach(), codec, "combine", async_op)
        return Pending(lambda: ReduceFn.apply(z_ND, handle.route, fin, codec, "combine_bwd"))

    # ------------------------------------------------------------------------------------------------ wire formats
    def _x_codec(self, x_TD):
        return Fp8Codec(x_TD.shape[1], x_TD.dtype, self._quant) if self.fp8 else CastCodec(None, x_TD.dtype)

    def _dispatch_bwd(self, x_dtype) -> list:
        """(codec, phase) of the gradients of x and of the gates, which travel back along the dispatch route."""
        return [(CastCodec(torch.bfloat16 if self.fp8 else None, x_dtype), "dispatch_bwd"), (_FP32, "meta")]

    def _y_codec(self, y_dtype):
        return CastCodec(torch.bfloat16 if self.fp8 else None, y_dtype)

    # ------------------------------------------------------------------------------------------------ raw seams
    # The same collectives and wire formats as dispatch/combine and their autograd backward, without autograd: the
    # caller (hai.pipeline.overlap) computes between them and drives the backward itself. Each hop of the payload
    # all-to-alls is issued asynchronously (``Pending.step()`` issues the next hop of a hierarchical route); the
    # routing-metadata exchange at the start of a dispatch (split sizes and rows, a few bytes per token) blocks.
    def dispatch_start(self, x_TD, topk_idx_TK, topk_weight_TK) -> tuple[EPHandle, Pending]:
        """Plan (blocking metadata exchange) and issue the dispatch; ``wait()`` gives (x_ND, w_NK) buffer rows."""
        handle = self._plan(topk_idx_TK)
        route = handle.route
        return handle, Joint(route.gather_chain(x_TD.detach(), self._x_codec(x_TD), "dispatch"),
                             route.gather_chain(topk_weight_TK.detach().float(), _FP32, "meta"))

    def dispatch_backward_start(self, g_x_ND, g_w_NK, handle: EPHandle) -> Pending:
        """Send the gradients of the buffer rows back, summing copies; ``wait()`` gives (g_x_TD, g_w_TK)."""
        (xc, xp), (wc, wp) = self._dispatch_bwd(g_x_ND.dtype)
        return Joint(handle.route.reduce_chain(g_x_ND.contiguous(), xc, xp),
                     handle.route.reduce_chain(g_w_NK.float().contiguous(), wc, wp))

    def combine_start(self, z_ND, handle: EPHandle) -> Pending:
        """Issue the combine of pre-summed rows; ``wait()`` gives out_TD."""
        return handle.route.reduce_chain(z_ND.detach(), self._y_codec(z_ND.dtype), "combine")

    def combine_backward_start(self, g_out_TD, handle: EPHandle) -> Pending:
        """Send the output gradient along the dispatch route; ``wait()`` gives g_z_ND."""
        return handle.route.gather_chain(g_out_TD.contiguous(), self._y_codec(g_out_TD.dtype), "combine_bwd")

    # ------------------------------------------------------------------------------------------------ planning
    # Host syncs: one per hop. Each hop exchanges a small table of counts (rows per destination; on the last hop also
    # rows per destination's local expert) with one all-to-all and reads it, with this rank's own send counts, in one
    # device-to-host transfer: the split sizes the payload all-to-alls and the grouped GEMMs need on the host. Every
    # other index (rows to send, local rows in (expert, source, token) order) is built by sorting on the device.
    # The count tables and routing rows go over ``meta_group``, a second communicator over the same ranks: on NCCL
    # a communicator runs its collectives in issue order on its own stream, so on the payload's communicator a hop's
    # count exchange would queue behind the other F&B chunk's payload all-to-all (megabytes) before its host read.
    # On its own it waits only for the compute already enqueued (the routing it reads), while the other chunk's
    # payload stays on the wire; the host read then costs the GPU one launch gap, as in DeepEP's normal kernels.
    def _plan(self, topk_idx_TK: torch.Tensor) -> EPHandle:
        """Route the metadata rows [rank, token, expert ids] hop by hop; the last hop's rows define the layout."""
        T, dev = topk_idx_TK.shape[0], topk_idx_TK.device
        meta_NM = torch.cat([torch.full((T, 1), self.rank, dtype=torch.long, device=dev),
                             torch.arange(T, device=dev).unsqueeze(1), topk_idx_TK.long()], dim=1)
        tokens_per_rank = self._dest_ranks(meta_NM).sum(0)
        tokens_per_node = self._dest_nodes(meta_NM).sum(0)
        hierarchical = self.mode == "hierarchical" and self.ep_nodes > 1  # one node: the same as flat
        steps = [self._node_entry, self._within_node] if hierarchical else [self._dest_ranks]
        traffic = new_traffic()
        route = Route([], self.group, self.links, [traffic, self.traffic], self.host_blocking)
        counts: list[int] = []
        for i, mask_fn in enumerate(steps):
            hop, meta_NM, counts = self._exchange(meta_NM, mask_fn(meta_NM), route, last=i == len(steps) - 1)
            route.hops.append(hop)
        row_R, k_R, expert_R = self._local_rows(meta_NM, sum(counts))
        return EPHandle(route, row_R, k_R, torch.empty(0, device=dev), meta_NM[row_R, 0], meta_NM[row_R, 1],
                        expert_R, T, counts, tokens_per_rank, tokens_per_node, traffic)

    def _exchange(self, meta_NM: torch.Tensor, mask_NP: torch.Tensor, route: Route,
                  last: bool) -> tuple[Hop, torch.Tensor, list[int]]:
        """One hop: send row i to every rank p with mask[i, p]. Exchange the count table (one all-to-all, one host
        read), then the metadata rows. Returns the hop, the received rows and (last hop) rows per local expert."""
        N, P, El = meta_NM.shape[0], self.ep, self.num_local_experts
        send_P = mask_NP.sum(0)
        table_PC = send_P.unsqueeze(1)
        if last:  # rows each destination's local experts will receive from this rank
            e_NK = meta_NM[:, 2:]
            sent_NK = mask_NP.gather(1, e_NK // El)
            per_expert = torch.zeros(P * El, dtype=torch.long, device=meta_NM.device)
            per_expert.scatter_add_(0, e_NK.reshape(-1), sent_NK.reshape(-1).long())
            table_PC = torch.cat([table_PC, per_expert.view(P, El)], dim=1)
        C = table_PC.shape[1]
        with self.links.blocking():
            recv_PC, _ = a2a(table_PC, [1] * P, [1] * P, self.meta_group)
        self.links.count(route.traffics, "meta", [1] * P, C * table_PC.element_size())
        host = torch.cat([send_P, recv_PC.reshape(-1)]).tolist()  # the hop's one host sync
        send_splits, recv_table = host[:P], [host[P + p * C:P + (p + 1) * C] for p in range(P)]
        recv_splits = [row[0] for row in recv_table]
        counts = [sum(row[1 + j] for row in recv_table) for j in range(El)] if last else []
        # rows grouped by destination rank, ascending within each: the first sum(send) entries of a stable sort
        order = torch.argsort((~mask_NP.t()).reshape(-1).to(torch.uint8), stable=True)[:sum(send_splits)]
        hop = Hop(order % N, send_splits, recv_splits, N)
        recv_meta, _ = route.send(meta_NM.index_select(0, hop.send_idx), hop.send_splits, hop.recv_splits, "meta",
                                  group=self.meta_group)
        return hop, recv_meta, counts

    def _dest_ranks(self, meta_NM: torch.Tensor) -> torch.Tensor:
        """(N, P) bool: ranks owning one of the row's experts."""
        ranks_NK = meta_NM[:, 2:] // self.num_local_experts
        mask_NP = torch.zeros(meta_NM.shape[0], self.ep, dtype=torch.bool, device=meta_NM.device)
        return mask_NP.scatter_(1, ranks_NK, True)

    def _dest_nodes(self, meta_NM: torch.Tensor) -> torch.Tensor:
        """(N, nodes) bool: nodes holding one of the row's experts."""
        nodes_NK = meta_NM[:, 2:] // (self.num_local_experts * self.ranks_per_node)
        mask_NG = torch.zeros(meta_NM.shape[0], self.ep_nodes, dtype=torch.bool, device=meta_NM.device)
        return mask_NG.scatter_(1, nodes_NK, True)

    def _node_entry(self, meta_NM: torch.Tensor) -> torch.Tensor:
        """(N, P) bool: for each destination node, its rank with this rank's local index."""
        mask_NP = torch.zeros(meta_NM.shape[0], self.ep, dtype=torch.bool, device=meta_NM.device)
        entry_G = torch.arange(self.ep_nodes, device=meta_NM.device) * self.ranks_per_node
        mask_NP[:, entry_G + self.rank % self.ranks_per_node] = self._dest_nodes(meta_NM)
        return mask_NP

    def _within_node(self, meta_NM: torch.Tensor) -> torch.Tensor:
        """(N, P) bool: ranks of this node owning one of the row's experts."""
        node_P = torch.arange(self.ep, device=meta_NM.device) // self.ranks_per_node
        return self._dest_ranks(meta_NM) & (node_P == self.rank // self.ranks_per_node)

    def _local_rows(self, meta_NM: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, slot k, local expert) of the R (row, expert on this rank) pairs, sorted by (expert, source, token):
        a stable sort of every pair's key with the pairs of other ranks' experts last."""
        K = meta_NM.shape[1] - 2
        e_NK = meta_NM[:, 2:] - self.rank * self.num_local_experts
        mine = (e_NK >= 0) & (e_NK < self.num_local_experts)
        key = (e_NK * self.ep + meta_NM[:, :1]) * 2**32 + meta_NM[:, 1:2]
        key = torch.where(mine, key, torch.iinfo(torch.long).max).reshape(-1)
        order = torch.argsort(key, stable=True)[:R]
        return order // K, order % K, e_NK.reshape(-1)[order]
