"""Operations of a long run: preemption signals, hang dumps, straggler statistics, profiles.

The preemption test drives the real `hai train` (parent -> launch agent -> torchrun -> 4 ranks of the default
layout) with a SIGTERM, then resumes in forked ranks where a signal reaches one rank only, and compares the losses
with an uninterrupted run. (The same through a real Slurm job: tests/test_preempt_slurm.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from dist_utils import run_ranks, truncate_and_die
from hai.checkpoint.state import latest_checkpoint, verify_checkpoint
from test_checkpoint import fit_rank, losses, make_trainer
from test_faults import _rows

pytestmark = pytest.mark.multiproc

# The default layout (cluster=local_cpu, parallel=local: 4 ranks, dp=4, ep=4, hierarchical dispatch). min_lr = lr makes
# the learning rate independent of train.steps, so runs of different lengths share their first steps exactly.
DEFAULT = ["train=test", "train.min_lr=3e-3", "wandb.mode=disabled", "train.progress=false"]


def _tagged(tag: str) -> list[int]:
    """PIDs of live processes started by this test (HAI_TEST_TAG in their environment)."""
    want = f"HAI_TEST_TAG={tag}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    with open(f"/proc/{pid}/stat") as s:
                        if s.read().split(") ", 1)[1][:1] != "Z":
                            found.append(int(pid))
        except OSError:
            continue
    return found


def _wait_for_steps(proc, out, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if sum("event" not in r for r in _rows(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps logged (rc {proc.poll()})")


def _resume_signalled(rank: int, world: int, ov: list[str], victim: int, after: int):
    """Resume, and ``after`` steps later send SIGUSR1 to rank ``victim`` only: every rank must stop at one step. The
    victim gets a second signal (SIGTERM) in the middle of writing that checkpoint: it is ignored."""
    trainer = make_trainer(ov)
    real, done, real_save = trainer.train_step, [], trainer.save_checkpoint

    def step():
        rec = real()
        done.append(rec["step"])
        if rank == victim and len(done) == after:
            os.kill(os.getpid(), signal.SIGUSR1)
        return rec

    def save(sink=None):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once (main thread), inside the save
        return real_save(sink)

    trainer.train_step = step
    if rank == victim:
        trainer.save_checkpoint = save
    summary = trainer.fit()
    return trainer.step, (summary["preempted"] or {}).get("signal")


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path):
    out, tag = tmp_path / "run", uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", HAI_TEST_TAG=tag)
    proc = subprocess.Popen([sys.executable, "-m", "hai.cli", "train", *DEFAULT, "train.steps=500", f"out_dir={out}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(proc, out, 3)
        t_sig = time.time()
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
        elapsed = time.time() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-5000:]
    assert elapsed < 60, f"{elapsed:.1f} s from SIGTERM to exit"
    assert not _tagged(tag), "processes of the job outlived `hai train`"
    rows = _rows(out)
    (pre,) = [r for r in rows if r.get("event") == "preempted"]
    stop = pre["step"]
    assert pre["signal"] == "SIGTERM" and [r["step"] for r in rows if "event" not in r] == list(range(1, stop + 1))
    root = out / "checkpoints"
    assert latest_checkpoint(str(root)) == str(root / f"step_{stop:08d}")  # the last finished step
    assert verify_checkpoint(str(root / f"step_{stop:08d}"))["step"] == stop
    assert f"preempted   SIGTERM: stopped after step {stop}" in log, log[-3000:]
    print(f"\nSIGTERM -> exit 0 in {elapsed:.1f} s; stopped after step {stop}, saved in {pre['save_s']:.2f} s "
          f"({pre['since_signal_s']:.2f} s after the signal reached rank 0)")

    # resume=auto in forked ranks; a SIGUSR1 reaches rank 2 alone after 2 steps: all four finish the step under way
    # (the 3rd) and stop after it
    got = run_ranks(_resume_signalled, 4, [*DEFAULT, "train.steps=500", f"out_dir={out}", "resume=auto"], 2, 2)
    end, peer = stop + 3, "a peer rank's signal"
    assert got == [(end, peer), (end, peer), (end, "SIGUSR1"), (end, peer)]
    rows = _rows(out)
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [stop]
    assert latest_checkpoint(str(root)) == str(root / f"step_{end:08d}")
    assert verify_checkpoint(str(root / f"step_{end:08d}"))["step"] == end  # the second signal changed nothing
    ref_dir = tmp_path / "reference"
    run_ranks(fit_rank, 4, [*DEFAULT, f"train.steps={end}", f"out_dir={ref_dir}"])
    ref, got_losses = losses(ref_dir), losses(out)
    assert [got_losses[s] for s in range(1, end + 1)] == [ref[s] for s in range(1, end + 1)]  # bit-exact


_STALL_PLUGIN = '''
# Test plugin (imported at interpreter start through PYTHONPATH): rank HAI_TEST_STALL_RANK stalls for good in the
# optimizer step of step HAI_TEST_STALL_STEP, while the other ranks wait for it in that step's collectives.
import os

if "HAI_TEST_STALL_RANK" in os.environ and os.environ.get("RANK") == os.environ["HAI_TEST_STALL_RANK"]:
    import time
    import hai.parallel.zero as zero

    _real_step = zero.ZeroAdamW.step

    def step(self, *args, **kwargs):
        if self.step_count + 1 == int(os.environ["HAI_TEST_STALL_STEP"]):
            open(os.environ["HAI_TEST_STALL_MARK"], "w").close()
            time.sleep(3600)  # the injected stall
        return _real_step(self, *args, **kwargs)

    zero.ZeroAdamW.step = step
'''


def test_stalled_rank_every_rank_dumps_and_the_job_ends(tmp_path):
    """Rank 1 stalls in step 3 (a plugin on PYTHONPATH, not a trainer hook); the others wait in a collective. After
    train.collective_timeout_s every rank writes OUT_DIR/hang/rank_K.txt with the timed-out collective, its stacks and
    its last collectives; the error names rank 1 as the one that did not arrive; the job ends within timeout + 30 s."""
    timeout = 6
    plugin, out, mark = tmp_path / "plugin", tmp_path / "run", tmp_path / "stalled"
    plugin.mkdir()
    (plugin / "sitecustomize.py").write_text(_STALL_PLUGIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", HAI_TEST_STALL_RANK="1", HAI_TEST_STALL_STEP="3",
               HAI_TEST_STALL_MARK=str(mark),
               PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.Popen([sys.executable, "-m", "hai.cli", "train", *DEFAULT, "train.steps=50",
                             f"train.collective_timeout_s={timeout}", f"out_dir={out}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        t_stall = time.time()
        stdout, stderr = proc.communicate(timeout=timeout + 60)
        ended = time.time() - t_stall
    finally:
        if proc.poll() is None:
            proc.kill()
    assert mark.exists() and proc.returncode != 0, stderr[-3000:]
    assert ended < timeout + 30, f"the job ended {ended:.1f} s after the stall"
    last = [ln for ln in stderr.splitlines() if ln.startswith("hai train: error:")]
    assert last and last[-1] == stderr.strip().splitlines()[-1], stderr[-3000:]
    assert "collective timeout: rank(s) 1 did not arrive at gloo:" in last[-1], last[-1]
    summary = (out / "hang" / "summary.txt").read_text()
    assert summary.startswith("collective timeout: rank(s) 1 did not arrive")
    reports = {k: (out / "hang" / f"rank_{k}.txt").read_text() for k in range(4)}
    timed_out = {r.splitlines()[1].split(": pending")[0] for r in reports.values()}
    assert len(timed_out) == 1 and next(iter(timed_out)).startswith("timed out: gloo:"), timed_out  # one collective
    collective = next(iter(timed_out))[len("timed out: "):]
    assert collective in summary
    for k, text in reports.items():
        assert "== Python stacks (faulthandler, every thread) ==" in text and "== last 64 collectives" in text
        assert ("has NOT issued it" in text) == (k == 1), (k, text[:600])
        assert "PENDING" in text or k == 1  # the waiting ranks list the stuck collective among their last ones
    assert "sitecustomize.py" in reports[1] and "in step" in reports[1]  # the stalled rank's stack shows where
    print(f"\nhang test: the job ended {ended:.1f} s after the stall (timeout {timeout} s)\n{last[-1]}")


def _delayed(rank: int, world: int, ov: list[str], victim: int, delay_s: float):
    """Train; rank ``victim`` sleeps ``delay_s`` in every step's forward/backward (the injected straggler)."""
    trainer = make_trainer(ov)
    if rank == victim:
        real = trainer.forward_backward

        def slow(micro_batches):
            time.sleep(delay_s)
            return real(micro_batches)

        trainer.forward_backward = slow
    summary = trainer.fit()
    return summary if rank == 0 else None


