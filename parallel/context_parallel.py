"""Context parallelism (CP) for MLA: the sequence split over the ranks of a CP group, the kv latents gathered.

:func:`shard_context_parallel` (called by :func:`hai.parallel.parallelize`) hands a :class:`CPGroup` to the modules
that meet the split (the transformer: embedding input and losses; MLA: keys and values; MoE: balance statistics).
The model's definition of which positions a rank holds (zig-zag: chunks i and 2·cp-1-i of 2·cp) and what each seam
does is :mod:`hai.model.sequence`; this module implements the collectives.

Per MLA layer and micro-batch (B sequences of S positions, a bytes per activation, C = kv_lora_rank, R =
qk_rope_head_dim):

==========================  =========================================  ===============================================
step                        collective                                 tensor bytes (what HAI hands to it)
==========================  =========================================  ===============================================
forward                     all-gather [c_kv | k_pe] (the kv latent    B·S·(C+R)·a  (output; V3: 576 values/position)
                            before its norm, the RoPE key before RoPE)
backward                    reduce-scatter of their gradient           B·S·(C+R)·a  (input)
backward, recompute=v3      all-gather again (the region keeps only    B·S·(C+R)·a
                            this rank's latents)
balance loss (MoE layers)   all-reduce of the per-sequence sums        2·B·E·4
==========================  =========================================  ===============================================

Every rank then up-projects the keys and values of the whole window (its queries attend by global position), so no
attention block is merged across ranks. The alternatives move the up-projected K and V: H·(N+R+V) values per
position (V3: 40,960, 71x the latents) in an all-gather, or the same bytes in cp-1 ring steps (which overlap compute
but still move 71x more); an absorbed attention over the latents moves the latents too but spends
H·(C+R) + H·C multiply-adds per query-key pair instead of H·(N+R+V) (3.4x the attention FLOPs for V3). The price of
gathering latents is the up-projection of all S keys on every rank: 2·S·C·H·(N+V) FLOPs per layer instead of
2·(S/cp)·C·H·(N+V) (hai/plan/cp.py counts both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import nn

from hai.model.sequence import SequenceSplit

__all__ = ["CPGroup", "shard_context_parallel", "gather_order"]

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@lru_cache(maxsize=None)
def gather_order(size: int) -> tuple[int, ...]:
    """For each global chunk g of 2·size, its index in the rank-major gathered buffer (rank r contributes its chunks
    r and 2·size-1-r, in that order)."""
    return tuple(2 * g if g < size else 2 * (2 * size - 1 - g) + 1 for g in range(2 * size))


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for g, j in enumerate(order):
        inv[j] = g
    return tuple(inv)


@dataclass
class CPGroup(SequenceSplit):
    """The model's :class:`~hai.model.sequence.SequenceSplit` over a CP group."""

    group: object  # the CP process group (None only for accounting on meta)
    size: int
    rank: int
    _index: dict = field(default_factory=dict, repr=False, compare=False)  # (order, device) -> index tensor

    def _chunks(self, x_SBC: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
        """Reorder the 2·size chunks along dim 0 (chunk g of the result is chunk order[g] of x)."""
        idx = self._index.get((order, x_SBC.device))
        if idx is None:  # built once per device: no host-to-device copy per collective
            idx = self._index[order, x_SBC.device] = torch.tensor(order, device=x_SBC.device)
        return x_SBC.view(2 * self.size, -1, *x_SBC.shape[1:]).index_select(0, idx).view(x_SBC.shape)

    def all_gather(self, x_BSC: torch.Tensor) -> torch.Tensor:
        xs = x_BSC.transpose(0, 1).contiguous()  # positions first: the gather concatenates along them
        out = torch.empty((self.size * xs.shape[0], *xs.shape[1:]), dtype=xs.dtype, device=xs.device)
        _all_gather(out, xs, group=self.group)
        return self._chunks(out, gather_order(self.size)).transpose(0, 1)

    def reduce_scatter(self, g_BSC: torch.Tensor) -> torch.Tensor:
        gs = self._chunks(g_BSC.transpose(0, 1).contiguous(), _inverse(gather_order(self.size)))
        out = torch.empty((gs.shape[0] // self.size, *gs.shape[1:]), dtype=gs.dtype, device=gs.device)
        _reduce_scatter(out, gs, op=dist.ReduceOp.SUM, group=self.group)
        return out.transpose(0, 1)

    def gather(self, x_BSC: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(x_BSC, self)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return _SumPass.apply(x, self)

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x


class _Gather(torch.autograd.Function):
    """All-gather into global order; backward: reduce-scatter of the gradient back to this rank's positions."""

    @staticmethod
    def forward(ctx, x, cp: CPGroup):
        ctx.cp = cp
        return cp.all_gather(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.cp.reduce_scatter(g), None


class _SumPass(torch.autograd.Function):
    """All-reduce (sum) over the CP group; the gradient passes through unchanged (every rank then uses the sum
    identically, so each back-propagates the same gradient into its own part)."""

    @staticmethod
    def forward(ctx, x, cp: CPGroup):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=cp.group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def shard_context_parallel(model: nn.Module, cp: CPGroup) -> None:
    """Hand the CP group to every module that meets the sequence split (no parameter is split: CP replicates
    the weights, ZeRO-1 shards their optimizer state over dp x cp)."""
    from hai.model.attention import MLA
    from hai.model.moe import MoE

    for module in model.modules():
        if isinstance(module, (MLA, MoE)):
            module.cp = cp
    model.cp = cp
