"""Profiles of a few steps: ``train.profile.steps=[a,b]`` records steps a..b (as logged) on every rank with
``torch.profiler`` (CPU activities, and CUDA on a GPU) and writes one Chrome trace per rank,
``OUT_DIR/profile/rank_K.trace.json`` (chrome://tracing, Perfetto). Each step is a ``hai.step_N`` region; every
blocking wait on a collective is a ``hai.comm_wait`` region (the exposed communication, see
``hai.train.straggler.CommClock``), next to the ``gloo:``/``nccl:`` collective events torch records itself.

``train.profile.memory=true``: on CUDA a memory snapshot of the window (``rank_K.memory.pickle``, for
https://pytorch.org/memory_viz); on CPU there is no allocator history to snapshot, so the trace records CPU
allocations instead (``profile_memory``: memory events in the trace, memory columns in the table).

Rank 0's summary lists the files and a table of the 10 ops with the most self time.
"""

from __future__ import annotations

import os

import torch

__all__ = ["StepProfiler"]


class StepProfiler:
    def __init__(self, steps: list[int], memory: bool, out_dir: str, rank: int, device: torch.device):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.memory, self.rank, self.device = memory, rank, device
        self.dir = os.path.join(out_dir, "profile")
        self._prof = None
        self._region = None
        self.trace: str | None = None
        self.snapshot: str | None = None
        self.table: str | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def begin(self, step: int) -> None:
        """Before step ``step`` (1-based) runs."""
        if step == self.first:
            self._start()
        if self._prof is not None:
            self._region = torch.profiler.record_function(f"hai.step_{step}")
            self._region.__enter__()

    def end(self, step: int) -> None:
        """After step ``step`` has run (and been logged)."""
        if self._region is not None:
            self._region.__exit__(None, None, None)
            self._region = None
        if self._prof is not None and step >= self.last:
            self._stop()

    def close(self) -> None:
        """End of the run (also when it stopped inside the window: what was recorded is written)."""
        self.end(self.last)

    def _start(self) -> None:
        cuda = self.device.type == "cuda"
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self._prof = torch.profiler.profile(activities=acts, record_shapes=True,
                                            profile_memory=self.memory and not cuda)
        self._prof.__enter__()
        if self.memory and cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)

    def _stop(self) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        self.trace = os.path.join(self.dir, f"rank_{self.rank}.trace.json")
        prof.export_chrome_trace(self.trace)
        if self.memory and self.device.type == "cuda":
            self.snapshot = os.path.join(self.dir, f"rank_{self.rank}.memory.pickle")
            torch.cuda.memory._dump_snapshot(self.snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            self.table = prof.key_averages().table(sort_by=key, row_limit=10)
            with open(os.path.join(self.dir, "top_ops.txt"), "w") as f:
                f.write(self.table + "\n")

    def summary(self) -> dict | None:
        if self.trace is None:
            return None
        memory = None
        if self.memory:
            memory = self.snapshot if self.snapshot else "CPU run: allocations recorded in the traces (profile_memory)"
        return {"dir": self.dir, "steps": [self.first, self.last], "traces": "rank_K.trace.json, one per rank",
                "memory": memory, "top_ops": self.table}