def test_straggler_is_named_and_profile_writes_a_trace_per_rank(tmp_path):
    """Rank 2 sleeps 0.4 s per step: the gathered split names it the slowest rank with its extra time as compute,
    and after 3 windows above train.straggler_ratio it is named in the log. The same run profiles steps 2-3: one
    valid Chrome trace per rank with that rank's events, steps and communication waits labelled, and the summary's
    top-10 table."""
    from hai.cli import format_summary
    from hai.config.compose import compose
    from hai.train.metrics import read_metrics

    ov = [*DEFAULT, "train.steps=6", "train.profile.steps=[2,3]", "train.profile.memory=true", f"out_dir={tmp_path}"]
    summary = run_ranks(_delayed, 4, ov, 2, 0.4)[0]
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert r["straggler_rank"] == 2 and r["straggler_ratio"] > 1.5, r
        assert r["straggler_compute_s"] >= 0.4 and r["straggler_compute_s"] + r["straggler_data_s"] > 1.5 * \
            r["median_busy_s"]
    events = [r for r in _rows(tmp_path) if r.get("event") == "straggler"]
    assert [(e["step"], e["straggler_rank"]) for e in events] == [(3, 2)]

    import json

    for k in range(4):
        trace = json.loads((tmp_path / "profile" / f"rank_{k}.trace.json").read_text())
        assert trace["distributedInfo"]["rank"] == k and trace["distributedInfo"]["world_size"] == 4
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"hai.step_2", "hai.step_3", "hai.comm_wait"} <= names and "hai.step_4" not in names
        assert any(str(n).startswith("gloo:") for n in names)  # torch's own collective events
        assert "[memory]" in names  # profile.memory on CPU: allocations in the trace
    prof = summary["profile"]
    assert prof["steps"] == [2, 3] and "allocations recorded in the traces" in prof["memory"]
    rows = [ln for ln in prof["top_ops"].splitlines()[3:] if "%" in ln and not ln.startswith("-")]
    assert len(rows) == 10 and "Self CPU %" in prof["top_ops"]  # the 10 ops with the most self time
    text = format_summary(compose(ov), summary)
    assert f"profile     steps 2-3: {tmp_path}/profile/rank_K.trace.json" in text and "top 10 ops" in text


