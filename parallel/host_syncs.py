"""Count host synchronizations: the calls that make the host wait for a device value.

``count_host_syncs()`` is a ``TorchFunctionMode`` that counts, by op, every call that reads a tensor's data on the
host or whose output size depends on it (so on CUDA the host must wait for the kernels before it): ``item``,
``tolist``, ``cpu``, ``numpy``, ``__bool__`` / ``__int__`` / ``__float__`` / ``__index__``, ``nonzero`` /
``argwhere``, ``masked_select``, ``unique``, ``bincount`` (sized by the input's max), ``repeat_interleave`` (sized by
the repeats). On CPU these cost nothing, so this is how a CPU test holds the code to its budget; each is a stall
on a GPU. (Blocking collective waits are another matter: on NCCL they are stream dependencies.)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SYNC_OPS", "count_host_syncs"]

SYNC_OPS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                      "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave"})


class count_host_syncs(TorchFunctionMode):
    """``with count_host_syncs() as syncs: ...`` then ``syncs.counts`` (Counter by op) and ``syncs.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
