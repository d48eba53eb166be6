"""Straggler statistics: every ``train.log_every`` steps, each rank's step time split into compute, exposed
communication and data wait, gathered with one small all-gather; rank 0 logs the slowest rank and names a rank that
stays slower than ``train.straggler_ratio`` x the median.

The split of one step on one rank (seconds, means over the window):

- ``data``: drawing the step's micro-batches (``data_wait_s`` of the trainer's record),
- ``comm``: communication this rank waited for: host time blocked in ``Work.wait`` (every blocking collective and
  every wait on an async handle goes through it; :class:`CommClock`). On NCCL the host does not block, so there it is
  the collectives' own duration on the GPU (``ProcessGroupNCCL``'s completion hook with collective timing on),
  overlapped or not — not measured on this CPU-only machine,
- ``compute``: the rest of the step.

In a synchronous job every rank's step takes as long; the slow rank is the one that waits least, so the ranking uses
a rank's busy time, compute + data. ``straggler_ratio`` in the metrics is the slowest rank's busy time over the
median rank's.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import torch
import torch.distributed as dist

from hai.kernels import to_device

__all__ = ["CommClock", "StragglerStats", "PERSIST_WINDOWS", "split_of"]

PERSIST_WINDOWS = 3  # consecutive windows a rank must be the slow one (above the ratio) to be named


class CommClock:
    """Seconds the main thread spent blocked in ``Work.wait`` since the last ``take()`` (installed while a run
    trains; ``label`` wraps each wait in a profiler ``record_function`` while a profile is recording). On NCCL, the
    GPU time of the collectives (completion hook) instead."""

    def __init__(self):
        self.blocked_s = 0.0
        self.label = False
        self._main = threading.get_ident()
        self._lock = threading.Lock()
        self._original = None
        self._nccl = False

    def install(self) -> "CommClock":
        import torch._C._distributed_c10d as c10d

        if dist.is_initialized() and dist.get_backend() == "nccl":
            self._nccl = self._hook_nccl()
        if self._nccl or self._original is not None:
            return self
        original, clock = c10d.Work.wait, self

        def wait(work, *args, **kwargs):
            if threading.get_ident() != clock._main:
                return original(work, *args, **kwargs)
            t0 = time.perf_counter()
            try:
                if clock.label:
                    with torch.profiler.record_function("hai.comm_wait"):
                        return original(work, *args, **kwargs)
                return original(work, *args, **kwargs)
            finally:
                clock.blocked_s += time.perf_counter() - t0

        c10d.Work.wait, self._original = wait, original
        return self

    def _hook_nccl(self) -> bool:
        """Sum the durations of every NCCL collective (timing on; the hook runs on NCCL's watchdog thread)."""
        def done(info) -> None:
            d = getattr(info, "active_duration", None)
            if d is not None:
                with self._lock:
                    self.blocked_s += d.total_seconds()

        hooked = False
        for pg in list(dist.distributed_c10d._world.pg_names):
            try:
                backend = pg._get_backend(torch.device("cuda"))
                backend._enable_collectives_timing()
                pg._register_on_completion_hook(done)
                hooked = True
            except (RuntimeError, AttributeError, ValueError):
                continue
        return hooked

    def uninstall(self) -> None:
        if self._original is not None:
            import torch._C._distributed_c10d as c10d

            c10d.Work.wait, self._original = self._original, None

    def take(self) -> float:
        with self._lock:
            out, self.blocked_s = self.blocked_s, 0.0
        return out


def split_of(step_s: float, comm_s: float, data_s: float) -> tuple[float, float, float]:
    """(compute, comm, data) of one step: compute is what is left of the step."""
    comm = min(comm_s, step_s)
    data = min(data_s, step_s - comm)
    return step_s - comm - data, comm, data


class StragglerStats:
    """Accumulates one rank's split over a window; ``gather`` (collective, every rank) returns rank 0's metrics."""

    def __init__(self, rank: int, world: int, device: torch.device, ratio: float, ranks_per_node: int):
        self.rank, self.world, self.device = rank, world, device
        self.ratio, self.ranks_per_node = ratio, max(1, ranks_per_node)
        self._sum = [0.0, 0.0, 0.0, 0.0]  # compute, comm, data, step
        self._steps = 0
        self.streak: tuple[int, int] = (-1, 0)  # (rank, consecutive windows above the ratio)

    def add(self, step_s: float, comm_s: float, data_s: float) -> None:
        for i, v in enumerate((*split_of(step_s, comm_s, data_s), step_s)):
            self._sum[i] += v
        self._steps += 1

    def gather(self) -> list[list[float]] | None:
        """All ranks' mean split over the window (compute, comm, data, step) on rank 0, None elsewhere. One
        all-gather of 4 float64 per rank; only rank 0 reads the result."""
        n = max(1, self._steps)
        mine = [v / n for v in self._sum]
        self._sum, self._steps = [0.0, 0.0, 0.0, 0.0], 0
        if self.world == 1:
            return [mine]
        vec = to_device(torch.tensor(mine, dtype=torch.float64, device="cpu"), self.device)
        out = vec.new_empty(self.world * 4)
        # torch 2.13 deprecates all_gather_into_tensor for all_gather_single (a FutureWarning per call otherwise)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, vec)
        return out.view(self.world, 4).tolist() if self.rank == 0 else None

    def metrics(self, rows: list[list[float]]) -> dict:
        """Rank 0: the slowest rank (by compute + data), its ratio to the median rank and its split."""
        busy = [c + d for c, _, d, _ in rows]
        slow = max(range(len(rows)), key=lambda r: busy[r])
        median = statistics.median(busy)
        ratio = busy[slow] / median if median > 0 else 1.0
        c, m, d, _ = rows[slow]
        return {"straggler_rank": slow, "straggler_ratio": ratio, "straggler_compute_s": c, "straggler_comm_s": m,
                "straggler_data_s": d, "median_busy_s": median}

    def persistent(self, m: dict) -> str | None:
        """The log line naming a rank slower than the ratio for PERSIST_WINDOWS windows in a row (once per run of
        windows), else None."""
        rank, count = self.streak
        above = m["straggler_ratio"] > self.ratio
        count = (count + 1 if rank == m["straggler_rank"] else 1) if above else 0
        self.streak = (m["straggler_rank"] if above else -1, count)
        if count != PERSIST_WINDOWS:
            return None
        r = m["straggler_rank"]
        return (f"rank {r} (node {r // self.ranks_per_node}) is a straggler: {m['straggler_ratio']:.2f}x the median "
                f"rank's busy time for {PERSIST_WINDOWS} windows in a row (train.straggler_ratio={self.ratio:g}); "
                f"its step: compute {m['straggler_compute_s']:.3f} s, exposed communication "
                f"{m['straggler_comm_s']:.3f} s, data wait {m['straggler_data_s']:.3f} s")


def report(line: str) -> None:
    print(f"hai train: {line}", file=sys.stderr, flush=True)