def _die_during_async_write(ov: list[str], die_at: int, started) -> None:
    """Forked child: one process with train.async_save=true. The background write of step ``die_at`` waits until the
    training thread has finished the next step, half-writes its data file and SIGKILLs the process."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    import hai.checkpoint.state as ck

    box = {}

    class _Writer(ck.FileSystemWriter):
        def write_data(self, plan, planner):
            fut = super().write_data(plan, planner)
            if f"step_{die_at:08d}" in str(self.path):
                fut.wait()
                deadline = time.time() + 60
                while box["trainer"].step < die_at + 1 and time.time() < deadline:  # training goes on meanwhile
                    time.sleep(0.01)
                started.set()
                truncate_and_die(str(self.path))
            return fut

    ck.FileSystemWriter = _Writer
    box["trainer"] = make_trainer(ov)
    box["trainer"].fit()


def test_kill9_during_async_write_keeps_the_previous_checkpoint(tmp_path):
    """train.async_save=true: the step after a save runs while its write is in flight; SIGKILL during that write
    leaves the previous checkpoint the newest complete one, and resume=auto from it reproduces the losses."""
    import multiprocessing as mp

    from test_checkpoint import overrides

    out = tmp_path / "run"
    ov = overrides(1, out, "train.save_every=2", "train.keep_last=1", "train.async_save=true")
    ctx = mp.get_context("fork")
    started = ctx.Event()
    child = ctx.Process(target=_die_during_async_write, args=(ov, 4, started))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL and started.is_set()
    root = out / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir()
    assert latest_checkpoint(str(root)) == str(root / "step_00000002")
    verify_checkpoint(str(root / "step_00000002"))
    rows = _rows(out)
    assert 5 in [r["step"] for r in rows if "event" not in r]  # step 5 finished while step 4 was being written
    assert [r["step"] for r in rows if r.get("event") == "checkpoint"] == [2]  # reported once its write was done

    run_ranks(fit_rank, 1, overrides(1, out, "train.save_every=2", "train.keep_last=1", "resume=auto"))
    ref_dir = tmp_path / "reference"
    run_ranks(fit_rank, 1, overrides(1, ref_dir))
    ref, got = losses(ref_dir), losses(out)
    assert [got[s] for s in range(3, 7)] == [ref[s] for s in range(3, 7)]
    assert sorted(os.listdir(root)) == ["step_00000006"]


def test_async_checkpoints_of_two_ranks_resume_exactly(tmp_path):
    """dp=2 with train.async_save=true, a save every 2 steps: every write completes (one in flight at a time) into a
    verified checkpoint, and resuming from step 4 gives steps 5-6 bit-exactly."""
    from test_checkpoint import overrides

    out = tmp_path / "run"
    run_ranks(fit_rank, 2, overrides(2, out, "train.save_every=2", "train.async_save=true"))
    rows = _rows(out)
    staged = [r["step"] for r in rows if r.get("event") == "checkpoint_staged"]
    written = [(r["step"], r["background"]) for r in rows if r.get("event") == "checkpoint"]
    assert staged == [2, 4, 6] and written == [(2, True), (4, True), (6, True)]
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000006"]
    for name in os.listdir(root):
        verify_checkpoint(str(root / name))
    # hai plan's staging memory (a copy of the rank's weights and optimizer shard) against what rank 0 staged
    from hai.config.compose import compose
    from hai.plan.memory import checkpoint_staging, static_bytes

    cfg = compose(overrides(2, out, "train.async_save=true"))
    planned = checkpoint_staging(cfg, static_bytes(cfg, 0))
    measured = [r["staging_bytes"] for r in rows if r.get("event") == "checkpoint_staged"][-1]
    assert planned["async_save"] and abs(measured / planned["bytes"] - 1) < 0.01, (measured, planned)
    first = losses(out)
    shutil.rmtree(root / "step_00000006")
    run_ranks(fit_rank, 2, overrides(2, out, "train.save_every=2", "resume=auto"))
    again = losses(out)
    assert [again[s] for s in (5, 6)] == [first[s] for s in (5, 6)]
