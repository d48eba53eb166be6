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

from hai.launch.torchrun import RESTART_SAFE_ENV, agent_grace_s, node_command

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
    if lc.signal_lead_s:  # the time-limit warning, to this batch shell (B:), which forwards it to the ranks
        directives.append(("--signal", "launcher.signal_lead_s", f"B:USR1@{lc.signal_lead_s}"))
    if lc.requeue:
        directives += [("--requeue", None, None), ("--open-mode", None, "append")]  # a requeued job appends its log
    if lc.partition:
        directives.append(("--partition", "launcher.partition", lc.partition))
    if lc.account:
        directives.append(("--account", "launcher.account", lc.account))
    directives += [
        ("--output", "out_dir", os.path.join(out, "slurm-%j.out")),
        ("--error", "out_dir", os.path.join(out, "slurm-%j.err")),
        ("--chdir", "working directory", job.workdir),
    ]
    if lc.requeue and not any(o.split("=", 1)[0] == "resume" for o in overrides):
        overrides = [*overrides, "resume=auto"]  # a requeued job continues from its newest checkpoint
    torchrun = node_command(overrides, nnodes=job.nodes, nproc=job.nproc_per_node,
                            rdzv_endpoint="@ENDPOINT@", rdzv_id="@RDZV_ID@", max_restarts=lc.max_restarts,
                            python=job.python, grace_s=agent_grace_s(cfg.train.preempt_grace_s))
    args = " \\\n    ".join(" ".join(_torchrun_arg(a) for a in group) for group in _line_groups(torchrun))
    lines = [
        "#!/bin/bash",
        f"# Written by `hai launch launcher.kind=slurm` for run directory {_q('out_dir', out)}",
        f"# Submit again with: sbatch {_q('out_dir', os.path.join(out, SCRIPT_NAME))}",
        *(f"#SBATCH {flag}" if value is None else f"#SBATCH {flag}={_q(key or flag, value)}"
          for flag, key, value in directives),
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
        'echo "hai: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $SLURM_JOB_NUM_NODES node(s) '
        f'($SLURM_JOB_NODELIST), {job.nproc_per_node} process(es) per node, rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        *_STOP_TRAP,
        f"srun --nodes={job.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        f"    {args} &",
        *_wait_and_requeue(lc.requeue),
        "",
    ]
    return "\n".join(lines)


# Slurm signals this shell (--signal=B:USR1@N before the time limit; scancel --batch); bash runs a trap only between
# commands, so srun runs in the background and the script waits for it. Every stop signal reaches srun as SIGUSR1,
# which srun forwards to the launch agent (hai.launch.agent) on every node: a SIGTERM to srun itself would make it
# cancel the step (SIGKILL after KillWait) instead of letting the ranks save.
_STOP_TRAP = [
    "# Preemption: a stop signal makes every rank finish its step, save a checkpoint and exit 0 (hai.train.preempt).",
    'stop_signal="" srun_pid=""',
    'forward() { stop_signal=$1; echo "hai: SIG$1 at $(date +%T): the ranks save a checkpoint and stop" >&2; '
    'kill -s USR1 "$srun_pid" 2>/dev/null || true; }',
    "trap 'forward USR1' USR1",
    "trap 'forward TERM' TERM",
    "trap 'forward INT' INT",
]


def _wait_and_requeue(requeue: bool) -> list[str]:
    lines = [
        "srun_pid=$!",
        "while :; do  # wait returns early when a trapped signal arrives: wait again until srun has exited",
        '    wait "$srun_pid" && rc=0 || rc=$?',
        '    kill -0 "$srun_pid" 2>/dev/null || break',
        "done",
    ]
    if requeue:
        lines += [
            "# Stopped early by the time-limit warning (SIGUSR1) with a checkpoint: run again from it (resume=auto).",
            'if [ "$rc" = 0 ] && [ "$stop_signal" = USR1 ]; then',
            '    echo "hai: job $SLURM_JOB_ID saved and stopped on SIGUSR1: requeued, it resumes from the checkpoint"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    return lines + ['exit "$rc"']


def _line_groups(cmd: list[str]) -> list[list[str]]:
    """Lines: ``python -m hai.launch.agent``, one flag each, ``-m hai.cli train``, one override each."""
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
