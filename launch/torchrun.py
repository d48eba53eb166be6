"""torchrun command lines for `hai train` / `hai launch`."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["local_command", "run_local"]


def local_command(overrides: list[str], nproc: int, port: int | None = None) -> list[str]:
    """One node, ``nproc`` processes: ``python -m torch.distributed.run --standalone ... -m hai.cli train ...``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return cmd + ["-m", "hai.cli", "train", *overrides]


def run_local(overrides: list[str], nproc: int) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores
    return subprocess.call(local_command(overrides, nproc), env=env)
