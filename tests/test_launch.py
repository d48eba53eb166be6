"""`hai launch`: the torchrun command lines (local, multi-node) and the Slurm script, without starting a job.

The script is also *executed* here with stub ``scontrol``/``srun`` on PATH, to check what actually reaches torchrun:
the head node's NodeAddr as MASTER_ADDR and the user's overrides byte for byte, with no shell expansion of hostile
values. (tests/test_slurm.py submits a real job to a real Slurm.)
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from hai.cli import main
from hai.config import ConfigError
from hai.config.compose import compose
from hai.launch import launch, plan_nodes
from hai.launch.slurm import default_job, render_sbatch

BASE = ["model=tiny", "train=test", "cluster=cpu1", "parallel=single", "wandb.mode=disabled"]
HOSTILE_NAME = """it's a "job" $(touch PWNED) `touch PWNED2` ; rm -rf x"""


def _dry(overrides: list[str]) -> str:
    out = io.StringIO()
    assert launch(compose(overrides), overrides, out=out) == 0
    return out.getvalue()


def test_local_dry_run_is_the_exact_torchrun_command():
    ov = BASE + ["cluster.gpus_per_node=2", "parallel.dp=2", "launcher.max_restarts=1", "resume=auto",
                 "dry_run=true"]
    cmd = shlex.split(_dry(ov))
    assert cmd[:3] == [sys.executable, "-m", "hai.launch.agent"]  # torchrun behind the signal-forwarding agent
    assert cmd[3:7] == ["--grace-s=75", "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    i = cmd.index("hai.cli")
    assert cmd[i - 1:i + 2] == ["-m", "hai.cli", "train"]
    assert cmd[i + 2:] == [o for o in ov if not o.startswith("dry_run")]  # the same overrides, dry_run dropped


def test_cli_launch_dry_run(capsys):
    assert main(["launch", *BASE, "cluster.gpus_per_node=2", "parallel.dp=2", "dry_run=true"]) == 0
    assert "--nproc-per-node=2" in capsys.readouterr().out


def test_multinode_torchrun_dry_run_prints_every_node():
    ov = BASE + ["cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.dp=4", "launcher.kind=torchrun",
                 "launcher.nnodes=2", "launcher.rdzv_endpoint=10.0.0.7:29400", "launcher.max_restarts=3",
                 "launcher.job_name=exp1", "dry_run=true"]
    text = _dry(ov)
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        cmd = shlex.split(line)
        for flag in ("--nnodes=2", "--nproc-per-node=2", f"--node-rank={rank}", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=10.0.0.7:29400", "--rdzv-id=exp1", "--max-restarts=3"):
            assert flag in cmd, (flag, cmd)
        assert cmd[cmd.index("hai.cli") + 1] == "train"
    assert "# node 1 of 2" in text


@pytest.mark.parametrize("extra, message", [
    (["nproc=3", "cluster.gpus_per_node=2", "parallel.dp=2"], "set nproc=2"),
    (["launcher.kind=torchrun", "launcher.nnodes=3", "cluster.gpus_per_node=2", "parallel.dp=2"],
     "choose launcher.nnodes dividing 2"),
    (["launcher.kind=torchrun", "launcher.nnodes=2", "launcher.node_rank=2", "cluster.gpus_per_node=2",
      "parallel.dp=2"], "launcher.node_rank=2"),
])
def test_world_mismatch_names_the_fix(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        plan_nodes(compose(BASE + extra))


def test_h800_slurm_script():
    ov = ["cluster=h800_2048", "model=deepseek_v3_671b", "parallel=single", "parallel.pp=16", "parallel.dp=128",
          "parallel.ep=64",
          "train=v3_pretrain", "launcher.kind=slurm", "launcher.partition=h800", "launcher.account=llm",
          "launcher.time=7-00:00:00", "launcher.job_name=v3", "out_dir=/scratch/v3", "dry_run=true"]
    text = _dry(ov)
    for line in ("#SBATCH --nodes=256", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=h800", "#SBATCH --account=llm", "#SBATCH --time=7-00:00:00",
                 "#SBATCH --job-name=v3", "#SBATCH --output=/scratch/v3/slurm-%j.out", "--nnodes=256",
                 "--nproc-per-node=8", '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', "-m hai.cli train",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST"'):
        assert line in text, line
    assert not os.path.exists("/scratch/v3/hai.sbatch")  # a dry run writes nothing


def _stub(path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_quotes_every_user_value(tmp_path):
    """Hostile job name and override values reach sbatch/torchrun verbatim and are never run by the shell."""
    out_dir = tmp_path / "run dir $(touch PWNED3)"
    ov = BASE + ["cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.dp=4", "launcher.kind=slurm",
                 f"launcher.job_name={_hydra_str(HOSTILE_NAME)}", f"out_dir={_hydra_str(str(out_dir))}",
                 "launcher.partition=debug", "launcher.rdzv_endpoint=:29555", "dry_run=true"]
    cfg = compose(ov)
    assert cfg.launcher.job_name == HOSTILE_NAME and cfg.out_dir == str(out_dir)
    text = _dry(ov)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert f"#SBATCH --job-name={shlex.quote(HOSTILE_NAME)}" in text
    assert f"#SBATCH --output={shlex.quote(str(out_dir / 'slurm-%j.out'))}" in text

    bindir = tmp_path / "bin"
    bindir.mkdir()
    # A long node list (more than a pipe buffer) from one process, as the real scontrol: a reader that stops after the
    # first line kills it with SIGPIPE, and under pipefail that fails the script (`head -n 1` did, at random).
    _stub(bindir / "scontrol", """
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a17\\ngpu-a18\\n'; exec head -c 1000000 /dev/zero; fi
if [ "$1 $2" = "show node" ]; then echo "NodeName=$3 Arch=x86_64 NodeAddr=10.9.8.7 NodeHostName=$3 Port=0"; exit 0; fi
exit 1
""")
    record = tmp_path / "srun.json"
    srun = bindir / "srun"
    srun.write_text(f"""#!{sys.executable}
import json, os, sys
json.dump({{"argv": sys.argv[1:], "addr": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"]}},
          open({str(record)!r}, "w"))
""")
    srun.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2")
    res = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = json.loads(record.read_text())
    assert got["addr"] == "10.9.8.7" and got["port"] == "29555"
    argv = got["argv"]
    assert argv[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--rdzv-endpoint=10.9.8.7:29555" in argv and "--rdzv-id=4242" in argv
    train = argv[argv.index("hai.cli") + 2:]
    assert train == [o for o in ov if not o.startswith("dry_run")] + ["resume=auto"]  # requeue: resume=auto
    assert not any(p.name.startswith("PWNED") for p in tmp_path.rglob("*"))


def _hydra_str(value: str) -> str:
    """A Hydra override value quoted so any character survives (single-quoted, escapes for \\ and ')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_control_characters_are_refused(tmp_path):
    cfg = compose(BASE + ["cluster.gpus_per_node=2", "parallel.dp=2", "launcher.kind=slurm"])
    cfg.launcher.job_name = "ok\nsrun rm -rf /"
    with pytest.raises(ConfigError, match="control character"):
        render_sbatch(cfg, [], default_job(cfg, 1, 2))


def test_slurm_gpu_request_only_on_gpu_clusters():
    text = _dry(BASE + ["cluster.gpus_per_node=2", "parallel.dp=2", "launcher.kind=slurm", "dry_run=true"])
    assert "--gpus-per-node" not in text and "OMP_NUM_THREADS" in text


@pytest.mark.multiproc
def test_two_node_torchrun_launch_on_localhost(tmp_path):
    """`launcher.kind=torchrun` for real: two "nodes" (two hai launch processes, node_rank 0 and 1) meet at a c10d
    rendezvous and train one 2-rank job."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ov = BASE + ["cluster.nodes=2", "parallel.dp=2", "train.steps=2", f"out_dir={tmp_path}",
                 "launcher.kind=torchrun", "launcher.nnodes=2", f"launcher.rdzv_endpoint=127.0.0.1:{port}",
                 "launcher.job_name=t2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "hai.cli", "launch", *ov, f"launcher.node_rank={r}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_flag_spellings_equal_their_overrides(capsys):
    """DESIGN's `hai launch --slurm --dry-run` is the same request as launcher.kind=slurm dry_run=true."""
    ov = ["cluster=h800_2048", "model=deepseek_v3_671b", "parallel=v3_2048", "train=v3_pretrain", "out_dir=/scratch/v3"]
    assert main(["launch", *ov, "--slurm", "--dry-run"]) == 0
    flags = capsys.readouterr().out
    assert main(["launch", *ov, "launcher.kind=slurm", "dry_run=true"]) == 0
    assert flags == capsys.readouterr().out and "#SBATCH --nodes=256" in flags


def test_unknown_or_misplaced_flags_fail_with_the_flags_that_exist(capsys):
    assert main(["launch", "--dryrun"]) == 2
    assert "unknown flag '--dryrun'" in capsys.readouterr().err
    assert main(["train", "--dry-run"]) == 2  # a training run has no dry run: refused, not silently ignored
    err = capsys.readouterr().err
    assert "hai train" in err and "no flags" in err


_SRUN_STUB = """#!{python}
import os, signal, sys, time
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
open({started!r}, "w").write(str(os.getpid()))
deadline = time.time() + 20
while not got and time.time() < deadline:
    time.sleep(0.02)
open({record!r}, "w").write(",".join(got))
sys.exit(0 if got else 3)
"""


@pytest.mark.parametrize("sig, requeued", [("USR1", True), ("TERM", False)])
def test_slurm_script_forwards_stop_signals_and_requeues_on_usr1(tmp_path, sig, requeued):
    """The batch shell (what `--signal=B:USR1@N` and `scancel --batch` reach) traps the signal, srun (a stub here) gets
    SIGUSR1 whatever the shell got, and a clean stop on SIGUSR1 (the time-limit warning) requeues the job; a SIGTERM
    stop does not."""
    ov = BASE + ["cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.dp=4", "launcher.kind=slurm",
                 "launcher.signal_lead_s=240", "dry_run=true"]
    text = _dry(ov)
    for line in ("#SBATCH --signal=B:USR1@240", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert line in text
    script, bindir = tmp_path / "job.sbatch", tmp_path / "bin"
    script.write_text(text)
    bindir.mkdir()
    started, record, calls = tmp_path / "started", tmp_path / "srun_got", tmp_path / "scontrol_calls"
    _stub(bindir / "scontrol", f"""
if [ "$1 $2" = "show hostnames" ]; then echo n1; echo n2; exit 0; fi
if [ "$1 $2" = "show node" ]; then echo "NodeName=$3 NodeAddr=10.0.0.1"; exit 0; fi
echo "$@" >> {calls}
""")
    (bindir / "srun").write_text(_SRUN_STUB.format(python=sys.executable, started=str(started), record=str(record)))
    (bindir / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID="77",
               SLURM_JOB_NUM_NODES="2")
    proc = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while not started.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log
    assert record.read_text() == "SIGUSR1"  # srun forwards it to the launch agents, which stop the ranks
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", "77"] if requeued else [])
