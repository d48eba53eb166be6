"""``python -m hai.launch.agent [--grace-s=S] TORCHRUN_ARGS...``: torchrun whose signals mean "checkpoint and stop".

Plain torchrun turns SIGTERM/SIGINT into a shutdown: it signals the workers, SIGKILLs them after 30 s and exits
non-zero even when they stopped cleanly; SIGUSR1 (Slurm's early warning) kills torchrun itself and orphans the
workers. This entry runs the same ``torch.distributed.run.main`` but handles SIGTERM, SIGINT and SIGUSR1 itself:

- each is forwarded to every worker process (they finish the step, agree, save a checkpoint and exit 0; see
  ``hai.train.preempt``), and torchrun keeps monitoring them, so a clean stop ends the agent with exit code 0;
- workers still alive ``--grace-s`` seconds (``train.preempt_grace_s`` + a margin) after the first signal are
  SIGKILLed; torchrun then reports the failure (the newest complete checkpoint is unaffected);
- ``HAI_PREEMPTED`` is set in the agent's environment, so a worker group restarted after the signal
  (``--max-restarts``) stops after its first step instead of training on.

SIGHUP and SIGQUIT keep torchrun's own handling (shut the workers down). When a worker fails, torchrun SIGTERMs the
others; they take it for a preemption, and may be blocked in a collective with the failed one: torchrun's shutdown
timeout is 5 s here (``--shutdown-timeout``, unless given), after which it SIGKILLs them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["main", "SignalForwarder", "worker_pids", "FORWARDED"]

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_KEEP_TORCHRUN = "SIGHUP,SIGQUIT"  # signals torchrun still handles itself (shut the workers down)
_FAILURE_SHUTDOWN_S = 5
PREEMPTED_ENV = "HAI_PREEMPTED"  # hai.train.preempt reads it (not imported: the agent stays free of torch imports)


def worker_pids(pid: int | None = None) -> list[int]:
    """Direct children of ``pid`` (this process): torchrun's workers (Linux /proc)."""
    pid = os.getpid() if pid is None else pid
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found |= {int(x) for x in f.read().split()}
        except OSError:
            continue
    return sorted(found)


class SignalForwarder:
    """Forwards FORWARDED signals to the workers; SIGKILLs the ones alive ``grace_s`` after the first signal."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.first: int | None = None
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        for sig in FORWARDED:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        pids = worker_pids()
        if not pids and self.first is None:  # nothing started yet: behave as without this agent
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        os.environ.setdefault(PREEMPTED_ENV, name)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        print(f"hai launch: {name} forwarded to {len(pids)} worker(s) {pids}; they save a checkpoint and exit "
              f"(killed after {self.grace_s:g} s)", file=sys.stderr, flush=True)
        if self.first is None:
            self.first = signum
            self._timer = threading.Timer(self.grace_s, self._kill_all)
            self._timer.daemon = True
            self._timer.start()

    def _kill_all(self) -> None:
        pids = worker_pids()
        if pids:
            print(f"hai launch: worker(s) {pids} still running {self.grace_s:g} s after the signal: SIGKILL",
                  file=sys.stderr, flush=True)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)  # the worker's session: it and anything it started
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _split(argv: list[str]) -> tuple[float, list[str]]:
    grace = 75.0
    if argv and argv[0].startswith("--grace-s="):
        grace = float(argv[0].split("=", 1)[1])
        argv = argv[1:]
    return grace, argv


def main(argv: list[str] | None = None) -> None:
    grace, args = _split(list(sys.argv[1:] if argv is None else argv))
    # torchrun registers its terminate handler only for the signals listed (--signals-to-handle, which it copies
    # into TORCHELASTIC_SIGNALS_TO_HANDLE; older versions read only the variable): leave ours in place
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = _KEEP_TORCHRUN
    SignalForwarder(grace).install()
    from torch.distributed.run import get_args_parser, main as torchrun_main

    options = {o for a in get_args_parser()._actions for o in a.option_strings}
    if "--signals-to-handle" in options:
        args = [f"--signals-to-handle={_KEEP_TORCHRUN}", *args]
    if "--shutdown-timeout" in options and not any(a.startswith("--shutdown-timeout") for a in args):
        # torchrun's own shutdown (after a worker failed) SIGTERMs the others, which take it for a preemption and
        # may be blocked in a collective with the failed rank: SIGKILL them soon (preemption has its own grace)
        args = [f"--shutdown-timeout={_FAILURE_SHUTDOWN_S}", *args]
    torchrun_main(args)


if __name__ == "__main__":
    main()
