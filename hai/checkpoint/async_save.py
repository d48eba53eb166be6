"""Asynchronous checkpoints (``train.async_save``): the training loop pays for a copy, a thread pays for the write.

``AsyncCheckpointer.save(run, ...)`` (collective, main thread):

1. waits for the previous save to finish (at most one write in flight; its staging buffers are reused),
2. stages every tensor of this rank's checkpoint (model weights and buffers, its ZeRO-1 optimizer slices, RNG,
   progress) into host buffers that live as long as the checkpointer (pinned on CUDA, copied with
   ``non_blocking`` and one stream sync), so the next step may change the live tensors at once,
3. hands the staged state to a background thread that runs the same write as a synchronous save
   (``hai.checkpoint.state.write_checkpoint``: temp directory, DCP, sizes and CRC-32, rank 0's atomic commit)
   with its collectives on a process group of its own (gloo, created with the checkpointer), so they never
   interleave with the training's collectives.

A crash during the write leaves ``.tmp-step_N`` behind and the previous checkpoint the newest complete one (the
commit is the rename). ``poll()`` reports a finished write (path, seconds) and re-raises its error on the main
thread; ``wait()`` blocks until the write in flight is done (before a preemption exit and at the end of a run).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from hai.checkpoint.state import RunState, _Piece, checkpoint_meta, checkpoint_state, write_checkpoint

__all__ = ["AsyncCheckpointer", "resolve_async"]


def resolve_async(setting: bool | None, device: torch.device) -> bool:
    """``train.async_save``: None means on with CUDA, off on CPU."""
    return device.type == "cuda" if setting is None else bool(setting)


class AsyncCheckpointer:
    def __init__(self, device: torch.device):
        self.device = device
        # the background write's collectives get their own group (every rank creates it here, collectively)
        self.group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._done: tuple[str, float, int] | None = None  # (path, write seconds, step) of the finished write
        self._error: BaseException | None = None
        self.finished: list[tuple[str, float, int]] = []  # writes done and not yet reported
        self.staging_bytes = 0
        self.last_stage_s = 0.0

    # ------------------------------------------------------------------ staging
    def _copy(self, key: tuple[str, int], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
            self._buffers[key] = buf
        buf.copy_(t.detach(), non_blocking=True)
        return buf

    def _stage(self, state: dict[str, Any]) -> dict[str, Any]:
        staged: dict[str, Any] = {}
        for k, v in state.items():
            if isinstance(v, _Piece):
                blocks = [(self._copy((k, i), t), tuple(o)) for i, (t, o) in enumerate(v.blocks)]
                staged[k] = _Piece(None, (), tuple(v.global_size), blocks=blocks)
            elif isinstance(v, torch.Tensor):
                staged[k] = self._copy((k, 0), v)
            else:
                staged[k] = v
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the copies into pinned memory have landed
        self.staging_bytes = sum(b.numel() * b.element_size() for b in self._buffers.values())
        return staged

    # ------------------------------------------------------------------ save / poll / wait
    def save(self, run: RunState, out_dir: str, keep_last: int, config: dict[str, Any]) -> float:
        """Collective: stage this rank's state and start writing it; returns the seconds the caller was held
        (waiting for the previous write + staging)."""
        t0 = time.perf_counter()
        self._join()
        staged, meta = self._stage(checkpoint_state(run)), checkpoint_meta(run, config)
        self.last_stage_s = time.perf_counter() - t0

        def write() -> None:
            t1 = time.perf_counter()
            try:
                path = write_checkpoint(staged, meta, out_dir, keep_last, self.group)
                self._done = (path, time.perf_counter() - t1, meta["step"])
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread by poll()/wait()
                self._error = e

        self._thread = threading.Thread(target=write, name=f"hai-ckpt-step{meta['step']}", daemon=True)
        self._thread.start()
        return self.last_stage_s

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _join(self) -> None:
        """Wait for the write in flight; keep its result in ``finished``, re-raise its error here."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if self._done is not None:
            self.finished.append(self._done)
            self._done = None

    def poll(self) -> list[tuple[str, float, int]]:
        """Writes finished since the last call: (path, write seconds, step) each; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self._join()
        out, self.finished = self.finished, []
        return out

    def wait(self) -> list[tuple[str, float, int]]:
        """Block until no write is in flight; the finished writes as ``poll``."""
        self._join()
        return self.poll()
