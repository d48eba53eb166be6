"""Preemption: SIGTERM, SIGUSR1 or SIGINT asks a running job to finish its step, save a checkpoint and exit 0.

A signal only sets a flag (a handler must not touch collectives or the model). The trainer reads the flag at every
step boundary and the ranks agree with one MAX all-reduce, folded into the step's single metrics read, so a signal
that reached only some ranks (one node's agent, one process) stops every rank after the same step. Later signals
while the job is stopping are reported and ignored: the checkpoint being written is committed atomically
(``hai.checkpoint.files``), so even a SIGKILL then leaves the previous complete checkpoint the newest one.

Who sends what:

- Slurm: ``--signal=B:USR1@N`` (sbatch, N seconds before the time limit) reaches the batch shell, whose trap
  forwards it to srun, which forwards it to the launch agent on every node; the agent (``hai.launch.agent``, a
  torchrun that forwards instead of killing) signals each worker. SIGTERM (time limit, ``scancel``, preemption) the
  same way.
- ``hai train`` / ``hai launch``: the parent forwards the signal to its launch agent; Ctrl-C is a SIGINT to the parent.
- A worker restarted by the agent after the signal (``launcher.max_restarts``) starts with ``HAI_PREEMPTED`` set and
  stops after its first step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

__all__ = ["Preemption", "PREEMPT_SIGNALS", "PREEMPTED_ENV", "install", "uninstall", "active", "vote"]

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED_ENV = "HAI_PREEMPTED"  # set by the launch agent for workers it starts after a preemption signal

_ACTIVE: "Preemption | None" = None  # signal handlers are per process: the one installed instance


class Preemption:
    """The flag a preemption signal sets (and when); ``restore()`` puts the previous handlers back."""

    def __init__(self, rank: int | None = None):
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.stopping_step: int | None = None
        self._previous: dict[int, object] = {}
        inherited = os.environ.get(PREEMPTED_ENV)
        if inherited:  # a worker started after the agent forwarded a signal
            self.signum = getattr(signal, inherited, signal.SIGTERM)
            self.received_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def elapsed_s(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
            print(f"hai train: rank {self.rank} got {name}: finishing the current step, then saving a checkpoint "
                  f"and exiting", file=sys.stderr, flush=True)
        else:
            where = f" (writing step {self.stopping_step})" if self.stopping_step is not None else ""
            print(f"hai train: rank {self.rank} got {name} again{where}: already stopping; ignored (the checkpoint "
                  f"is committed atomically)", file=sys.stderr, flush=True)

    def install(self) -> "Preemption":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def active() -> Preemption | None:
    """The installed handler of this process (None before ``install``)."""
    return _ACTIVE


def install(rank: int | None = None) -> Preemption | None:
    """Install the preemption handlers for this process (once; later calls return the same instance). Only the
    main thread can install signal handlers: elsewhere (a training run inside a thread) returns None."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    if threading.current_thread() is not threading.main_thread():
        return None
    _ACTIVE = Preemption(rank).install()
    return _ACTIVE


def uninstall() -> None:
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.restore()
        _ACTIVE = None


def vote(requested: bool, device: torch.device, distributed: bool) -> torch.Tensor:
    """(1,) float64 on ``device``: 1 if a preemption signal reached any rank, else 0 (MAX over the world). Built on
    the device (no host copy) and all-reduced without a wait: the caller reads it with the step's other metrics."""
    flag = (torch.ones if requested else torch.zeros)(1, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag
