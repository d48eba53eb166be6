"""Slurm: render an sbatch script that runs one torchrun per node, write it into the run directory, submit it.

The script only sets up the rendezvous and calls the same entry as every other launch (torchrun running
``hai.cli train`` with the user's overrides). MASTER_ADDR is the job's first node as Slurm addresses it: the first
name of ``scontrol show hostnames "$SLURM_JOB_NODELIST"``, then that node's ``NodeAddr`` from
``scontrol show node NAME -o`` (node names need not resolve in DNS; NodeAddr is what slurmd itself is reached at).

Every value that comes from the user or the config is passed through :func:`shlex.quote` — in the ``#SBATCH``
directives too (sbatch parses shell quoting there) — and values with control characters are refused, since a newline
would end the directive's comment line.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

from hai.config import Config, ConfigError

from hai.launch.torchrun import RESTART_SAFE_ENV, node_command

__all__ = ["SlurmJob", "render_sbatch", "write_script", "submit", "SCRIPT_NAME"]

SCRIPT_NAME = "hai.sbatch"


@dataclass(frozen=True)
class SlurmJob:
    nodes: int
    nproc_per_node: int
    gpus_per_node: int  # 0 on CPU clusters: no --gpus-per-node request
    out_dir: str  # absolute
    workdir: str  # absolute; the job runs here (relative paths in the overrides mean the same as at submission)
    python: str


def _q(key: str, value) -> str:
    s = str(value)
    if re.search(r"[\x00-\x1f\x7f]", s):
        raise ConfigError(f"{key}={s!r} contains a control character (newline, tab, ...), which cannot go into an "
                          f"sbatch script: remove it")
    return shlex.quote(s)


def _port(endpoint: str) -> int:
    port = endpoint.rsplit(":", 1)[-1] if ":" in endpoint else ""
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"launcher.rdzv_endpoint={endpoint!r} needs a port (HOST:PORT): under Slurm the host is the "
                          f"job's first node and the port is taken from here, e.g. launcher.rdzv_endpoint=:29500")
    return int(port)


def render_sbatch(cfg: Config, overrides: list[str], job: SlurmJob) -> str:
    """The sbatch script (text) for ``cfg``; ``overrides`` are passed to ``hai train`` unchanged."""
    lc = cfg.launcher
    port = _port(lc.rdzv_endpoint)
    out = job.out_dir
    directives = [
        ("--job-name", "launcher.job_name", lc.job_name),
        ("--nodes", "cluster.nodes", job.nodes),
        ("--ntasks-per-node", None, 1),
    ]
    if job.gpus_per_node:
        directives.append(("--gpus-per-node", "cluster.gpus_per_node", job.gpus_per_node))
    directives.append(("--time", "launcher.time", lc.time))
    if lc.partition:
        directives.append(("--partition", "launcher.partition", lc.partition))
    if lc.account:
        directives.append(("--account", "launcher.account", lc.account))
    directives += [
        ("--output", "out_dir", os.path.join(out, "slurm-%j.out")),
        ("--error", "out_dir", os.path.join(out, "slurm-%j.err")),
        ("--chdir", "working directory", job.workdir),
    ]
    torchrun = node_command(overrides, nnodes=job.nodes, nproc=job.nproc_per_node,
                            rdzv_endpoint="@ENDPOINT@", rdzv_id="@RDZV_ID@", max_restarts=lc.max_restarts,
                            python=job.python)
    args = " \\\n    ".join(" ".join(_torchrun_arg(a) for a in group) for group in _line_groups(torchrun))
    lines = [
        "#!/bin/bash",
        f"# Written by `hai launch launcher.kind=slurm` for run directory {_q('out_dir', out)}",
        f"# Submit again with: sbatch {_q('out_dir', os.path.join(out, SCRIPT_NAME))}",
        *(f"#SBATCH {flag}={_q(key or flag, value)}" for flag, key, value in directives),
        "set -euo pipefail",
        "",
        "# Rendezvous on the job's first node, at the address Slurm reaches it by (its NodeAddr).",
        "# (sed reads the whole list: `head -n 1` would close the pipe early, and pipefail would fail on SIGPIPE)",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        'head_addr=$(scontrol show node "$head_node" -o | tr " " "\\n" | sed -n "s/^NodeAddr=//p")',
        'export MASTER_ADDR="${head_addr:-$head_node}"',
        f"export MASTER_PORT={port}",
        *(f"export {k}=${{{k}:-{v}}}  # a fresh store per torchrun restart" for k, v in RESTART_SAFE_ENV.items()),
    ]
    if cfg.cluster.device == "cpu":
        lines.append("export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # CPU ranks share the node's cores")
    lines += [
        'echo "hai: job $SLURM_JOB_ID, $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST), '
        f'{job.nproc_per_node} process(es) per node, rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        f"srun --nodes={job.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        f"    {args}",
        "",
    ]
    return "\n".join(lines)


def _line_groups(cmd: list[str]) -> list[list[str]]:
    """Lines: ``python -m torch.distributed.run``, one flag each, ``-m hai.cli train``, one override each."""
    entry = cmd.index("hai.cli") - 1
    return [cmd[:3], *([a] for a in cmd[3:entry]), cmd[entry:entry + 3], *([a] for a in cmd[entry + 3:])]


def _torchrun_arg(arg: str) -> str:
    if arg == "--rdzv-endpoint=@ENDPOINT@":
        return '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"'
    if arg == "--rdzv-id=@RDZV_ID@":
        return '--rdzv-id="$SLURM_JOB_ID"'
    return _q("override", arg)


def write_script(out_dir: str, text: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SCRIPT_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def submit(path: str) -> str:
    """``sbatch --parsable PATH``; returns the job id."""
    try:
        res = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError("sbatch not found: run `hai launch launcher.kind=slurm` on a Slurm login node, or use "
                          "dry_run=true to print the script") from None
    if res.returncode:
        raise ConfigError(f"sbatch {path} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def default_job(cfg: Config, nodes: int, nproc: int) -> SlurmJob:
    gpus = nproc if cfg.cluster.device == "cuda" else 0
    return SlurmJob(nodes, nproc, gpus, os.path.abspath(cfg.out_dir), os.getcwd(), sys.executable)
