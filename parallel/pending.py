"""Pending communication: the handles the expert-parallel seams return, so a caller can compute while a collective
is in flight (``hai.pipeline.overlap``'s F&B) and only then wait.

``Pending`` finishes a transfer lazily; ``Chain`` drives a multi-hop transfer (hierarchical dispatch: hop k+1 is
issued once hop k arrived) from a generator of work handles; ``Joint`` advances several transfers together.

Streams. Every collective is issued with ``async_op=True``. On NCCL it runs on the process group's own CUDA stream,
which first waits for the compute stream (so its inputs are ready), and ``work.wait()`` only makes the *current*
(compute) stream wait for it: the host never blocks. The kernels that consume a result (decode, the next hop's row
gather, the experts) are enqueued after that dependency, and meanwhile the host keeps enqueueing the other chunk's
kernels, which the GPU runs while the collective is on the wire; NCCL keeps the tensors of an in-flight collective
alive. ``ready()`` answers "would ``step()`` / ``wait()`` block the host?": never on NCCL (``host_blocking=False``),
and on gloo, whose waits block the calling thread, only once the work has completed (``Work.is_completed()``, which
on CUDA would report GPU progress instead).

Filling the waits (``hai.pipeline.overlap.run_fb``'s ``fill``: DualPipe's deferred weight gradients). On gloo the
host would sit idle in ``wait()``, so deferred weight-gradient GEMMs run until the work has completed. On NCCL the
host never waits, so "until it completes" cannot be asked; instead one deferred GEMM is enqueued right after each
collective is issued, ahead of the other chunk's compute and of the kernels that consume the collective's result:
the compute stream runs it while the collective is on the wire (the consumer's stream dependency comes after it).
"""

from __future__ import annotations

from typing import Any

from hai.model.moe import Pending  # the seams' result type, which the model's local dispatcher returns done

__all__ = ["Pending", "Chain", "Joint"]


class Chain(Pending):
    """A multi-hop transfer driven by a generator that yields the work handle of each hop right after issuing it
    asynchronously and returns the result; the first hop is issued on construction. ``host_blocking``: whether the
    backend's ``wait()`` blocks the host (gloo) or is a stream dependency (NCCL)."""

    def __init__(self, gen, host_blocking: bool = True):
        super().__init__(None)
        self._gen, self.host_blocking = gen, host_blocking
        self._work = next(gen)

    def step(self) -> bool:
        if self._gen is None:
            return False
        try:
            self._work = next(self._gen)
            return True
        except StopIteration as stop:
            self._gen, self._work, self._result = None, None, stop.value
            return False

    def ready(self) -> bool:
        return self._work is None or not self.host_blocking or self._work.is_completed()

    def wait(self) -> Any:
        while self.step():
            pass
        return self._result


class Joint(Pending):
    """Several transfers advanced together (each step advances every part, in order); ``wait()`` gives their results
    as a tuple."""

    def __init__(self, *parts: Pending):
        super().__init__(None)
        self.parts = parts

    def step(self) -> bool:
        return any([p.step() for p in self.parts])  # a list: every part advances

    def ready(self) -> bool:
        return all(p.ready() for p in self.parts)

    @property
    def host_blocking(self) -> bool:
        return any(p.host_blocking for p in self.parts)

    def wait(self) -> tuple:
        return tuple(p.wait() for p in self.parts)
