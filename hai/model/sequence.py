"""The model's seam for splitting the sequence over ranks (context parallelism), and the per-batch document
structure of a packed window (document masking, per-document RoPE positions).

Context parallelism (CP). Every module that the sequence split touches holds a :class:`SequenceSplit` in ``.cp``
(the transformer for the embedding and the losses, MLA for its keys, the MoE for its balance statistics). The
sequence of S positions is cut into 2·cp chunks of S/(2·cp) and rank i holds chunks i and 2·cp-1-i (zig-zag), so
every rank has the same causal attention work (chunk i attends (i+1) chunks, chunk 2cp-1-i attends 2cp-i: 2cp+1 in
all). On one device (``LOCAL``) nothing is split and every method is the identity; the parallel layer's
``CPGroup`` (``parallel/context_parallel.py``) implements the collectives and ``parallelize`` hands it to the
modules, as ``hai.model.regions`` does for tensor parallelism. Index arithmetic lives here (it is the model's
definition of which positions a rank holds); the collectives do not.

Documents. With ``data.document_mask`` a position attends only to positions of its own document (the documents of a
window end with EOS; the EOS token belongs to the document it ends), with ``data.reset_positions`` RoPE positions
restart at 0 at each document start. :func:`documents` computes both from the window's tokens on the device (no
host sync); they are defined over the whole window in global order, so they compose with the CP split (a document
may span chunks) and with MTP's shifted positions.

Legend: B batch, S positions (global), S_l positions on this rank, C latent width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hai.model.regions import Split

__all__ = ["SequenceSplit", "LOCAL_SEQ", "zigzag_runs", "DocumentSpec", "Documents", "documents"]

Run = tuple[int, int, int]  # (first local index, length, global position of the first)


def zigzag_runs(S_local: int, size: int, rank: int) -> tuple[Run, ...]:
    """This rank's contiguous runs of positions for a local sequence of ``S_local`` positions (global S_local·size):
    chunks ``rank`` and ``2·size-1-rank`` of S_local/2 each."""
    if size == 1:
        return ((0, S_local, 0),)
    c = S_local // 2
    return ((0, c, rank * c), (c, c, (2 * size - 1 - rank) * c))


class SequenceSplit(Split):
    """One device: the whole sequence here (size 1), every crossing the identity."""

    def runs(self, S_local: int) -> tuple[Run, ...]:
        return zigzag_runs(S_local, self.size, self.rank)

    def positions(self, S_local: int, device) -> torch.Tensor:
        """Global positions (S_local,) int64 of this rank's S_local positions, in local order."""
        return torch.cat([torch.arange(g0, g0 + n, device=device) for _, n, g0 in self.runs(S_local)])

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's positions of a whole-sequence tensor (tokens, targets, document ids) along ``dim``."""
        if not self.split:
            return x
        return x.index_select(dim, self.positions(x.shape[dim] // self.size, x.device))

    # --- collectives (the parallel layer's CPGroup); identities here
    def gather(self, x_BSC: torch.Tensor) -> torch.Tensor:
        """(B, S_l, C) -> (B, S, C) in global order; the backward reduce-scatters the gradient (autograd)."""
        return x_BSC

    def all_gather(self, x_BSC: torch.Tensor) -> torch.Tensor:
        """:meth:`gather` without autograd (for recompute regions that drive their own backward)."""
        return x_BSC

    def reduce_scatter(self, g_BSC: torch.Tensor) -> torch.Tensor:
        """(B, S, C) partial gradients in global order -> (B, S_l, C) this rank's positions of their sum."""
        return g_BSC


LOCAL_SEQ = SequenceSplit()


@dataclass(frozen=True)
class DocumentSpec:
    """How a window's documents shape attention: EOS id, ``data.document_mask``, ``data.reset_positions``."""

    eos_id: int
    mask: bool = False
    reset: bool = False
    marked: bool = False  # the batch marks where documents start (chat windows, hai.model.batch), not EOS


@dataclass(frozen=True)
class Documents:
    """Per position of the window (global order): ``segment_BS`` the document index (None: no document mask),
    ``position_BS`` the RoPE position (None: the global position)."""

    segment_BS: torch.Tensor | None = None
    position_BS: torch.Tensor | None = None

    def prefix(self, n: int) -> "Documents":
        """The first ``n`` positions (MTP depth k without padding sees S-k positions)."""
        return Documents(*(None if t is None else t[:, :n] for t in (self.segment_BS, self.position_BS)))


def documents(tokens_BS: torch.Tensor, spec: DocumentSpec | None,
              starts_BS: torch.Tensor | None = None) -> Documents | None:
    """Document ids and per-document positions of input windows ``tokens_BS`` (B, S), EOS closing a document, or
    (``starts_BS``, bool) where the batch marks document starts (a multi-turn chat has an EOS after every turn)."""
    if spec is None or not (spec.mask or spec.reset):
        return None
    if starts_BS is None:
        eos_BS = tokens_BS == spec.eos_id
        ends_before = torch.nn.functional.pad(eos_BS[:, :-1], (1, 0), value=False).long()
    else:  # a start at position 0 opens document 0
        ends_before = torch.nn.functional.pad(starts_BS[:, 1:], (1, 0), value=False).long()
    segment = ends_before.cumsum(1)  # EOS positions before this one: the document index
    pos = torch.arange(tokens_BS.shape[1], device=tokens_BS.device).expand_as(tokens_BS)
    start = torch.where(ends_before.bool(), pos, torch.zeros_like(pos)).cummax(1).values
    return Documents(segment if spec.mask else None, (pos - start) if spec.reset else None)
