"""ZeRO-1 AdamW with Megatron's distributed-optimizer layout: flat buffers, fp32 gradients, sharded fp32 state.

Parameters are packed (in ``named_parameters`` order) into buckets keyed by (routed expert or not, weight decay,
pipeline holders). Dense buckets shard over the "dp" group, routed-expert buckets over "edp" (the ranks that hold
the same experts). A bucket owns, for its ``numel`` elements padded to ``shard * world``:

- ``params``: one flat buffer in the model's weight dtype (bf16 under V3's recipe); every module parameter is a
  view into it, so the all-gather of the updated weights writes straight into the modules;
- ``grad``: one flat fp32 buffer; every parameter's ``main_grad`` is a view into it. Gradients are accumulated there
  in fp32 across micro-batches (a post-accumulate hook adds each autograd gradient and frees it; deferred
  weight-gradient GEMMs add into ``main_grad`` directly);
- this rank's shard of the fp32 master weights and of both AdamW moments (fp32, or bf16 with ``bf16_moments``).

Each step:

1. parameters held by several pipeline ranks (DualPipe's two copies of a stage, an embedding shared by the first and
   last stage) all-reduce their bucket's gradient buffer over their copy group, in place; replicated parameters whose
   gradient is a TP rank's part (``tp_partial``: hai.parallel.tensor_parallel) all-reduce theirs over the TP group;
2. each bucket's gradient buffer is reduce-scattered in place (sum) into this rank's shard of it and divided by dp —
   for experts too, since the all-to-all already summed the ep ranks' contributions into the expert's owner. With
   ``train.overlap_grad_reduce`` (Megatron's ``overlap_grad_reduce``, DeepSpeed's ``overlap_comm``) this starts
   during the backward of the step's last micro-batch: buckets closing at ``train.grad_bucket_elements`` elements
   (split at parameter boundaries, each padded to its own ``shard * world``) are launched asynchronously, in one fixed
   order on every rank (the reverse of the parameters' order: the order the backward finishes them), each as soon as
   the gradients of all its parameters are final and every bucket before it has been launched; the step waits for
   them (:meth:`ZeroAdamW.arm_grad_sync`);
3. the global gradient norm is the square root of the sum of every shard's squares over ``norm_groups`` (dp, then
   pp, and tp; copies and TP replicas counted once), gradients are clipped by it (torch's ``clip_grad_norm_``
   rule) and a non-finite norm skips the step;
4. each shard takes the AdamW step on its fp32 master (``torch.optim.AdamW``'s arithmetic, decoupled weight decay);
5. the master shard is cast into this rank's slice of the parameter buffer and the buffer is all-gathered in place.

No step allocates anything the size of a bucket: the collectives work on the persistent buffers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hai.config import TrainConfig
from hai.model.wgrad import in_inner_backward

__all__ = ["ZeroAdamW", "ZeroGroups", "StepResult", "ParamShard", "is_expert_param", "bucket_layout", "split_sizes"]

# torch 2.13 renamed the flat collectives (*_single); older versions only have the *_tensor names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def split_sizes(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive parameters (by element count) grouped into buckets of at least ``limit`` elements each (the last
    may be smaller; a parameter is never split): a bucket closes once it reaches ``limit``. ``limit <= 0``: one
    bucket. Returns the parameter indices of each bucket."""
    out: list[list[int]] = [[]]
    filled = 0
    for i, n in enumerate(sizes):
        if limit > 0 and filled >= limit:
            out.append([])
            filled = 0
        out[-1].append(i)
        filled += n
    return out if out[0] else []


