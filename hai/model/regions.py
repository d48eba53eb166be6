"""The model's seam for splitting its weights over ranks (tensor parallelism), as the MoE's ``Dispatcher`` is its
seam for expert parallelism.

Every module that a tensor-parallel layout splits (MLA, the dense MLP and shared experts, the MoE's balance
statistics, the vocabulary embedding and head) holds a :class:`Region` in ``.tp`` and calls it where its split
weights meet the rest of the model: ``enter`` before column-split weights, ``exit`` after row-split ones, ``sum``
for statistics over the split sequence, ``embed`` for a vocabulary-split embedding. On one device (``LOCAL``) each is
the identity or the single-device op, so the model has no collectives. The parallel layer's ``TPGroup``
(``parallel/tensor_parallel.py``) implements the same methods with the TP group's collectives, and its
``parallelize`` hands one to each module it splits, with the module's slice of each split weight.

Why a seam inside the modules rather than wrappers around them: V3's recompute regions (``hai.model.recompute``)
fuse a norm with the linears after it into one autograd function, and under TP the region must be entered between
the norm's input and those linears, inside the fused piece; a wrapper around the module cannot reach there.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Split", "Region", "LOCAL"]


class Split:
    """What every seam over a group of ranks has (tensor parallelism here, context parallelism in
    ``hai.model.sequence``): its size and this rank's index (1 and 0 on one device), and sums over the group that
    are identities on one device."""

    size: int = 1
    rank: int = 0

    @property
    def split(self) -> bool:
        return self.size > 1

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, gradient passed through (statistics every rank then uses identically)."""
        return x

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """In-place sum over the group of a tensor outside autograd (counts)."""
        return x


class Region(Split):
    """One device: nothing split (size 1), every crossing the identity."""

    sp: bool = False  # sequence parallelism: the residual stream holds S / size positions per rank

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Into the split region (the input of column-split weights)."""
        return x

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        """Out of the split region (the output of row-split weights: partial sums)."""
        return y

    def embed(self, embedding: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding lookup (vocabulary-split rows under TP)."""
        return embedding(tokens)

    def cross_entropy(self, logits_TV: torch.Tensor, target_T: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of vocabulary-split logits (only called when ``split``; one device uses the model's
        own cross-entropy)."""
        raise NotImplementedError("a vocabulary-split cross-entropy needs a split region (the parallel layer's "
                                  "TPGroup)")


LOCAL = Region()
