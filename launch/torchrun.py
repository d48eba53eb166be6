"""torchrun command lines for `hai train` / `hai launch`.

Every command ends in ``python -m torch.distributed.run ... -m hai.cli train OVERRIDES``: the trainer is the same
entry point whichever way a job starts (local, several nodes by hand, Slurm).
"""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["local_command", "node_command", "run_local", "run_command", "train_overrides", "TRAIN_ENTRY",
           "RESTART_SAFE_ENV"]

TRAIN_ENTRY = ["-m", "hai.cli", "train"]
_LAUNCH_ONLY_KEYS = ("dry_run",)  # meaningful to `hai launch` only; everything else is passed through unchanged


def train_overrides(overrides: list[str]) -> list[str]:
    """The overrides `hai launch` passes on to `hai train` (all of them but launch-only keys such as dry_run)."""
    return [ov for ov in overrides if ov.split("=", 1)[0] not in _LAUNCH_ONLY_KEYS]


def _torchrun(python: str | None) -> list[str]:
    return [python or sys.executable, "-m", "torch.distributed.run"]


def local_command(overrides: list[str], nproc: int, max_restarts: int = 0, python: str | None = None) -> list[str]:
    """One node, ``nproc`` processes: ``python -m torch.distributed.run --standalone ... -m hai.cli train ...``."""
    cmd = _torchrun(python) + ["--standalone", f"--nproc-per-node={nproc}"]
    if max_restarts:
        cmd.append(f"--max-restarts={max_restarts}")
    return cmd + TRAIN_ENTRY + train_overrides(overrides)


def node_command(overrides: list[str], *, nnodes: int, nproc: int, rdzv_endpoint: str, rdzv_id: str,
                 node_rank: int | None = None, max_restarts: int = 0, python: str | None = None) -> list[str]:
    """One node of a multi-node job: c10d rendezvous at ``rdzv_endpoint`` (host:port of node 0 or any reachable
    node), ``nproc`` processes here. ``node_rank`` is informational for c10d (ranks are assigned at rendezvous)."""
    cmd = _torchrun(python) + [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
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


def run_local(overrides: list[str], nproc: int, max_restarts: int = 0) -> int:
    return subprocess.call(local_command(overrides, nproc, max_restarts), env=_env())


def run_command(cmd: list[str]) -> int:
    return subprocess.call(cmd, env=_env())
