"""Pipeline executor: runs any schedule from ``hai.pipeline.schedules`` on real stage modules with batched P2P.

The single-device model is cut into stages (``split_model``): every rank builds the whole model from the same seed
(so stages start identical to the single-process reference), keeps the layers of the stages it holds and drops the
rest. Stage 0 embeds; the last stage computes the main and MTP losses and needs the embedding too, so the embedding
lives on the rank(s) holding stage 0 *and* those holding the last stage. DualPipe puts stage r and stage PP-1-r on
rank r, so embedding, head and MTP share one rank physically, as in DeepSeek-V3; every stage then exists on two
ranks, and the copies' gradients are summed before the optimizer step (``PipelineExecutor.sync_copies``) so they stay
identical.

Actions: F runs a stage forward and keeps (input, output) for the backward; B runs the input-gradient backward with
the stage's linear layers recording their weight-gradient GEMMs in a :class:`WeightGradStore`, which the later W
action runs (zero-bubble split); BW is a full backward; FB is the forward of one micro-batch and the full backward of
another (its weight gradients deferred, then run before the next action). Consecutive SEND/RECV actions are issued as one ``batch_isend_irecv`` and waited before the next compute
action. Every action is recorded in ``timeline``.

With ``overlap=True`` (the default), when the schedule has FB actions and the stages hold expert-parallel MoE blocks,
every stage forward is recorded on a :class:`~hai.pipeline.overlap.Tape` cut at the MoE all-to-all seams, and an FB
action interleaves the two chunks so that each one's dispatch/combine (or their gradients) is in flight while the
other computes (``hai.pipeline.overlap``); ``fb_sequential=True`` runs the same segments one chunk after the other
(bitwise the same results: the identity test). Otherwise each stage runs as one autograd graph (a
:class:`~hai.pipeline.overlap.PlainTape`, the same code path without cuts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hai.model.transformer import Transformer
from hai.model.wgrad import WeightGradStore
from hai.parallel.topology import stage_layer_split
from hai.model.moe import LocalDispatcher
from hai.pipeline.overlap import PlainTape, Tape, block_forward, run_fb, supports_seams
from hai.pipeline.schedules import Action, Kind, build_schedule, num_stages, rank_stages
from hai.pipeline.simulate import add_send_recv
from hai.pipeline.trace import Event, save_chrome_trace, save_gantt_png

__all__ = ["PipelineExecutor", "split_model", "stage_layers"]


def stage_layers(num_layers: int, n_stages: int) -> list[range]:
    bounds, start = [], 0
    for n in stage_layer_split(num_layers, n_stages):
        bounds.append(range(start, start + n))
        start += n
    return bounds


def split_model(model: Transformer, stages: tuple[int, ...], n_stages: int) -> None:
    """Drop (in place) every module this rank's stages do not use; parameter names stay the reference's."""
    layers = stage_layers(len(model.layers), n_stages)
    keep = {i for s in stages for i in layers[s]}
    for i in range(len(model.layers)):
        if i not in keep:
            model.layers[i] = nn.Identity()
    has_first, has_last = 0 in stages, n_stages - 1 in stages
    if not has_last:
        model.norm, model.head, model.mtp = None, None, nn.ModuleList()
    if not has_first and not (has_last and model.cfg.mtp_depth > 0):
        model.embed = None


@dataclass
class _Slot:
    inp: torch.Tensor | None = None  # stage input (detached, requires grad) or tokens for stage 0
    out: object = None  # stage output (hidden state, or LossOutput at the last stage)
    grad_out: torch.Tensor | None = None  # gradient received for `out`
    losses: tuple | None = None  # (main, mtp) detached, at the last stage
    inp_grad: torch.Tensor | None = None  # gradient of `inp`, to send to the previous stage
    tape: Tape | PlainTape | None = None  # the forward's record until its backward


class PipelineExecutor:
    def __init__(self, model: Transformer, schedule: str, pp_rank: int, pp: int, n_micro: int, pp_group,
                 pp_ranks: list[int], act_shape: tuple[int, ...], loss_scale: float, overlap: bool = True):
        self.model, self.name, self.pp_rank, self.pp, self.n_micro = model, schedule, pp_rank, pp, n_micro
        self.fb_sequential = False
        self.seam_log: list[list] = []  # per FB action of the last step: (chunk "F"/"B", seam, time) (overlap mode)
        self.group, self.pp_ranks, self.act_shape, self.loss_scale = pp_group, pp_ranks, act_shape, loss_scale
        self.n_stages = num_stages(schedule, pp)
        self.stages = rank_stages(schedule, pp, pp_rank)
        self.layers = stage_layers(len(model.layers), self.n_stages)
        schedules = build_schedule(schedule, pp, n_micro)
        self.actions = add_send_recv(schedules)[pp_rank]
        self.owner = self._stage_owners(schedules)
        # the tape pays only where an FB pair has all-to-alls to overlap: FB actions and expert parallelism
        has_fb = any(a.kind is Kind.FB for a in self.actions)
        self.overlap = overlap and has_fb and any(
            supports_seams(model.layers[i]) and not isinstance(model.layers[i].ffn.dispatcher, LocalDispatcher)
            for s in self.stages for i in self.layers[s])
        self.store = WeightGradStore()
        for m in model.modules():
            if hasattr(m, "wgrad_store"):
                m.wgrad_store = self.store
        self.timeline: list[Event] = []  # the last step's executed actions, seconds from the step's start
        self._t_base = 0.0

    @staticmethod
    def _stage_owners(schedules) -> dict[tuple[int, int], int]:
        owner = {}
        for rank, acts in enumerate(schedules):
            for a in acts:
                for part in a.parts:
                    if part.kind is Kind.F:
                        owner[(part.stage, part.micro_batch)] = rank
        return owner

    # ------------------------------------------------------------------ stage compute
    def _forward_gen(self, stage: int, mb: int, slots, tokens):
        """A stage chunk's forward, on a tape cut at the MoE seams (overlap: yields at each) or as one graph."""
        slot = slots.setdefault((stage, mb), _Slot())
        tape = slot.tape = Tape() if self.overlap else PlainTape()
        if stage == 0:
            tape.begin()
            h = self.model.embed(tokens[mb][:, :-1])
            tape.end(h)
        else:
            h = slot.inp
        for i in self.layers[stage]:
            h = yield from block_forward(self.model.layers[i], h, tape)
        if stage == self.n_stages - 1:
            (h,) = tape.begin(h)
            slot.out = self.model.head_loss(h, tokens[mb])
            tape.end(slot.out.loss)
            slot.losses = (slot.out.main_loss, slot.out.mtp_loss)
        else:
            slot.out = h
        nxt = (stage + 1, mb)
        if stage < self.n_stages - 1 and self.owner.get(nxt) == self.pp_rank:  # next stage is local (V turn)
            slots.setdefault(nxt, _Slot()).inp = h.detach().requires_grad_()

    def _backward_gen(self, stage: int, mb: int, slots, split: bool):
        """A stage chunk's backward; ``split``: weight gradients deferred to the store under (stage, mb)."""
        slot = slots[(stage, mb)]
        if stage == self.n_stages - 1:
            root = (slot.out.loss, torch.full_like(slot.out.loss, self.loss_scale))
        else:
            root = (slot.out, slot.grad_out)
        self.store.recording = split
        try:
            yield from slot.tape.backward([root])
        finally:
            self.store.recording = False
        if split:
            self.store.close((stage, mb))
        if stage > 0:
            slot.inp_grad = slot.tape.grad(slot.inp)
            if self.owner.get((stage - 1, mb)) == self.pp_rank:
                slots[(stage - 1, mb)].grad_out = slot.inp_grad
        slot.out = slot.inp = slot.tape = None  # free the activations

    def _compute(self, a: Action, slots, tokens) -> None:
        if a.kind is Kind.F:
            run_fb(self._forward_gen(a.stage, a.micro_batch, slots, tokens), iter(()))
        elif a.kind in (Kind.B, Kind.BW):
            run_fb(iter(()), self._backward_gen(a.stage, a.micro_batch, slots, split=a.kind is Kind.B))
        elif a.kind is Kind.W:
            self.store.run((a.stage, a.micro_batch))
        elif a.kind is Kind.FB:
            # the backward half defers its weight gradients: they run while the chunk about to resume still waits
            # for its collective (overlap), the rest right after the pair
            sequential = self.fb_sequential or not self.overlap
            self.seam_log.append([])
            run_fb(self._forward_gen(a.stage, a.micro_batch, slots, tokens),
                   self._backward_gen(a.b_stage, a.b_micro_batch, slots, split=True),
                   sequential=sequential, log=self.seam_log[-1], fill=None if sequential else self.store.run_one)
            self.store.run((a.b_stage, a.b_micro_batch))
        else:
            raise ValueError(f"unexpected action {a}")

    # ------------------------------------------------------------------ P2P
    def _tag(self, a: Action) -> int:
        return (0 if a.kind in (Kind.SEND_F, Kind.RECV_F) else 1) * 1_000_000 + a.stage * 1000 + a.micro_batch

    def _p2p(self, pending: list[Action], slots) -> None:
        ops, recvs = [], []
        for a in pending:
            peer = self.pp_ranks[a.peer]
            if a.kind is Kind.SEND_F:
                ops.append(dist.P2POp(dist.isend, slots[(a.stage, a.micro_batch)].out.detach().contiguous(), peer,
                                      self.group, self._tag(Action(Kind.SEND_F, a.stage + 1, a.micro_batch, 0))))
            elif a.kind is Kind.SEND_B:
                ops.append(dist.P2POp(dist.isend, slots[(a.stage, a.micro_batch)].inp_grad.contiguous(), peer,
                                      self.group, self._tag(Action(Kind.SEND_B, a.stage - 1, a.micro_batch, 0))))
            else:
                buf = torch.empty(self.act_shape)
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.group, self._tag(a)))
                recvs.append((a, buf))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for a, buf in recvs:
            slot = slots.setdefault((a.stage, a.micro_batch), _Slot())
            if a.kind is Kind.RECV_F:
                slot.inp = buf.requires_grad_()
            else:
                slot.grad_out = buf

    # ------------------------------------------------------------------ step
    def run(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Run one step's schedule over this dp rank's micro-batches; returns [main_sum, mtp_sum] of the losses
        computed on this rank (the caller sums over the pp group)."""
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"the schedule has {self.n_micro} micro-batches but {len(micro_batches)} were given")
        slots: dict[tuple[int, int], _Slot] = {}
        pending: list[Action] = []
        self.timeline, self.seam_log, t_base = [], [], time.perf_counter()
        self._t_base = t_base
        for a in self.actions:
            if a.is_comm:
                pending.append(a)
                continue
            if pending:
                self._p2p(pending, slots)
                pending = []
            t0 = time.perf_counter()
            self._compute(a, slots, micro_batches)
            self.timeline.append(Event(self.pp_rank, t0 - t_base, time.perf_counter() - t_base, a))
        if pending:
            self._p2p(pending, slots)
        if not self.store.empty():
            raise RuntimeError("weight-gradient work left over after the schedule: a B without its W")
        return self._loss_sums(slots)

    def _loss_sums(self, slots) -> torch.Tensor:
        sums = torch.zeros(2, dtype=torch.float64)
        last = self.n_stages - 1
        for (stage, _), slot in slots.items():
            if stage == last and slot.losses is not None:
                sums += torch.tensor([float(slot.losses[0]), float(slot.losses[1])], dtype=torch.float64)
        return sums

    def write_timeline(self, out_dir: str | None) -> None:
        """Gather every pp rank's timeline (collective over the pp group); write trace.json and schedule.png to
        ``out_dir`` on the rank that passes one. The trace also marks where each FB chunk issued a collective."""
        marks = [(self.pp_rank, t - self._t_base, f"{chunk} {seam} issued") for fb in self.seam_log
                 for chunk, seam, t in fb]
        gathered: list = [None] * self.pp
        dist.all_gather_object(gathered, (self.timeline, marks), group=self.group)
        if out_dir is None or self.group is None or dist.get_rank(self.group) != 0:
            return
        events = [e for part, _ in gathered for e in part]
        save_chrome_trace(events, f"{out_dir}/trace.json", unit_us=1e6, marks=[m for _, ms in gathered for m in ms])
        save_gantt_png(events, f"{out_dir}/schedule.png", f"executed {self.name}, pp={self.pp}, last step (s)")

    # ------------------------------------------------------------------ stage copies
    def build_copy_groups(self, dp: int, dp_rank: int) -> dict[str, int]:
        """Find which pp ranks hold each parameter and create one group per set of holders (collective over the
        world: every rank creates every group, in the same order). Returns {name: number of copies}."""
        names = [n for n, _ in self.model.named_parameters()]
        gathered: list = [None] * self.pp
        dist.all_gather_object(gathered, names, group=self.group)
        held = [set(g) for g in gathered]
        all_names = set().union(*held)  # every rank must see every holder set to create the same groups
        holders = {n: tuple(p for p in range(self.pp) if n in held[p]) for n in all_names}
        self.copy_groups = {}
        for h in sorted({h for h in holders.values() if len(h) > 1}):
            for d in range(dp):
                ranks = [p * dp + d for p in h]
                g = dist.new_group(ranks)
                if d == dp_rank and self.pp_rank in h:
                    self.copy_groups[h] = g
        self.holders = {n: holders[n] for n in names}
        return {n: len(holders[n]) for n in names}

    @torch.no_grad()
    def sync_copies(self) -> None:
        """Sum the gradients of parameters held by several pp ranks (DualPipe's two copies of every stage; the
        embedding shared by the first and last stage), so every copy takes the same optimizer step."""
        params = dict(self.model.named_parameters())
        for h, group in self.copy_groups.items():
            ps = [params[n] for n, hh in self.holders.items() if hh == h]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in ps:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        # routers held twice also see half the tokens each: sum their expert loads the same way
        for name, m in self.model.named_modules():
            if hasattr(m, "load") and hasattr(m, "bias") and f"{name}.weight" in self.holders:
                group = self.copy_groups.get(self.holders[f"{name}.weight"])
                if group is not None:
                    dist.all_reduce(m.load, group=group)
