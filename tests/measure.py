"""Measure what a forward keeps for its backward: the bytes of every storage autograd saves while a function runs
(saved-tensor hooks; each storage counted once, the parameters' excluded). The plan's activation items
(:mod:`hai.plan.memory`) are checked against it in the tests and in ``benchmarks/memory.py``. Test-side code: it ships
with the tests, not the package."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

__all__ = ["kept_for_backward"]


def kept_for_backward(fn: Callable[[], Any], params: Iterable[torch.Tensor]) -> tuple[int, Any]:
    """(bytes autograd keeps while ``fn()`` runs, excluding ``params``' storages; ``fn()``'s result). Run only the
    forward under it: a backward's own recomputation is transient, not kept."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(kept.values()), out
