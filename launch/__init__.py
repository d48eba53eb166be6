"""`hai launch`: every way a job starts ends in torchrun running `hai train` with the same overrides.

- ``launcher.kind=local`` (default): one node, ``nproc`` processes (``nproc=0``: the whole topology's world),
  ``torchrun --standalone``; ``launcher.max_restarts=K`` restarts the worker group after a failure (the trainer
  resumes with ``resume=auto``).
- ``launcher.kind=torchrun``: one node of a multi-node job (run the same command on every node, changing
  ``launcher.node_rank``): ``launcher.nnodes``, c10d rendezvous at ``launcher.rdzv_endpoint``,
  ``launcher.max_restarts``; ``nproc`` per node defaults to world / nnodes.
- ``launcher.kind=slurm``: an sbatch script (``cluster.nodes`` x ``cluster.gpus_per_node``, or ``nproc`` per node)
  written to ``OUT_DIR/hai.sbatch`` and submitted with sbatch.

``dry_run=true`` prints what would run (the torchrun command of every node, or the sbatch script) and starts nothing.

torchrun runs behind ``hai.launch.agent``, which forwards SIGTERM/SIGINT/SIGUSR1 to the workers (they save a
checkpoint and exit 0, ``hai.train.preempt``); `hai launch`/`hai train` forward those signals to it, and the Slurm
script asks for SIGUSR1 ``launcher.signal_lead_s`` before the time limit and requeues itself after such a stop.
"""
from __future__ import annotations

if __name__ != "hai.launch":  # imported as a bare `launch` from the checkout root: see hai/_shadow.py
    from hai._shadow import step_aside

    step_aside(__name__, __file__)  # the lines below then only import hai.launch

import shlex
import sys

from hai.config import Config, ConfigError

from hai.launch.torchrun import agent_grace_s, local_command, node_command, run_command, run_local, train_overrides

__all__ = ["launch", "plan_nodes", "local_command", "node_command", "run_local", "train_overrides"]


def plan_nodes(cfg: Config) -> tuple[int, int, int]:
    """(nnodes, nproc_per_node, world) of the launch, validated against the topology."""
    from hai.parallel.topology import Topology

    world = Topology.from_config(cfg).world_size
    kind = cfg.launcher.kind
    if kind == "local":
        nnodes = 1
        nproc = cfg.nproc or world
    elif kind == "torchrun":
        nnodes = cfg.launcher.nnodes
        if nnodes < 1:
            raise ConfigError(f"launcher.nnodes={nnodes} must be >= 1")
        nproc = cfg.nproc or world // nnodes
    else:  # slurm: the cluster config gives the node size unless nproc says otherwise
        nproc = cfg.nproc or cfg.cluster.gpus_per_node
        nnodes = max(1, world // nproc)
    if nnodes * nproc != world:
        raise ConfigError(f"launcher.kind={kind} starts {nnodes} node(s) x {nproc} process(es) = {nnodes * nproc} "
                          f"rank(s) but the topology needs {world} (parallel.pp={cfg.parallel.pp} x parallel.dp="
                          f"{cfg.parallel.dp}): " + _fix(kind, world, nnodes))
    if kind == "torchrun" and not 0 <= cfg.launcher.node_rank < nnodes:
        raise ConfigError(f"launcher.node_rank={cfg.launcher.node_rank} must lie in [0, launcher.nnodes={nnodes})")
    if cfg.cluster.device == "cuda" and nproc > cfg.cluster.gpus_per_node:
        raise ConfigError(f"{nproc} process(es) per node exceed cluster.gpus_per_node={cfg.cluster.gpus_per_node}: "
                          f"use launcher.kind=slurm or launcher.kind=torchrun launcher.nnodes="
                          f"{-(-world // cfg.cluster.gpus_per_node)}")
    return nnodes, nproc, world


def _fix(kind: str, world: int, nnodes: int) -> str:
    if kind == "local":
        return f"set nproc={world} (or 0), or change parallel.dp"
    if kind == "torchrun":
        return (f"set nproc={world // nnodes} with launcher.nnodes={nnodes}" if world % nnodes == 0 else
                f"choose launcher.nnodes dividing {world}")
    return f"set nproc (processes per node) to a divisor of {world}, or cluster.gpus_per_node"


def launch(cfg: Config, overrides: list[str], out=None) -> int:
    out = out or sys.stdout
    nnodes, nproc, _ = plan_nodes(cfg)
    lc = cfg.launcher
    grace = agent_grace_s(cfg.train.preempt_grace_s)
    if lc.kind == "local":
        cmd = local_command(overrides, nproc, lc.max_restarts, grace_s=grace)
        if cfg.dry_run:
            print(shlex.join(cmd), file=out)
            return 0
        return run_local(overrides, nproc, lc.max_restarts, grace_s=grace, out_dir=cfg.out_dir)
    if lc.kind == "torchrun":
        cmds = [node_command(overrides, nnodes=nnodes, nproc=nproc, node_rank=r, rdzv_endpoint=lc.rdzv_endpoint,
                             rdzv_id=lc.job_name, max_restarts=lc.max_restarts, grace_s=grace) for r in range(nnodes)]
        if cfg.dry_run:
            for r, cmd in enumerate(cmds):
                print(f"# node {r} of {nnodes}\n{shlex.join(cmd)}", file=out)
            return 0
        return run_command(cmds[lc.node_rank], cfg.out_dir)
    from hai.launch.slurm import default_job, render_sbatch, submit, write_script

    job = default_job(cfg, nnodes, nproc)
    text = render_sbatch(cfg, train_overrides(overrides), job)
    if cfg.dry_run:
        print(text, file=out, end="")
        return 0
    path = write_script(job.out_dir, text)
    job_id = submit(path)
    print(f"hai launch: submitted Slurm job {job_id} ({nnodes} node(s) x {nproc}); script {path}; "
          f"logs {job.out_dir}/slurm-{job_id}.out", file=out)
    return 0
