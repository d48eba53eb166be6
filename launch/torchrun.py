"""torchrun command lines for `hai train` / `hai launch`, and running one with its signals forwarded.

Every command is ``python -m hai.launch.agent --grace-s=S TORCHRUN_ARGS -m hai.cli train OVERRIDES``: torchrun
(``torch.distributed.run``) behind an agent that turns SIGTERM/SIGINT/SIGUSR1 into "checkpoint and stop" for the
workers (``hai.launch.agent``); the trainer is the same entry point whichever way a job starts (local, several nodes
by hand, Slurm). A `hai train`/`hai launch` parent forwards those signals to the agent, which runs in its own
session (a terminal's Ctrl-C reaches it once, through the parent) and gets SIGTERM if the parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

__all__ = ["local_command", "node_command", "run_local", "run_command", "train_overrides", "TRAIN_ENTRY",
           "RESTART_SAFE_ENV", "AGENT", "agent_grace_s"]

TRAIN_ENTRY = ["-m", "hai.cli", "train"]
AGENT = ["-m", "hai.launch.agent"]
_KILL_MARGIN_S = 15.0  # the agent SIGKILLs workers this long after train.preempt_grace_s
_LAUNCH_ONLY_KEYS = ("dry_run",)  # meaningful to `hai launch` only; everything else is passed through unchanged


def train_overrides(overrides: list[str]) -> list[str]:
    """The overrides `hai launch` passes on to `hai train` (all of them but launch-only keys such as dry_run)."""
    return [ov for ov in overrides if ov.split("=", 1)[0] not in _LAUNCH_ONLY_KEYS]


def agent_grace_s(preempt_grace_s: float) -> float:
    """Seconds after a preemption signal at which the agent SIGKILLs workers that have not exited."""
    return preempt_grace_s + _KILL_MARGIN_S


def _torchrun(python: str | None, grace_s: float) -> list[str]:
    return [python or sys.executable, *AGENT, f"--grace-s={grace_s:g}"]


def local_command(overrides: list[str], nproc: int, max_restarts: int = 0, python: str | None = None,
                  grace_s: float = agent_grace_s(60.0)) -> list[str]:
    """One node, ``nproc`` processes: ``python -m hai.launch.agent --grace-s=S --standalone ... -m hai.cli train
    ...`` (``grace_s``: :func:`agent_grace_s` of ``train.preempt_grace_s``)."""
    cmd = _torchrun(python, grace_s) + ["--standalone", f"--nproc-per-node={nproc}"]
    if max_restarts:
        cmd.append(f"--max-restarts={max_restarts}")
    return cmd + TRAIN_ENTRY + train_overrides(overrides)


def node_command(overrides: list[str], *, nnodes: int, nproc: int, rdzv_endpoint: str, rdzv_id: str,
                 node_rank: int | None = None, max_restarts: int = 0, python: str | None = None,
                 grace_s: float = agent_grace_s(60.0)) -> list[str]:
    """One node of a multi-node job: c10d rendezvous at ``rdzv_endpoint`` (host:port of node 0 or any reachable
    node), ``nproc`` processes here. ``node_rank`` is informational for c10d (ranks are assigned at rendezvous)."""
    cmd = _torchrun(python, grace_s) + [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
    if node_rank is not None:
        cmd.append(f"--node-rank={node_rank}")
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
            f"--max-restarts={max_restarts}"]
    return cmd + TRAIN_ENTRY + train_overrides(overrides)


# torchrun's workers otherwise share the rendezvous TCPStore across restarts and can read the previous attempt's
# addresses (gloo: "connectFullMesh failed ... Connection refused" after a restart; pytorch/pytorch#135712): with
# sharing off, each attempt's rank 0 hosts a fresh store.
RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores
    for k, v in RESTART_SAFE_ENV.items():
        env.setdefault(k, v)
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG), so a `hai train`
    killed with SIGKILL still stops its job cleanly instead of orphaning it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_command(cmd: list[str], out_dir: str | None = None) -> int:
    """Run a launch agent command to its end, forwarding SIGTERM/SIGINT/SIGUSR1 to it; its exit code. A failed job
    that left a hang report in ``out_dir`` gets its first line printed last (the ranks that did not arrive)."""
    started = time.time()
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def forward(signum, frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rc and out_dir:
        from hai.train.hang import read_summary

        line = read_summary(out_dir, since=started)
        if line:
            print(f"hai train: error: {line}", file=sys.stderr, flush=True)
    return rc


def run_local(overrides: list[str], nproc: int, max_restarts: int = 0, grace_s: float = agent_grace_s(60.0),
              out_dir: str | None = None) -> int:
    return run_command(local_command(overrides, nproc, max_restarts, grace_s=grace_s), out_dir)