def bucket_layout(numel: int, world: int) -> tuple[int, int]:
    """(shard elements per rank, padded buffer elements) of a bucket of ``numel`` elements over ``world`` ranks."""
    shard = -(-numel // world)
    return shard, shard * world


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool


def _world_rank(group) -> tuple[int, int]:
    return (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)


@dataclass
class ParamShard:
    """One parameter's part of this rank's optimizer shard: flattened elements ``[lo, hi)`` of ``param`` and the
    views of them in each state tensor (``master``, ``exp_avg``, ``exp_avg_sq``; empty when this rank holds none)."""

    name: str
    param: nn.Parameter
    lo: int
    hi: int
    state: dict[str, torch.Tensor]


@dataclass
class _Bucket:
    names: list[str]
    params: list[nn.Parameter]
    group: object  # process group or None (one rank)
    decay: bool
    copies: int = 1  # pp ranks holding these parameters (DualPipe: 2); the global norm counts them once
    copy_group: object = None  # the group summing gradients over those copies
    tp_sum: object = None  # tensor parallel: the TP group summing these replicated parameters' partial gradients
    tp_copies: int = 1  # TP ranks holding these parameters whole (the norm counts them once)
    numel: int = 0
    shard: int = 0
    rank: int = 0
    world: int = 1
    param_buffer: torch.Tensor = field(default=None)
    grad: torch.Tensor = field(default=None)
    master: torch.Tensor = field(default=None)
    exp_avg: torch.Tensor = field(default=None)
    exp_avg_sq: torch.Tensor = field(default=None)
    first: int = 0  # index (in named_parameters order) of this bucket's first parameter: the launch order
    pending: set = field(default_factory=set)  # armed: ids of parameters whose final gradient has not arrived yet
    started: bool = False  # this step's sync has started (the copy / TP sums done, the reduce-scatter issued)
    work: object = None  # the in-flight reduce-scatter (None: nothing to wait for)
    on_ready: object = None  # armed: called when the last pending parameter's gradient arrives

    def early(self) -> bool:
        """Whether the gradient sync may start inside the backward: a single reduce-scatter over the data-parallel
        group (buckets also summed over pipeline copies or TP ranks sync at the step)."""
        return self.world > 1 and self.copy_group is None and self.tp_sum is None

    def _hook(self, p: torch.Tensor) -> None:
        if self.started and p.grad is not None:
            name = next(n for n, q in zip(self.names, self.params) if q is p)
            raise RuntimeError(f"a gradient of {name} arrived after its bucket's "
                               f"reduce-scatter started: a backward it was not armed for added to it (set "
                               f"train.overlap_grad_reduce=false, and report it)")
        _to_main_grad(p)
        if self.on_ready is not None and id(p) in self.pending and not in_inner_backward():
            self.pending.discard(id(p))  # (an inner backward's accumulations are partial: hai.model.wgrad)
            if not self.pending:
                self.on_ready()

    def setup(self, moment_dtype: torch.dtype) -> None:
        self.world, self.rank = _world_rank(self.group)
        self.numel = sum(p.numel() for p in self.params)
        self.shard, padded = bucket_layout(self.numel, self.world)
        p0 = self.params[0]
        # adopt: the module parameters become views of the flat buffer, each old tensor freed as it is copied; the
        # gradient buffer is allocated only then, so construction never holds more than the final buffers
        self.param_buffer = torch.empty(padded, dtype=p0.dtype, device=p0.device)
        self.param_buffer[self.numel:].zero_()
        offset = 0
        for p in self.params:
            view = self.param_buffer[offset:offset + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
            offset += p.numel()
        self.grad = torch.zeros(padded, dtype=torch.float32, device=p0.device)
        offset = 0
        for p in self.params:
            p.main_grad = self.grad[offset:offset + p.numel()].view_as(p)
            if getattr(p, "main_grad_hook", None) is not None:  # adopted again (a new optimizer): one hook only
                p.main_grad_hook.remove()
            p.main_grad_hook = p.register_post_accumulate_grad_hook(self._hook)
            offset += p.numel()
        self.master = self.param_shard().float().clone()
        self.exp_avg = torch.zeros_like(self.master, dtype=moment_dtype)
        self.exp_avg_sq = torch.zeros_like(self.master, dtype=moment_dtype)

    def param_shard(self) -> torch.Tensor:
        return self._shard_of(self.param_buffer)

    def start_sync(self) -> None:
        """Sum this bucket's gradients over its copies and TP ranks (in place) and start the reduce-scatter over
        its data-parallel group into this rank's shard (asynchronous: :meth:`grad_shard` waits)."""
        if self.started:
            return
        self.started = True
        if self.copy_group is not None:
            dist.all_reduce(self.grad, group=self.copy_group)
        if self.tp_sum is not None:
            dist.all_reduce(self.grad, group=self.tp_sum)
        if self.world > 1:
            self.work = _reduce_scatter(self._shard_of(self.grad), self.grad, op=dist.ReduceOp.SUM, group=self.group,
                                        async_op=True)

    def grad_shard(self) -> torch.Tensor:
        """This rank's shard of the summed gradients (a view of the gradient buffer), once its sync has ended."""
        self.start_sync()
        self.settle()
        return self._shard_of(self.grad)

    def settle(self) -> None:
        """Wait for the reduce-scatter in flight, if any; the next step's sync may start again."""
        if self.work is not None:
            self.work.wait()
        self.work, self.started = None, False

    def _shard_of(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.rank * self.shard:(self.rank + 1) * self.shard]

    @torch.no_grad()
    def gather_into_params(self) -> None:
        self.param_shard().copy_(self.master)
        if self.world > 1:
            _all_gather(self.param_buffer, self.param_shard(), group=self.group)


_CPU_CHUNK = 1 << 16  # elements per AdamW chunk on CPU (256 KiB of fp32 per operand)


def _sq_norm(g: torch.Tensor, row: int = 1024) -> torch.Tensor:
    """Squared L2 norm of a flat fp32 gradient as a float64 0-d tensor: fp32 norms of rows of ``row`` elements,
    their squares summed in float64. As accurate as a float64 norm (rel. ~1e-9 at 10M elements, where one fp32
    norm over all of them is off by ~1e-4 on CPU) at fp32 speed (a float64 pass is ~20x slower on CPU, and slow on
    GPUs without full-rate fp64)."""
    n = g.numel() // row * row
    sq = torch.linalg.vector_norm(g[:n].view(-1, row), dim=1).double().square().sum()
    if n < g.numel():
        sq = sq + torch.linalg.vector_norm(g[n:]).double().square()
    return sq


def _to_main_grad(p: torch.Tensor) -> None:
    """Post-accumulate hook: move an autograd gradient into the fp32 flat buffer and free it (autograd also calls it
    when a Function returned no gradient for the parameter: the deferred weight-gradient GEMMs write main_grad
    themselves)."""
    if p.grad is None:
        return
    p.main_grad.add_(p.grad)
    p.grad = None


@dataclass(frozen=True)
class ZeroGroups:
    """The process groups ZeRO-1 works over (None: one rank): dense parameters' shards over ``dp``, routed experts'
    over ``edp``, TP-partial gradients summed over ``tp``; the gradient norm's squares summed over ``norm``; the
    summed gradients divided by ``grad_divisor`` (the data-parallel size: each rank's loss is its own mean)."""

    dp: object = None
    edp: object = None
    tp: object = None
    norm: tuple = ()
    grad_divisor: int = 1


class ZeroAdamW:
    """``named_params``: the module parameters (materialized); ``train``: the ``train`` config section (lr, betas,
    eps, weight decay, ``grad_clip``, ``bf16_moments``); ``placement``: the parallel layout of this rank
    (:class:`hai.parallel.parallelize.Placement`: the pipeline copies of each parameter and the group summing
    them, the TP-partial and TP-replicated parameters), None on one rank."""

    def __init__(self, named_params, train, groups: ZeroGroups = ZeroGroups(), placement=None):
        self.lr, self.betas, self.eps = train.lr, (train.beta1, train.beta2), train.eps
        self.weight_decay, self.max_grad_norm = train.weight_decay, train.grad_clip
        self.grad_divisor, self.norm_groups = groups.grad_divisor, list(groups.norm)
        holders = placement.holders if placement is not None else {}
        copies = {n: (placement.copies(n), placement.copy_group(n)) for n in holders}
        tp_partial = placement.tp_partial if placement is not None else set()
        tp_replicated = placement.tp_replicated if placement is not None else set()
        dp_group, edp_group, tp_group = groups.dp, groups.edp, groups.tp
        self.step_count = 0
        self.fused_update: bool | None = None  # None: fused where the device has it (see fused())
        self._step_t: torch.Tensor | None = None  # the fused kernel's step count, on the device
        self.buckets: list[_Bucket] = []
        groups: dict[tuple, _Bucket] = {}
        order: dict[object, int] = {}
        first: dict[tuple, list[int]] = {}
        for index, (name, p) in enumerate(named_params):
            if not p.requires_grad:
                continue
            expert, decay = is_expert_param(name), p.dim() >= 2
            n_copies, copy_group = (copies or {}).get(name, (1, None))
            gid = order.setdefault(copy_group, len(order))  # groups are not orderable: key by first appearance
            partial, whole = name in tp_partial, name in tp_replicated
            key = (expert, decay, n_copies, gid, partial, whole)
            if key not in groups:
                tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
                groups[key] = _Bucket([], [], edp_group if expert else dp_group, decay, n_copies, copy_group,
                                      tp_group if partial else None, tp_size if whole else 1)
            groups[key].names.append(name)
            groups[key].params.append(p)
            first.setdefault(key, []).append(index)
        moment_dtype = torch.bfloat16 if train.bf16_moments else torch.float32
        limit = getattr(train, "grad_bucket_elements", TrainConfig.grad_bucket_elements)
        self.overlap = bool(getattr(train, "overlap_grad_reduce", True))
        for key in sorted(groups):
            g = groups[key]
            for part in split_sizes([p.numel() for p in g.params], limit):
                b = _Bucket([g.names[i] for i in part], [g.params[i] for i in part], g.group, g.decay, g.copies,
                            g.copy_group, g.tp_sum, g.tp_copies, first=first[key][part[0]])
                b.setup(moment_dtype)
                self.buckets.append(b)
        # the launch order of the overlapped gradient sync: buckets of later parameters first (the backward
        # finishes them first); the same on every rank, as the collectives of a group must be
        self._launch = sorted((b for b in self.buckets if b.early()), key=lambda b: -b.first)
        self._bucket_of = {id(p): b for b in self._launch for p in b.params}
        self._next, self._armed = 0, False
        self.launched_in_backward = 0  # buckets whose sync started before the step (the last armed backward)

    # ------------------------------------------------------------------ overlapped gradient sync
    def arm_grad_sync(self, by_hooks: bool = True) -> None:
        """Start tracking which gradients are final (no-op without ``overlap_grad_reduce``); each bucket's
        reduce-scatter starts as soon as all its parameters' gradients are, in the launch order; :meth:`step` starts
        the rest and waits for all. ``by_hooks`` (no pipeline): call before the backward of the step's last
        micro-batch; a gradient is final when its post-accumulate hook runs in that backward (a parameter it does
        not reach holds its bucket, and those after it, until the step). Otherwise (the pipeline, whose zero-bubble
        split adds weight gradients after the hooks): call before the schedule; the executor says when a stage's
        last backward and weight-gradient work have run (:meth:`grads_final`)."""
        if not self.overlap:
            return
        self._settle()
        self._next, self.launched_in_backward, self._armed = 0, 0, True
        for b in self._launch:
            b.pending = {id(p) for p in b.params}
            b.on_ready = self._launch_ready if by_hooks else None

    def grads_final(self, params) -> None:
        """These parameters' gradients are final for this step (the pipeline executor, after their stages' last
        gradient work): start every bucket this completes, in the launch order."""
        if not self._armed:
            return
        for p in params:
            b = self._bucket_of.get(id(p))
            if b is not None:
                b.pending.discard(id(p))
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._armed and self._next < len(self._launch) and not self._launch[self._next].pending:
            self._launch[self._next].start_sync()
            self._next += 1
            self.launched_in_backward += 1

    def _settle(self) -> None:
        """No reduce-scatter left in flight and nothing armed (a backward that no step followed: its in-flight
        reduce-scatters end before their buffers are zeroed or summed into again)."""
        for b in self._launch:
            b.settle()
        self._disarm()

    def _disarm(self) -> None:
        self._armed = False
        for b in self._launch:
            b.pending, b.on_ready = set(), None

    def zero_grad(self) -> None:
        self._settle()
        for b in self.buckets:
            b.grad.zero_()
            for p in b.params:
                p.grad = None

    def state_bytes(self) -> int:
        """Optimizer-state bytes held by this rank (master shard + both moments)."""
        return sum(t.numel() * t.element_size() for b in self.buckets for t in (b.master, b.exp_avg, b.exp_avg_sq))

    def buffer_bytes(self) -> dict[str, int]:
        """Bytes of the flat parameter and gradient buffers (padding included) and of the optimizer state."""
        return {"parameters": sum(b.param_buffer.numel() * b.param_buffer.element_size() for b in self.buckets),
                "gradients": sum(b.grad.numel() * b.grad.element_size() for b in self.buckets),
                "optimizer": self.state_bytes()}

    def params(self) -> list[nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

    @torch.no_grad()
    def step(self, lr: float | None = None) -> StepResult:
        lr = self.lr if lr is None else lr
        self._disarm()
        for b in self._launch:  # what the backward did not start, in the launch order
            b.start_sync()
        grads = [b.grad_shard().div_(self.grad_divisor) for b in self.buckets]
        sq = None
        for b, g in zip(self.buckets, grads):
            part = _sq_norm(g) / (b.copies * b.tp_copies)
            sq = part if sq is None else sq + part
        if sq is None:
            return StepResult(0.0, skipped=False)
        for group in self.norm_groups:
            if group is not None:
                dist.all_reduce(sq, group=group)
        total = sq.item()
        norm = math.sqrt(total) if math.isfinite(total) else float("inf")
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

    def fused(self, b: _Bucket) -> bool:
        """Whether ``b``'s update runs torch's fused AdamW kernel (one kernel over the shard): on CUDA with fp32
        moments (the fused kernel takes one dtype for weights and moments, so bf16 moments keep the fp32 arithmetic
        below), or wherever ``fused_update`` forces it (the CPU test of its arithmetic)."""
        if self.fused_update is not None:
            return self.fused_update
        return b.master.device.type == "cuda" and b.exp_avg.dtype == torch.float32

    def _adamw(self, b: _Bucket, g: torch.Tensor, lr: float) -> None:
        """torch.optim.AdamW's arithmetic on the fp32 shard: torch's fused kernel where :meth:`fused` says so (equal
        to the explicit ops up to the rounding of its fused multiply-adds), else the explicit single-tensor ops. On
        CPU those run in cache-sized chunks: the same elementwise result, but the temporaries stay in cache and are
        reused instead of a fresh shard-sized allocation (page faults) per op, which made the flat-buffer update
        ~1.6x slower than torch's per-parameter loop; on a GPU one pass per op (each chunk would be a launch)."""
        if self.fused(b):
            beta1, beta2 = self.betas
            if self._step_t is None or self._step_t.device != g.device:  # one device scalar, filled each step
                self._step_t = torch.zeros((), dtype=torch.float32, device=g.device)
            step = self._step_t.fill_(self.step_count)  # a kernel, not a host-to-device copy
            torch._fused_adamw_([b.master], [g], [b.exp_avg], [b.exp_avg_sq], [], [step], lr=lr, beta1=beta1,
                                beta2=beta2, weight_decay=self.weight_decay if b.decay else 0.0, eps=self.eps,
                                amsgrad=False, maximize=False)
            return
        n = g.numel()
        step = _CPU_CHUNK if g.device.type == "cpu" else max(n, 1)
        for i in range(0, n, step):
            j = min(n, i + step)
            self._adamw_part(b.master[i:j], b.exp_avg[i:j], b.exp_avg_sq[i:j], g[i:j], lr, b.decay)

    def _adamw_part(self, master, exp_avg, exp_avg_sq, g, lr: float, decay: bool) -> None:
        beta1, beta2 = self.betas
        t = self.step_count
        if decay and self.weight_decay:
            master.mul_(1 - lr * self.weight_decay)
        m = exp_avg.float().lerp_(g, 1 - beta1)
        v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** t)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(self.eps)
        master.addcdiv_(m, denom, value=-step_size)
        if m is not exp_avg:  # bf16 moments: store the fp32 update back
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)

    # ------------------------------------------------------------------ checkpoint support
    STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")

    def shard_state(self) -> Iterator[ParamShard]:
        """This rank's optimizer state per parameter (in bucket order): for each parameter the range ``[lo, hi)`` of
        its flattened elements this rank's shard holds (empty when ``lo == hi``) and views of that range of the
        fp32 master weights and both moments, so a checkpoint reads and writes them in place."""
        for b in self.buckets:
            lo, hi = b.rank * b.shard, min((b.rank + 1) * b.shard, b.numel)
            start = 0
            for name, p in zip(b.names, b.params):
                a, z = max(lo, start), min(hi, start + p.numel())
                state = {k: getattr(b, k)[a - lo:z - lo] for k in self.STATE_KINDS} if a < z else {}
                yield ParamShard(name, p, max(a - start, 0), max(z - start, 0), state)
                start += p.numel()
