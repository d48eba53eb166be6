"""End-to-end runs through the `hai` command: the loss falls, and the default multi-process job matches one process."""

import os
import subprocess
import sys

import pytest

from hai.cli import main
from hai.train.metrics import read_metrics

KEYS = {"step", "loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu",
        "expert_load_max_violation", "step_time_s"}


def test_fifty_step_run_loss_falls(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "cluster=cpu1", "parallel=single", "train=test", "train.steps=50", "train.lr=3e-3",
               f"out_dir={out}", "wandb.mode=disabled"])
    assert rc == 0
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == list(range(1, 51))
    assert KEYS <= set(rows[0])
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 5.0 and last < first - 1.5, (first, last)  # byte-level text: ln(320)=5.77 at the start
    assert (out / "config.yaml").read_text().startswith("model:")


@pytest.mark.multiproc
def test_default_command_runs_four_ranks_and_matches_single_process(tmp_path):
    """`hai train` (default: 4 ranks via torchrun) gives the single-process losses for the same global batch."""
    common = ["train=test", "train.steps=3", "wandb.mode=disabled", "train.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = tmp_path / "multi"
    proc = subprocess.run([sys.executable, "-m", "hai.cli", "train", *common, f"out_dir={multi}"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    assert main(["train", "cluster=cpu1", "parallel=single", *common, f"out_dir={single}"]) == 0
    m, s = read_metrics(str(multi)), read_metrics(str(single))
    assert len(m) == 3
    for a, b in zip(m, s):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # throughput is global: tokens per step over all ranks
    assert m[0]["tokens_per_s"] == pytest.approx(m[0]["tokens_per_s_per_device"] * 4)
