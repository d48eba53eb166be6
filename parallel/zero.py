"""ZeRO-1 AdamW: fp32 master weights and moments sharded over the data-parallel group.

Parameters are packed (in ``named_parameters`` order) into flat buckets keyed by (kind, weight decay): dense
parameters shard over the "dp" group, routed-expert parameters over "edp" (the ranks that hold the same experts).
Each step:

1. the flat gradient of a bucket is reduce-scattered (sum) into the owner's shard and divided by dp — for experts too,
   since the all-to-all already summed the ep ranks' contributions into the expert's owner;
2. the global gradient norm is the square root of the sum of every shard's squares over ``norm_groups``
   (dp, then pp), gradients are clipped by it (torch's ``clip_grad_norm_`` rule) and a non-finite norm skips the step;
3. each shard takes the AdamW step (the same arithmetic as ``torch.optim.AdamW``, decoupled weight decay), with the
   moments in fp32 or bf16;
4. the updated shards are all-gathered back into the (replicated) model parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ZeroAdamW", "StepResult", "is_expert_param"]

# torch 2.13 renamed the flat collectives (*_single); older versions only have the *_tensor names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_expert_param(name: str) -> bool:
    return ".experts." in name


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool


@dataclass
class _Bucket:
    names: list[str]
    params: list[nn.Parameter]
    group: object  # process group or None (one rank)
    decay: bool
    copies: int = 1  # pp ranks holding this parameter (DualPipe: 2); the global norm counts it once
    numel: int = 0
    shard: int = 0
    rank: int = 0
    world: int = 1
    master: torch.Tensor = field(default=None)
    exp_avg: torch.Tensor = field(default=None)
    exp_avg_sq: torch.Tensor = field(default=None)

    def setup(self, moment_dtype: torch.dtype) -> None:
        self.world = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.numel = sum(p.numel() for p in self.params)
        self.shard = -(-self.numel // self.world)
        flat = self._flat([p.detach() for p in self.params])
        self.master = flat[self.rank * self.shard:(self.rank + 1) * self.shard].float().clone()
        self.exp_avg = torch.zeros_like(self.master, dtype=moment_dtype)
        self.exp_avg_sq = torch.zeros_like(self.master, dtype=moment_dtype)

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        pad = self.shard * self.world - self.numel
        parts = [t.reshape(-1).float() for t in tensors]
        if pad:
            parts.append(parts[0].new_zeros(pad))
        return torch.cat(parts)  # one copy: no separate padding pass

    def grad_shard(self) -> torch.Tensor:
        flat = self._flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        if self.world == 1:
            return flat
        out = torch.empty(self.shard, dtype=flat.dtype, device=flat.device)
        _reduce_scatter(out, flat, op=dist.ReduceOp.SUM, group=self.group)
        return out

    @torch.no_grad()
    def gather_into_params(self) -> None:
        if self.world == 1:
            full = self.master
        else:
            full = torch.empty(self.shard * self.world, dtype=self.master.dtype, device=self.master.device)
            _all_gather(full, self.master, group=self.group)
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class ZeroAdamW:
    def __init__(self, named_params, *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 dp_group=None, edp_group=None, grad_divisor: int = 1, norm_groups=(), bf16_moments: bool = False,
                 max_grad_norm: float = 0.0, copies: dict[str, int] | None = None):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.grad_divisor, self.norm_groups, self.max_grad_norm = grad_divisor, list(norm_groups), max_grad_norm
        self.step_count = 0
        self.buckets: list[_Bucket] = []
        groups: dict[tuple[bool, bool, int], _Bucket] = {}
        for name, p in named_params:
            if not p.requires_grad:
                continue
            expert, decay = is_expert_param(name), p.dim() >= 2
            n_copies = (copies or {}).get(name, 1)
            key = (expert, decay, n_copies)
            if key not in groups:
                groups[key] = _Bucket([], [], edp_group if expert else dp_group, decay, n_copies)
            groups[key].names.append(name)
            groups[key].params.append(p)
        moment_dtype = torch.bfloat16 if bf16_moments else torch.float32
        for key in sorted(groups):
            groups[key].setup(moment_dtype)
            self.buckets.append(groups[key])

    def zero_grad(self) -> None:
        for b in self.buckets:
            for p in b.params:
                p.grad = None

    def state_bytes(self) -> int:
        """Optimizer-state bytes held by this rank (master shard + both moments)."""
        return sum(t.numel() * t.element_size() for b in self.buckets for t in (b.master, b.exp_avg, b.exp_avg_sq))

    def params(self) -> list[nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

    @torch.no_grad()
    def step(self, lr: float | None = None) -> StepResult:
        lr = self.lr if lr is None else lr
        grads = [b.grad_shard().div_(self.grad_divisor) for b in self.buckets]
        sq = torch.zeros((), dtype=torch.float64)
        for b, g in zip(self.buckets, grads):
            sq += torch.linalg.vector_norm(g, dtype=torch.float64).square() / b.copies
        for group in self.norm_groups:
            if group is not None:
                dist.all_reduce(sq, group=group)
        norm = math.sqrt(sq.item()) if math.isfinite(sq.item()) else float("inf")
        if not math.isfinite(norm):
            return StepResult(norm, skipped=True)
        if self.max_grad_norm > 0:
            coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        self.step_count += 1
        for b, g in zip(self.buckets, grads):
            self._adamw(b, g, lr)
            b.gather_into_params()
        return StepResult(norm, skipped=False)

    def _adamw(self, b: _Bucket, g: torch.Tensor, lr: float) -> None:
        """torch.optim.AdamW's single-tensor arithmetic, on the fp32 shard."""
        beta1, beta2 = self.betas
        t = self.step_count
        if b.decay and self.weight_decay:
            b.master.mul_(1 - lr * self.weight_decay)
        m = b.exp_avg.float().lerp_(g, 1 - beta1)
        v = b.exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** t)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(self.eps)
        b.master.addcdiv_(m, denom, value=-step_size)
        if m is not b.exp_avg:  # bf16 moments: store the fp32 update back
            b.exp_avg.copy_(m)
            b.exp_avg_sq.copy_(v)

    # ------------------------------------------------------------------ checkpoint support
    def shard_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, b in enumerate(self.buckets):
            out[f"b{i}.master"], out[f"b{i}.exp_avg"], out[f"b{i}.exp_avg_sq"] = b.master, b.exp_avg, b.exp_avg_sq
        return out
