"""Count host synchronizations: the calls that make the host wait for a device value, and pageable host-to-device
copies.

``count_host_syncs()`` is a ``TorchFunctionMode`` that counts, by op, every call that reads a tensor's data on the
host or whose output size depends on it (so on CUDA the host must wait for the kernels before it): ``item``,
``tolist``, ``cpu``, ``numpy``, ``__bool__`` / ``__int__`` / ``__float__`` / ``__index__``, ``nonzero`` /
``argwhere``, ``masked_select``, ``unique``, ``bincount`` (sized by the input's max), ``repeat_interleave`` (sized by
the repeats). On CPU these cost nothing, so this is how a CPU test holds the code to its budget; each is a stall
on a GPU. (Blocking collective waits are another matter: on NCCL they are stream dependencies.)

It also counts, as ``pageable_h2d``, every copy of host memory that is not pinned onto another device (``to``,
``cuda``, ``copy_``, and ``torch.tensor`` / ``as_tensor`` / ``new_tensor`` of Python data with a device): CUDA
stages such a copy through a pinned buffer after waiting for the stream, so the host stalls as for a sync. A pinned
source with ``non_blocking=True`` does not. On a CPU-only run these copies go nowhere; run device code on ``meta``
tensors to see them.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SYNC_OPS", "count_host_syncs"]

SYNC_OPS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                      "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave"})
_FROM_DATA = frozenset({"tensor", "as_tensor"})


def _target(args, kwargs) -> torch.device | None:
    """The device a ``to(...)`` call moves to, if it names one (a device, a device string, or another tensor)."""
    for a in (kwargs.get("device"), *args):
        if isinstance(a, (torch.device, str)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _pageable(src: torch.Tensor, dst: torch.device | None) -> bool:
    return dst is not None and dst.type != "cpu" and src.device.type == "cpu" and not src.is_pinned()


def _pageable_h2d(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether this call copies unpinned host memory onto a device."""
    if name in _FROM_DATA or name == "new_tensor":
        data = args[1] if name == "new_tensor" else (args[0] if args else kwargs.get("data"))
        dst = kwargs.get("device", args[0].device if name == "new_tensor" else None)
        return not isinstance(data, torch.Tensor) and dst is not None and torch.device(dst).type != "cpu"
    if name == "to" and args and isinstance(args[0], torch.Tensor):
        return _pageable(args[0], _target(args[1:], kwargs))
    if name == "cuda" and args and isinstance(args[0], torch.Tensor):
        return _pageable(args[0], torch.device("cuda"))
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return _pageable(args[1], args[0].device)
    return False


class count_host_syncs(TorchFunctionMode):
    """``with count_host_syncs() as syncs: ...`` then ``syncs.counts`` (Counter by op, pageable host-to-device copies
    as ``pageable_h2d``) and ``syncs.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name, kwargs = getattr(func, "__name__", ""), kwargs or {}
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif _pageable_h2d(name, args, kwargs):
            self.counts["pageable_h2d"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
