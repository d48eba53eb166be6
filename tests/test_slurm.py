"""A real Slurm job: `hai launch launcher.kind=slurm` submits a 2-node job (two slurmd on this host), 2 ranks per node.

The fixture (tests/slurm_cluster.py) writes a private slurm.conf, starts munged, slurmctld and slurmd n1/n2 on free
ports, and stops them by their pid files. Slurm is installed by `.ci/install_slurm.sh` (run by .ci/run); the test is
skipped only where the binaries cannot be had (no apt-get, not root).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from slurm_cluster import cluster, free_ports  # noqa: F401  (cluster: the module fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc]

JOB_NAME = "hai test $(touch PWNED) 'q'"


def test_two_node_slurm_job_trains(cluster, tmp_path):
    out = tmp_path / "run dir"  # a space: the script must quote the paths
    (port,) = free_ports(1)
    overrides = ["model=tiny", "train=test", "train.steps=4", "train.save_every=2", "cluster=local_cpu",
                 "cluster.nodes=2", "cluster.gpus_per_node=2", "parallel=single", "parallel.dp=4",
                 "wandb.mode=disabled", f"out_dir='{out}'", "launcher.kind=slurm",
                 f"launcher.rdzv_endpoint=:{port}", "launcher.job_name='hai test $(touch PWNED) \\'q\\''"]
    res = subprocess.run([sys.executable, "-m", "hai.cli", "launch", *overrides], env=cluster.env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    m = re.search(r"submitted Slurm job (\d+)", res.stdout)
    assert m, res.stdout
    job_id = m.group(1)
    assert (out / "hai.sbatch").is_file()

    state = cluster.wait(job_id, timeout=180)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(out.glob("slurm-*")))
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{logs}\n{cluster.logs()}"

    info = cluster.run("scontrol", "show", "job", job_id, "-o")
    assert "NumNodes=2" in info and "NodeList=n[1-2]" in info, info
    assert f"JobName={JOB_NAME} " in info, info  # the hostile name arrived verbatim, unexpanded
    assert not list(tmp_path.rglob("PWNED"))
    assert "rendezvous 127.0.0.1:" in logs  # MASTER_ADDR = NodeAddr of the first node

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert [r["step"] for r in rows if r.get("event") == "checkpoint"] == [2, 4]
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
