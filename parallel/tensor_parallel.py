"""Tensor-slice model parallelism and sequence parallelism (Megatron-LM's TP + SP) on plain local shards.

:func:`shard_tensor_parallel` (called by :func:`hai.parallel.parallelize` on the ``meta`` model) keeps this TP rank's
slice of every split weight and gives the modules a :class:`TPGroup`:

===========================  ==================================  =================================================
module                       split                               collectives (fwd / bwd)
===========================  ==================================  =================================================
MLA ``wq_b`` (or ``wq``),    column-wise by heads                enter the TP region on the latents (the small
``wkv_b``                                                        down-projections and their norms stay replicated)
MLA ``wo``                   row-wise by heads                   exit: partial sums reduced
dense MLP / shared experts   ``w1``, ``w3`` column, ``w2`` row   enter / exit around the MLP
embedding                    vocabulary rows                     masked lookup, partial sums reduced
head + cross-entropy         vocabulary rows                     vocabulary-parallel log-softmax (max, sum-exp and
                                                                 target logit all-reduced; no logits gathered)
router, routed experts       not split                           each TP rank routes its own sequence shard
===========================  ==================================  =================================================

Entering the region is, without SP, an identity whose backward all-reduces (Megatron's ``f``), and with SP an
all-gather along the sequence whose backward reduce-scatters; exiting is an all-reduce (``g``), or with SP a
reduce-scatter along the sequence whose backward all-gathers. With SP the residual stream, the norms and the MoE
hold ``S / tp`` positions per rank.

Gradients. A split weight's gradient is complete on its rank. A replicated parameter gets a complete, identical
gradient on every TP rank when everything below it is replicated (no SP: the norms and the MLA down-projections);
otherwise it sees only this rank's part (its sequence shard under SP; the latent norms, which sit inside the region,
see only this rank's heads; the router and anything the MoE holds see this rank's tokens), and the optimizer sums it
over the TP group (``tp_partial``). The global gradient norm counts every replicated parameter once.

Why plain shards and not DTensor parameters (``parallelize_module``): HAI's ZeRO-1 keeps every parameter as a view of
a flat bf16 buffer with an fp32 ``main_grad`` view, the zero-bubble W split and the FP8 GEMMs take plain tensors, and
the DualPipe copies and expert shards already travel as plain local tensors; DTensor parameters would need all of
them to unwrap and rewrap. The collectives are the same ones DTensor's Colwise/Rowwise/SequenceParallel styles issue,
written out as one autograd function over four collective pairs; checkpoints record each shard's global offset,
so DCP reshards across tp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hai.model.regions import Region

__all__ = ["TPGroup", "shard_tensor_parallel", "enter", "exit_region", "vocab_embed", "vocab_parallel_ce",
           "all_reduce_sum", "TP_SPLITS"]

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class TPGroup(Region):
    """The model's :class:`~hai.model.regions.Region` over a TP group: its crossings are the collectives below."""

    group: object  # the TP process group (None only for accounting on meta)
    size: int
    rank: int
    sp: bool  # sequence parallelism

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return enter(x, self)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        return exit_region(y, self)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x, self)

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def embed(self, embedding: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        return vocab_embed(embedding, tokens, self)

    def cross_entropy(self, logits_TV: torch.Tensor, target_T: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_ce(logits_TV, target_T, self)


# ------------------------------------------------------------------------------------------------ the collectives
def _gather_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """(B, S/tp, ...) -> (B, S, ...): rank r's shard at positions [r*S/tp, (r+1)*S/tp)."""
    xs = x.transpose(0, 1).contiguous()  # sequence first, so the gather concatenates along it
    out = torch.empty((tp.size * xs.shape[0], *xs.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, xs, group=tp.group)
    return out.transpose(0, 1).contiguous()


def _reduce_scatter_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """(B, S, ...) partial sums -> (B, S/tp, ...) this rank's shard of their sum."""
    xs = x.transpose(0, 1).contiguous()
    out = torch.empty((xs.shape[0] // tp.size, *xs.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, xs, op=dist.ReduceOp.SUM, group=tp.group)
    return out.transpose(0, 1).contiguous()


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=tp.group)
    return x


def _identity(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x


class _Collective(torch.autograd.Function):
    """``fwd`` in the forward, ``bwd`` on the gradient: Megatron's f (identity / all-reduce) and g (all-reduce /
    identity), and SP's all-gather / reduce-scatter pair (entering a region) and its mirror (leaving one)."""

    @staticmethod
    def forward(ctx, x, tp, fwd, bwd):
        ctx.tp, ctx.bwd = tp, bwd
        y = fwd(x, tp)
        return x.view_as(x) if y is x else y

    @staticmethod
    def backward(ctx, g):
        return ctx.bwd(g, ctx.tp), None, None, None


def enter(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    """Into a TP region (the input of column-split weights): full sequence, replicated."""
    if tp is None:
        return x
    return _Collective.apply(x, tp, *((_gather_seq, _reduce_scatter_seq) if tp.sp else (_identity, _all_reduce)))


def exit_region(y: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    """Out of a TP region (the output of row-split weights, partial sums): reduced, and with SP sequence-sharded."""
    if tp is None:
        return y
    return _Collective.apply(y, tp, *((_reduce_scatter_seq, _gather_seq) if tp.sp else (_all_reduce, _identity)))


def all_reduce_sum(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    """Sum over the TP group, gradient passed through unchanged (statistics every TP rank then uses identically,
    e.g. the sequence-wise balance loss's per-sequence sums under SP)."""
    return x if tp is None else _Collective.apply(x, tp, _all_reduce, _identity)


# ------------------------------------------------------------------------------------------- vocabulary parallel
def vocab_embed(embed: nn.Embedding, tokens: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    """Embedding with rows [v0, v1) on this rank: a token outside looks up zeros; the partial sums are reduced (and
    with SP reduce-scattered to this rank's sequence shard)."""
    if tp is None:
        return embed(tokens)
    rows = embed.weight.shape[0]
    local = tokens - tp.rank * rows
    outside = (local < 0) | (local >= rows)
    h = embed(local.masked_fill(outside, 0)).masked_fill(outside.unsqueeze(-1), 0.0)
    return exit_region(h, tp)


class _VocabParallelCE(torch.autograd.Function):
    """Mean cross-entropy of logits split by vocabulary rows over the TP group: the max, then the sum of
    exponentials with the target's logit (two all-reduces, three scalars per token); the logits never gathered.
    Softmax in fp32; keeps the
    local logits, one fp32 log-sum-exp and the target per row (as the single-device cross-entropy)."""

    @staticmethod
    def forward(ctx, logits_TV, target_T, tp):
        with torch.autocast(logits_TV.device.type, enabled=False):
            l32 = logits_TV.float()
            V = l32.shape[1]
            valid = target_T >= 0  # a negative target is padding (MTP under SP): no loss, no gradient
            n_valid = valid.sum().clamp_min(1).float()
            local = target_T - tp.rank * V
            inside = (local >= 0) & (local < V)
            m = l32.max(dim=1).values
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp.group)
            tl = l32.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1) * inside
            sums = torch.stack([torch.exp(l32 - m[:, None]).sum(dim=1), tl])  # one all-reduce for both sums
            dist.all_reduce(sums, group=tp.group)
            sum_exp, tl = sums
            lse = m + torch.log(sum_exp)
            loss = ((lse - tl) * valid).sum() / n_valid
        ctx.save_for_backward(logits_TV, lse, local, inside, valid, n_valid)
        return loss

    @staticmethod
    def backward(ctx, g):
        logits, lse, local, inside, valid, n_valid = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            p = torch.exp(logits.float() - lse[:, None])
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, local.clamp(0, p.shape[1] - 1)] -= inside.float()
            return (p * (valid.float() * (g / n_valid))[:, None]).to(logits.dtype), None, None


def vocab_parallel_ce(logits_TV: torch.Tensor, target_T: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _VocabParallelCE.apply(logits_TV, target_T, tp)


# ----------------------------------------------------------------------------------------------------- sharding
# parameter-name suffix -> dimension split over tp (0: output rows / vocabulary rows, 1: input columns)
TP_SPLITS = {"attn.wq.weight": 0, "attn.wq_b.weight": 0, "attn.wkv_b.weight": 0, "attn.wo.weight": 1,
             "ffn.w1.weight": 0, "ffn.w3.weight": 0, "ffn.w2.weight": 1,
             "ffn.shared.w1.weight": 0, "ffn.shared.w3.weight": 0, "ffn.shared.w2.weight": 1,
             "embed.weight": 0, "head.weight": 0}
# replicated parameters whose gradient is this rank's part only even without SP: inside the region, or the router
# (which routes this rank's tokens). The routed experts are not replicated over tp: they are sharded over the EP
# groups of the stage's dp x tp ranks, and the all-to-all already brings them every rank's tokens.
_PARTIAL_ALWAYS = ("attn.q_norm.weight", "attn.kv_norm.weight", "ffn.router.")


def tp_split_dim(name: str) -> int | None:
    for suffix, dim in TP_SPLITS.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def tp_replicated(name: str) -> bool:
    """Held whole by every TP rank (counted once in the gradient norm)."""
    return tp_split_dim(name) is None and ".experts." not in name


def tp_partial(name: str, sp: bool, recompute: str = "none") -> bool:
    """Does this replicated parameter's gradient need summing over the TP group? (module docstring) Under
    ``train.recompute=v3`` the dense MLP's and the head's regions are entered on the residual, so their norms (the
    ffn norms and the final norm) sit inside the region and see this rank's columns only."""
    if not tp_replicated(name):
        return False
    if any(k in name for k in _PARTIAL_ALWAYS):
        return True
    if recompute == "v3" and (name.endswith("ffn_norm.weight") or name == "norm.weight" or
                              (name.startswith("mtp.") and name.endswith(".norm.weight"))):
        return True
    return sp  # under SP every replicated parameter below the region sees this rank's sequence shard only


def _keep(module: nn.Module, pname: str, dim: int, rank: int, size: int) -> None:
    p = getattr(module, pname)
    n = p.shape[dim] // size
    setattr(module, pname, nn.Parameter(p.narrow(dim, rank * n, n).clone(), requires_grad=p.requires_grad))
    shards = dict(getattr(module, "tp_shard", {}))
    shards[pname] = (dim, rank * n, p.shape[dim])  # (dim, first global index, global size): init and checkpoints
    module.tp_shard = shards


def shard_tensor_parallel(model: nn.Module, tp: TPGroup) -> None:
    """Keep this TP rank's slice of every split weight (new Parameters; on ``meta`` nothing is allocated) and hand
    the TP group to the modules that communicate."""
    from hai.model.attention import MLA
    from hai.model.layers import SwiGLU
    from hai.model.moe import MoE

    for name, module in model.named_modules():
        for pname, _ in list(module.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            dim = tp_split_dim(full)
            if dim is not None:
                _keep(module, pname, dim, tp.rank, tp.size)
        if isinstance(module, (MLA, SwiGLU, MoE)):
            module.tp = tp
        if isinstance(module, MLA):
            module.n_heads = module.cfg.num_heads // tp.size
    model.tp = tp
