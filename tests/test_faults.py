"""Fault tests: a rank killed with SIGKILL under `hai launch ... launcher.max_restarts=1`, a process killed in the
middle of a checkpoint save, and an injected non-finite gradient.

(Corrupt, truncated and other-model checkpoints are in tests/test_checkpoint.py.)
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from dist_utils import run_ranks, truncate_and_die
from hai.checkpoint.state import latest_checkpoint, verify_checkpoint
from hai.train.metrics import read_metrics
from test_checkpoint import make_trainer, fit_rank, losses, overrides

pytestmark = pytest.mark.multiproc


def _rows(out_dir) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def _find_rank(tag: str, rank: int) -> int | None:
    """PID of the first-attempt worker with this RANK among the processes this test started (tagged in their env)."""
    want = {f"HAI_FAULT_TAG={tag}".encode(), f"RANK={rank}".encode(), b"TORCHELASTIC_RESTART_COUNT=0"}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            return int(pid)
    return None


def test_kill9_one_rank_restarts_and_resumes(tmp_path):
    """SIGKILL rank 1 mid-run: torchrun restarts the group, resume=auto loads the newest complete checkpoint, and the
    losses after the restart equal an uninterrupted run's exactly."""
    steps, every = 16, 4
    out = tmp_path / "run"
    ov = overrides(2, out, f"train.steps={steps}", f"train.save_every={every}", "resume=auto",
                   "launcher.max_restarts=1")
    tag = uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", HAI_FAULT_TAG=tag)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "hai.cli", "launch", *ov], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    victim = t_kill = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and victim is None:
            rows = _rows(out)
            saved = [r["step"] for r in rows if r.get("event") == "checkpoint"]
            done = [r["step"] for r in rows if "event" not in r]
            if saved and done and max(done) > saved[0]:
                victim = _find_rank(tag, 1)
                if victim:
                    os.kill(victim, signal.SIGKILL)
                    t_kill = time.time()
            time.sleep(0.01)
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    t_end = time.time()
    assert victim is not None, f"the run ended before a checkpoint and a later step were seen:\n{log[-3000:]}"
    assert proc.returncode == 0, log[-5000:]
    rows = _rows(out)
    resumed = [i for i, r in enumerate(rows) if r.get("event") == "resumed"]
    assert len(resumed) == 1, log[-3000:]
    start = rows[resumed[0]]["step"]
    assert start >= every and start % every == 0
    after = [r for r in rows[resumed[0]:] if "event" not in r]
    assert [r["step"] for r in after] == list(range(start + 1, steps + 1))

    ref_dir = tmp_path / "reference"
    run_ranks(fit_rank, 2, overrides(2, ref_dir, f"train.steps={steps}"))
    ref = losses(ref_dir)
    assert [r["loss"] for r in after] == [ref[r["step"]] for r in after]  # bit-exact
    print(f"\nkill -9 test: killed rank 1 (pid {victim}) {t_kill - t0:.1f}s after launch; resumed at step {start}; "
          f"job finished {t_end - t_kill:.1f}s after the kill; total {t_end - t0:.1f}s")


