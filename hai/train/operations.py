"""The operations side of a training run, as the trainer's loop sees it: one object with a few hooks.

``RunOps(trainer)`` is built with the trainer (no side effects); ``Trainer.fit`` calls ``start`` before the first
step, ``begin_step`` before each, ``vote`` inside it (a device tensor read with the step's metrics), ``end_step``
with its record (extra metrics), ``after_step`` once it is logged and saved, and ``close`` at the end (extra fields
for the run summary). What each concern does lives in its own module: ``hai.train.preempt`` (signals, the stop vote),
``hai.train.straggler`` (the step split and the slowest rank), ``hai.train.profile`` (torch.profiler traces).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from hai.checkpoint.async_save import AsyncCheckpointer, resolve_async
from hai.train import preempt
from hai.train.profile import StepProfiler
from hai.train.straggler import CommClock, StragglerStats, report

__all__ = ["RunOps"]


class RunOps:
    def __init__(self, trainer):
        self.tr = trainer
        self.preemption: preempt.Preemption | None = None
        self._installed = False
        self.stop = False  # the ranks agreed at the last step boundary that a preemption signal arrived
        self.preempted: dict | None = None
        t, world = trainer.cfg.train, trainer.topo.world_size
        self.clock: CommClock | None = None
        self.stragglers = StragglerStats(trainer.rank, world, trainer.device, t.straggler_ratio,
                                         trainer.cfg.cluster.gpus_per_node)
        self.profiler = StepProfiler(list(t.profile.steps), t.profile.memory, trainer.cfg.out_dir, trainer.rank,
                                     trainer.device)
        # train.async_save: a background writer (and its process group: built here, on every rank, collectively)
        self.checkpointer = AsyncCheckpointer(trainer.device) if resolve_async(t.async_save, trainer.device) else None

    @property
    def distributed(self) -> bool:
        return self.tr.mesh is not None

    def start(self) -> None:
        self.preemption = preempt.active()
        if self.preemption is None:  # Trainer.fit called directly (tests, notebooks): handlers for the loop only
            self.preemption = preempt.install(self.tr.rank)
            self._installed = self.preemption is not None
        self.clock = CommClock().install()

    def begin_step(self, step: int) -> None:
        """Before step ``step`` (1-based) runs: the profiler window."""
        self.profiler.begin(step)
        if self.clock is not None:
            self.clock.label = self.profiler.active
            self.clock.take()  # only this step's waits count

    def end_step(self, rec: dict, sink) -> dict:
        """After the step ran (``rec``: its record): straggler metrics every ``train.log_every`` steps (one
        all-gather; rank 0 gets them and names a persistent straggler)."""
        self._report_saves(sink)
        comm = self.clock.take() if self.clock is not None else 0.0
        self.stragglers.add(rec["step_time_s"], comm, rec.get("data_wait_s", 0.0))
        out = {"comm_wait_s": comm}
        if self.distributed and rec["step"] % self.tr.cfg.train.log_every == 0:
            rows = self.stragglers.gather()
            if rows is not None:
                m = self.stragglers.metrics(rows)
                out.update(m)
                line = self.stragglers.persistent(m)
                if line is not None:
                    report(line)
                    if sink is not None:
                        sink.event("straggler", step=rec["step"], **m)
        self.profiler.end(rec["step"])
        return out

    # ------------------------------------------------------------------ inside a step
    def vote(self) -> torch.Tensor:
        """(1,) float64 device tensor: MAX over ranks of this rank's preemption flag (no host read here)."""
        requested = self.preemption is not None and self.preemption.requested
        return preempt.vote(requested, self.tr.device, self.distributed)

    def read_vote(self, value: float) -> None:
        self.stop = value > 0

    # ------------------------------------------------------------------ between steps
    def after_step(self, sink, saved: bool) -> bool:
        """True when the run must stop now (after saving this step's checkpoint if ``saved`` is False). A signal
        that arrived during a periodic save is voted on once more right after it (a save step only)."""
        if saved and not self.stop:
            self.read_vote(self.vote().item())
        if not self.stop:
            return False
        p = self.preemption
        if p is not None:
            p.stopping_step = self.tr.step
        t0 = time.perf_counter()
        path = None if saved else self.tr.save_checkpoint(sink)
        self.finish(sink)  # an asynchronous write completes before the process exits
        since = p.elapsed_s() if p is not None and p.requested else None
        self.preempted = {"signal": p.signal_name if p is not None and p.requested else "a peer rank's signal",
                          "step": self.tr.step, "save_s": time.perf_counter() - t0, "since_signal_s": since}
        if sink is not None:
            sink.event("preempted", **self.preempted, path=path)
        grace = self.tr.cfg.train.preempt_grace_s
        if since is not None and since > grace:
            print(f"hai train: rank {self.tr.rank} stopped {since:.1f} s after the signal, beyond "
                  f"train.preempt_grace_s={grace:g}: the launcher may have killed other ranks; the newest complete "
                  f"checkpoint is what resume=auto takes", file=sys.stderr, flush=True)
        return True

    # ------------------------------------------------------------------ asynchronous checkpoints
    def save_async(self, run, config: dict, sink) -> str:
        """Stage and start writing this step's checkpoint (collective); its "checkpoint" event comes when the write
        is done. Returns the directory it will be committed to."""
        from hai.checkpoint.files import checkpoint_root

        t = self.tr.cfg.train
        held = self.checkpointer.save(run, self.tr.cfg.out_dir, t.keep_last, config)
        if sink is not None:
            sink.event("checkpoint_staged", step=run.progress.step, seconds=held,
                       staging_bytes=self.checkpointer.staging_bytes)
        return os.path.join(checkpoint_root(self.tr.cfg.out_dir), f"step_{run.progress.step:08d}")

    def _report_saves(self, sink, wait: bool = False) -> None:
        if self.checkpointer is None:
            return
        for path, seconds, step in (self.checkpointer.wait() if wait else self.checkpointer.poll()):
            if sink is not None:
                sink.event("checkpoint", step=step, path=path, seconds=seconds, background=True)

    def finish(self, sink) -> None:
        """The run's loop is over (or stopping): wait for a write in flight and report it."""
        self._report_saves(sink, wait=True)

    def close(self) -> dict:
        if self._installed:
            preempt.uninstall()
            self._installed = False
        if self.clock is not None:
            self.clock.uninstall()
            self.clock = None
        self.profiler.close()
        return {"preempted": self.preempted, "profile": self.profiler.summary()}
