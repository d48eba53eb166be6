"""Pipeline executor: runs any schedule from ``hai.pipeline.schedules`` on real stage modules with batched P2P.

The model arrives laid out for this rank (``hai.parallel.parallelize``: only the modules of the rank's stages exist,
per ``hai.parallel.layout.PipelineLayout``). Stage 0 embeds; the last stage computes the main and MTP losses and
needs the embedding too, so the embedding lives on the rank(s) holding stage 0 *and* those holding the last stage.
DualPipe puts stage r and stage PP-1-r on rank r, so embedding, head and MTP share one rank physically, as in
DeepSeek-V3; every stage then exists on two ranks, and the copies' gradients are summed by the optimizer
(``hai.parallel.zero``) so they stay identical.

Actions: F runs a stage forward and keeps (input, output) for the backward; B runs the input-gradient backward with
the stage's linear layers recording their weight-gradient GEMMs in a :class:`WeightGradStore`, which the later W
action runs (zero-bubble split); BW is a full backward; FB is the forward of one micro-batch and the full backward of
another (its weight gradients deferred, then run before the next action). Consecutive SEND/RECV actions are issued
as one ``batch_isend_irecv`` and waited before the next compute action. Every action is recorded in ``timeline``.

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
from typing import Callable

import torch
import torch.distributed as dist

from hai.model.init import param_dtype
from hai.model.transformer import Transformer
from hai.model.wgrad import WeightGradStore
from hai.model.moe import LocalDispatcher
from hai.parallel.layout import module_of
from hai.pipeline.overlap import PlainTape, Tape, block_forward, run_fb, supports_seams
from hai.pipeline.schedules import Action, Kind, build_schedule
from hai.pipeline.simulate import add_send_recv
from hai.pipeline.trace import Event, save_chrome_trace, save_gantt_png

__all__ = ["PipelineExecutor"]


@dataclass
class _Slot:
    inp: torch.Tensor | None = None  # stage input (detached, requires grad) or tokens for stage 0
    out: object = None  # the stage's hidden state (handed to the next stage, if any)
    loss: torch.Tensor | None = None  # the stage's loss (main and / or lambda * MTP), if the layout gives it one
    grad_out: torch.Tensor | None = None  # gradient received for `out`
    losses: tuple | None = None  # (main, mtp) detached, on the stages computing them
    inp_grad: torch.Tensor | None = None  # gradient of `inp`, to send to the previous stage
    tape: Tape | PlainTape | None = None  # the forward's record until its backward


class PipelineExecutor:
    """Runs ``schedule`` on the stages of a model already laid out for pipeline rank ``pp_rank``
    (:func:`hai.parallel.parallelize`)."""

    def __init__(self, model: Transformer, placement, topo, cfg, pp_group, device: torch.device | str = "cpu"):
        """``placement``: this rank's layout (:class:`hai.parallel.parallelize.Placement`: its stages, its pp
        coordinate); ``topo``: the pipeline group's ranks and the positions each rank holds; ``cfg``: micro-batches
        per step, the activations' shape and dtype on the wire (micro-batch x local positions x hidden, the model's
        weight dtype) and ``parallel.overlap``; ``pp_group``: the pipeline process group (None: one process)."""
        layout, pp_rank, n_micro = placement.layout, placement.coords["pp"], cfg.n_micro_batches
        self.model, self.name, self.pp_rank, self.pp, self.n_micro = model, layout.schedule, pp_rank, layout.pp, n_micro
        pp_ranks = topo.group_ranks("pp", placement.rank)
        act_shape = (cfg.train.micro_batch_size, topo.local_seq_len(cfg.train.seq_len), cfg.model.hidden_size)
        loss_scale, overlap, act_dtype = 1.0 / n_micro, cfg.parallel.overlap, param_dtype(cfg.model)
        self.fb_sequential = False
        self.seam_log: list[list] = []  # per FB action of the last step: (chunk "F"/"B", seam, time) (overlap mode)
        self.group, self.pp_ranks, self.act_shape, self.loss_scale = pp_group, pp_ranks, act_shape, loss_scale
        self.act_dtype, self.device = act_dtype, torch.device(device)  # the wire format of activations/gradients
        self.n_stages = layout.n_stages
        self.stages = layout.rank_stages(pp_rank)
        self.layers, self.specs = layout.layers, layout.specs
        self.layout_text, self.rank_labels = layout.describe(), layout.rank_labels()
        schedules = build_schedule(self.name, self.pp, n_micro)
        self.actions = add_send_recv(schedules)[pp_rank]
        self.owner = self._stage_owners(schedules)
        # the tape pays only where an FB pair has all-to-alls to overlap: FB actions and expert parallelism
        has_fb = any(a.kind is Kind.FB for a in self.actions)
        self.overlap = overlap and has_fb and any(
            supports_seams(model.layers[i]) and not isinstance(model.layers[i].ffn.dispatcher, LocalDispatcher)
            for s in self.stages for i in self.layers[s])
        # the zero-bubble W split only where the schedule defers weight gradients (B then W, or an FB pair's
        # backward half): elsewhere (1F1B) the layers stay plain autograd, with no Python Function per Linear
        self.store = WeightGradStore()
        self.defers_w = any(a.kind in (Kind.B, Kind.FB) for a in self.actions)
        for m in model.modules():
            if hasattr(m, "wgrad_store"):
                m.wgrad_store = self.store if self.defers_w else None
        # gradients final for the step: after the action at index i, the parameters in _final[i] (their stages' last
        # backward and weight-gradient work on this rank) are handed to on_grads_final (the optimizer starts their
        # reduce-scatter while the schedule goes on: hai.parallel.zero.ZeroAdamW.grads_final)
        self.on_grads_final: Callable[[list], None] | None = None
        self._final = self._final_params(model, layout)
        self.timeline: list[Event] = []  # the last step's executed actions, seconds from the step's start
        self.p2p_sent: list[int] = []  # bytes of every activation / gradient this rank sent in the last step
        self._recvs: dict[tuple, tuple] = {}  # posted receives not yet consumed: (kind, stage, mb) -> (work, buffer)
        self._sends: list[tuple] = []  # posted sends not yet waited for
        self._t_base = 0.0

    def _final_params(self, model, layout) -> dict[int, list]:
        """Action index -> parameters whose gradients no later action of this rank's schedule touches."""
        last: dict[int, int] = {}  # stage -> index of its last action with gradient work (B, BW, W, FB's backward)
        for i, a in enumerate(self.actions):
            if a.kind in (Kind.B, Kind.BW, Kind.W):
                last[a.stage] = i
            elif a.kind is Kind.FB:
                last[a.b_stage] = i
        final: dict[int, list] = {}
        for name, p in model.named_parameters():
            uses = [last[s] for s in self.stages if s in last and module_of(name) in layout.stage_modules(s)]
            if uses and p.requires_grad:
                final.setdefault(max(uses), []).append(p)
        return final

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
        """A stage chunk's forward, on a tape cut at the MoE seams (overlap: yields at each) or as one graph: what
        the layout gives the stage (embedding, layers, main loss, MTP loss), its hidden state handed on."""
        slot = slots.setdefault((stage, mb), _Slot())
        spec = self.specs[stage]
        tape = slot.tape = Tape() if self.overlap else PlainTape()
        docs = self.model.documents(tokens[mb])  # the window's documents (None unless data.document_mask/reset)
        if spec.embed:
            tape.begin()
            h = self.model.embed_tokens(tokens[mb][:, :-1])
            tape.end(h)
        else:
            h = slot.inp
        for i in spec.layers:
            h = yield from block_forward(self.model.layers[i], h, tape, docs)
        if spec.head or spec.mtp:
            (hh,) = tape.begin(h)
            main = self.model.main_loss(hh, tokens[mb]) if spec.head else None
            mtp = self.model.mtp_loss(hh, tokens[mb], docs) if spec.mtp else None
            parts = [x for x in (main, None if mtp is None else self.model.cfg.mtp_lambda * mtp) if x is not None]
            slot.loss = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            tape.end(slot.loss)
            zero = slot.loss.detach().new_zeros(())
            slot.losses = (zero if main is None else main.detach(), zero if mtp is None else mtp.detach())
        slot.out = h
        nxt = (stage + 1, mb)
        if stage < self.n_stages - 1 and self.owner.get(nxt) == self.pp_rank:  # next stage is local (V turn)
            slots.setdefault(nxt, _Slot()).inp = h.detach().requires_grad_()

    def _backward_gen(self, stage: int, mb: int, slots, split: bool):
        """A stage chunk's backward; ``split``: weight gradients deferred to the store under (stage, mb). Roots: the
        stage's loss (if it has one) and the gradient of the state it handed on (if a stage follows)."""
        slot = slots[(stage, mb)]
        roots = []
        if slot.loss is not None:
            roots.append((slot.loss, torch.full_like(slot.loss, self.loss_scale)))
        if stage < self.n_stages - 1:
            roots.append((slot.out, slot.grad_out))
        self.store.recording = split
        try:
            yield from slot.tape.backward(roots)
        finally:
            self.store.recording = False
        if split:
            self.store.close((stage, mb))
        if stage > 0:
            slot.inp_grad = slot.tape.grad(slot.inp)
            if self.owner.get((stage - 1, mb)) == self.pp_rank:
                slots[(stage - 1, mb)].grad_out = slot.inp_grad
        slot.out = slot.inp = slot.tape = slot.loss = None  # free the activations

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

    def forward_only(self, stage: int, tokens: torch.Tensor, inp: torch.Tensor | None = None):
        """One stage chunk's forward outside the schedule (memory measurements, evaluation): the stage output (a
        hidden state, or the LossOutput at the last stage) with its autograd graph. ``inp``: the stage's input
        for stage > 0. Collective: the stage's EP peers must run it too."""
        slots = {(stage, 0): _Slot(inp=inp)}
        run_fb(self._forward_gen(stage, 0, slots, [tokens]), iter(()))
        slot = slots[(stage, 0)]
        return slot.out if slot.loss is None else (slot.out, slot.loss)

    def evaluate(self, tokens: torch.Tensor) -> torch.Tensor:
        """Forward one micro-batch through every stage (call under ``torch.no_grad``), in the direction of
        micro-batch 0 (DualPipe's copies are identical), the hidden state sent rank to rank with blocking P2P.
        Returns [main, mtp] of the losses computed on this rank (the caller sums over the pp group). Collective over
        the pp group and each stage's EP peers: every rank of the layout calls it with its own micro-batch."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        overlap, self.overlap = self.overlap, False  # one plain graph per stage: nothing to overlap without a backward
        h = None
        try:
            for stage in range(self.n_stages):
                owner = self.owner[(stage, 0)]
                prev = self.owner[(stage - 1, 0)] if stage else owner
                if owner != self.pp_rank:
                    if prev == self.pp_rank:
                        dist.send(h.to(self.act_dtype).contiguous(), self.pp_ranks[owner], group=self.group)
                    continue
                if prev != self.pp_rank:
                    h = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
                    dist.recv(h, self.pp_ranks[prev], group=self.group)
                slots = {(stage, 0): _Slot(inp=h)}
                run_fb(self._forward_gen(stage, 0, slots, [tokens]), iter(()))
                slot = slots[(stage, 0)]
                if slot.losses is not None:
                    sums += torch.stack([slot.losses[0].double(), slot.losses[1].double()])
                h = slot.out
        finally:
            self.overlap = overlap
        return sums

    # ------------------------------------------------------------------ P2P
    def _tag(self, a: Action) -> int:
        return (0 if a.kind in (Kind.SEND_F, Kind.RECV_F) else 1) * 1_000_000 + a.stage * 1000 + a.micro_batch

    def _p2p(self, pending: list[Action], slots) -> None:
        """Post consecutive SEND/RECV actions as one batch and return at once: a receive is waited for only by the
        first action that consumes it (:meth:`_arrive`), sends at the end of the step. (On NCCL a wait is a stream
        dependency, not a host block; on gloo the transfers progress while this rank computes.)"""
        ops, what = [], []
        for a in pending:
            peer = self.pp_ranks[a.peer]
            if a.kind is Kind.SEND_F:
                t = slots[(a.stage, a.micro_batch)].out.detach().contiguous()
                ops.append(dist.P2POp(dist.isend, t, peer, self.group,
                                      self._tag(Action(Kind.SEND_F, a.stage + 1, a.micro_batch, 0))))
            elif a.kind is Kind.SEND_B:
                t = slots[(a.stage, a.micro_batch)].inp_grad.contiguous()
                ops.append(dist.P2POp(dist.isend, t, peer, self.group,
                                      self._tag(Action(Kind.SEND_B, a.stage - 1, a.micro_batch, 0))))
            else:
                t = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, t, peer, self.group, self._tag(a)))
            what.append((a, t))
        self.p2p_sent += [op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend]
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):  # one coalesced work for the whole batch (NCCL)
            works = works[:1] * len(ops)
        for (a, t), work in zip(what, works):
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                self._recvs[(a.kind, a.stage, a.micro_batch)] = (work, t)
            else:
                self._sends.append((work, t))  # the tensor stays referenced until the send is waited for

    def _arrive(self, a: Action, slots) -> None:
        """Wait for the receives compute action ``a`` consumes and hand them to their slots."""
        for part in a.parts:
            key = (Kind.RECV_F if part.kind is Kind.F else Kind.RECV_B, part.stage, part.micro_batch)
            got = self._recvs.pop(key, None) if part.kind is not Kind.W else None
            if got is None:
                continue
            work, buf = got
            work.wait()
            slot = slots.setdefault((part.stage, part.micro_batch), _Slot())
            if key[0] is Kind.RECV_F:
                slot.inp = buf.requires_grad_()
            else:
                slot.grad_out = buf

    def _drain(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []
        if self._recvs:
            raise RuntimeError(f"received but never consumed: {sorted(self._recvs)}")

    # ------------------------------------------------------------------ step
    def run(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Run one step's schedule over this dp rank's micro-batches; returns [main_sum, mtp_sum] of the losses
        computed on this rank (the caller sums over the pp group)."""
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"the schedule has {self.n_micro} micro-batches but {len(micro_batches)} were given")
        slots: dict[tuple[int, int], _Slot] = {}
        pending: list[Action] = []
        self.timeline, self.seam_log, self.p2p_sent, t_base = [], [], [], time.perf_counter()
        self._t_base = t_base
        self._recvs, self._sends = {}, []
        for i, a in enumerate(self.actions):
            if a.is_comm:
                pending.append(a)
                continue
            if pending:
                self._p2p(pending, slots)
                pending = []
            t0 = time.perf_counter()
            self._arrive(a, slots)
            self._compute(a, slots, micro_batches)
            if self.on_grads_final is not None and i in self._final:
                self.on_grads_final(self._final[i])
            self.timeline.append(Event(self.pp_rank, t0 - t_base, time.perf_counter() - t_base, a))
        if pending:
            self._p2p(pending, slots)
        self._drain()
        if not self.store.empty():
            raise RuntimeError("weight-gradient work left over after the schedule: a B without its W")
        return self._loss_sums(slots)

    def _loss_sums(self, slots) -> torch.Tensor:
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for slot in slots.values():
            if slot.losses is not None:
                sums += torch.stack([slot.losses[0].double(), slot.losses[1].double()])
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
        save_chrome_trace(events, f"{out_dir}/trace.json", unit_us=1e6, marks=[m for _, ms in gathered for m in ms],
                          rank_labels=self.rank_labels)
        save_gantt_png(events, f"{out_dir}/schedule.png", f"executed {self.name}, pp={self.pp}, last step\n"
                       f"layout {self.layout_text}", rank_labels=self.rank_labels, unit_s=1.0)