def _die_during_save(ov: list[str], mode: str, die_at: int) -> None:
    """Forked child: train single-process and SIGKILL itself inside the save of step ``die_at``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import hai.checkpoint.state as ck

    if mode == "before_commit":  # every byte of data written, nothing committed yet
        commit = ck.commit_checkpoint

        def commit_checkpoint(tmp, final, root, meta, keep_last):
            if meta["step"] == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return commit(tmp, final, root, meta, keep_last)

        ck.commit_checkpoint = commit_checkpoint
    else:  # mid_write: a data file half written, no DCP .metadata yet
        class _Writer(ck.FileSystemWriter):
            def write_data(self, plan, planner):
                fut = super().write_data(plan, planner)
                if "step_%08d" % die_at in str(self.path):
                    fut.wait()
                    truncate_and_die(str(self.path))
                return fut

        ck.FileSystemWriter = _Writer
    make_trainer(ov).fit()


@pytest.mark.parametrize("mode", ["mid_write", "before_commit"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, mode):
    out = tmp_path / "run"
    ov = overrides(1, out, "train.save_every=2", "train.keep_last=1")
    child = mp.get_context("fork").Process(target=_die_during_save, args=(ov, mode, 4))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    root = out / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir()  # the interrupted save
    assert latest_checkpoint(str(root)) == str(root / "step_00000002")  # keep_last=1 kept it: not yet replaced
    verify_checkpoint(str(root / "step_00000002"))

    run_ranks(fit_rank, 1, overrides(1, out, "train.save_every=2", "train.keep_last=1", "resume=auto"))
    ref_dir = tmp_path / "reference"
    run_ranks(fit_rank, 1, overrides(1, ref_dir))
    ref, got = losses(ref_dir), losses(out)
    assert [got[s] for s in range(3, 7)] == [ref[s] for s in range(3, 7)]
    assert sorted(os.listdir(root)) == ["step_00000006"]  # the stale temp dir is gone, keep_last=1


def _poison_gradient(trainer, step: int, value: float, rank: int) -> None:
    """Test-side fault injection: on ``step`` (1-based, as logged) rank ``rank`` turns one gradient element into
    ``value`` right before its bucket's reduction starts (inside the backward with overlap_grad_reduce, else in the
    optimizer step), whatever produced the gradients."""
    bucket = trainer.optimizer.buckets[0]
    real_start = bucket.start_sync

    def start_sync():
        if trainer.step + 1 == step and trainer.rank == rank and not bucket.started:
            bucket.grad[0] = value  # the flat fp32 gradient buffer the step reduces
        return real_start()

    bucket.start_sync = start_sync


def fit_counting(rank: int, world: int, ov: list[str], poison: tuple):
    trainer = make_trainer(ov)
    _poison_gradient(trainer, *poison)
    trainer.fit()
    return trainer.optimizer.step_count, all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


@pytest.mark.parametrize("value, rank", [("nan", 0), ("inf", 1)])
def test_nonfinite_gradient_skips_the_step(tmp_path, value, rank):
    """A gradient poisoned (by the test) on step 3 on one rank: every rank skips step 3 (the norm is global), it is
    logged, and training goes on."""
    results = run_ranks(fit_counting, 2, overrides(2, tmp_path), (3, float(value), rank))
    assert results == [(5, True), (5, True)]  # 6 steps, one skipped, on both ranks; parameters stay finite
    rows = _rows(tmp_path)
    events = [r for r in rows if r.get("event") == "skipped_step"]
    assert [e["step"] for e in events] == [3] and events[0]["grad_norm"] in ("nan", "inf")
    steps = read_metrics(str(tmp_path))
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in steps] == [False, False, True, False, False, False]
    assert all(math.isfinite(r["loss"]) for r in steps)


_RAISE_PLUGIN = '''
# Test plugin (imported at interpreter start through PYTHONPATH): rank HAI_TEST_RAISE_RANK raises inside the training
# step HAI_TEST_RAISE_STEP, after the forward/backward, while the other ranks go on into the optimizer's collectives.
import os

if "HAI_TEST_RAISE_RANK" in os.environ and os.environ.get("RANK") == os.environ["HAI_TEST_RAISE_RANK"]:
    import hai.parallel.zero as zero

    _real_step = zero.ZeroAdamW.step

    def step(self, *args, **kwargs):
        if self.step_count + 1 == int(os.environ["HAI_TEST_RAISE_STEP"]):
            raise RuntimeError("injected failure in the optimizer step (test plugin)")
        return _real_step(self, *args, **kwargs)

    zero.ZeroAdamW.step = step
'''


def test_one_rank_raising_ends_the_whole_job_fast(tmp_path):
    """The default 4-rank `hai train` with rank 1 raising mid-step (injected by a plugin module on PYTHONPATH, not a
    trainer hook): the job ends non-zero well before the collective timeout, with that rank's error printed once."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "sitecustomize.py").write_text(_RAISE_PLUGIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", HAI_TEST_RAISE_RANK="1", HAI_TEST_RAISE_STEP="3",
               PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "hai.cli", "train", "train=test", "train.steps=20",
                           "wandb.mode=disabled", "train.progress=false", f"out_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end after one rank failed:\n{log[-3000:]}"
    assert log.count("RuntimeError: injected failure in the optimizer step (test plugin)") == 1, log[-5000:]
    assert log.count("hai train: rank 1 failed:") == 1 and log.count(" failed:") == 1, log[-5000:]
    steps = [r["step"] for r in read_metrics(str(tmp_path / "run"))]
    assert steps == [1, 2]  # rank 0 logged the steps before the failure, none after
    print(f"\nfail-fast test: the 4-rank job ended {elapsed:.1f}s after launch (rc {proc.returncode})")
