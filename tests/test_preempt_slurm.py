"""Preemption through a real Slurm job: the time-limit warning (``scancel --signal=USR1 --batch``, what
``--signal=B:USR1@N`` sends) reaches the batch shell, whose trap forwards it through srun to the launch agents of both
"nodes"; the 4 ranks save and exit 0, the script requeues the job, and the requeued job resumes from that checkpoint
(resume=auto) and completes the run.

Slurm holds a requeued job for about two minutes (its BeginTime); the test, as the cluster's administrator, releases it
3 s after the requeue with ``scontrol update JobId=N StartTime=now`` (sooner, slurmd refuses the new start: "Job
credential revoked").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from slurm_cluster import cluster, free_ports  # noqa: F401  (cluster: the module fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc]
STEPS = 30


def _rows(out) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]


def _field(cluster, job_id: str, name: str) -> str:
    for f in cluster.run("scontrol", "show", "job", job_id, "-o", check=False).split():
        if f.startswith(f"{name}="):
            return f.split("=", 1)[1]
    return ""


def test_usr1_to_the_batch_shell_saves_requeues_and_resumes(cluster, tmp_path):
    out = tmp_path / "run"
    (port,) = free_ports(1)
    ov = ["model=tiny", "train=test", f"train.steps={STEPS}", "train.min_lr=3e-3", "cluster=local_cpu",
          "cluster.nodes=2", "cluster.gpus_per_node=2", "parallel=single", "parallel.dp=4", "wandb.mode=disabled",
          f"out_dir={out}", "launcher.kind=slurm", f"launcher.rdzv_endpoint=:{port}", "launcher.job_name=preempt"]
    res = subprocess.run([sys.executable, "-m", "hai.cli", "launch", *ov], env=cluster.env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", res.stdout).group(1)
    script = (out / "hai.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@300" in script and "#SBATCH --requeue" in script and "resume=auto" in script

    t0, signalled, requeued, released = time.time(), None, None, None
    while time.time() - t0 < 300:
        state = _field(cluster, job_id, "JobState")
        steps = [r["step"] for r in _rows(out) if "event" not in r]
        if signalled is None and len(steps) >= 2:
            cluster.run("scancel", "--signal=USR1", "--batch", job_id)
            signalled = time.time()
        if signalled and released is None and state == "PENDING" and _field(cluster, job_id, "Restarts") == "1":
            requeued = requeued or time.time()
            if time.time() - requeued > 3:  # slurmd refuses a job's credential issued in the second it was revoked
                cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # skip the requeue hold
                released = time.time()
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") and released:
            break
        time.sleep(0.2)
    logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(out.glob("slurm-*")))
    assert state == "COMPLETED" and released, f"job {job_id}: {state}\n{logs}\n{cluster.logs()}"
    rows = _rows(out)
    (pre,) = [r for r in rows if r.get("event") == "preempted"]
    (resumed,) = [r for r in rows if r.get("event") == "resumed"]
    stop = pre["step"]
    assert pre["signal"] == "SIGUSR1" and resumed["step"] == stop and 2 <= stop < STEPS
    steps = [r["step"] for r in rows if "event" not in r]
    assert steps == list(range(1, STEPS + 1)), steps  # each step once: the requeued job went on from the checkpoint
    assert "requeued, it resumes from the checkpoint" in logs and "restart 1" in logs
    print(f"\nSlurm: USR1 after step {stop}; saved and requeued; resumed and completed "
          f"{time.time() - signalled:.1f} s after the signal ({released - signalled:.1f} s until requeued)")
