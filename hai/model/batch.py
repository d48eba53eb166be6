"""What a batch of windows carries besides token ids: per-position flags in the bits above the id (SFT).

A batch is an int64 tensor (B, S + 1) of windows (``hai.model.transformer``). Token ids use the low 32 bits; two
flags sit above them, so the one tensor that every layout already moves, slices and hands to every pipeline stage
(the sampler, the dp split, the executor's micro-batches, the CP split) carries them too:

- ``NOT_TARGET`` (bit 32): this token is not a loss target (a prompt, a system or user turn, padding). Plain
  pre-training windows have no flags: every token is a target, exactly as before.
- ``DOC_START`` (bit 33): a document (a conversation) starts at this token. Packed chat windows mark their
  conversations this way instead of by EOS, because a multi-turn conversation holds an EOS after every assistant
  turn; ``hai.model.sequence.documents`` turns the marks into the segment ids and per-document positions of the
  document mask and the RoPE position reset.

A next-token target is counted only inside the document of the position that predicts it (:func:`target_ids`),
so a packed window of k conversations has exactly the targets of the k conversations run one by one, for the main
loss and for every MTP depth.

Legend: B batch, S positions, W = S + 1 window tokens.
"""

from __future__ import annotations

import torch

__all__ = ["ID_BITS", "NOT_TARGET", "DOC_START", "token_ids", "doc_starts", "target_ids", "target_counts"]

ID_BITS = 32
_ID_MASK = (1 << ID_BITS) - 1
NOT_TARGET = 1 << ID_BITS
DOC_START = 1 << (ID_BITS + 1)


def token_ids(tokens: torch.Tensor) -> torch.Tensor:
    """The token ids of a (flagged or plain) token tensor."""
    return tokens & _ID_MASK


def doc_starts(tokens: torch.Tensor) -> torch.Tensor:
    """Bool tensor: a document starts at this position (``DOC_START``)."""
    return (tokens & DOC_START) != 0


def target_ids(tokens_BW: torch.Tensor, k: int = 0) -> torch.Tensor:
    """Targets (B, S - k) of prediction depth ``k`` (0: the main next-token loss; k: MTP depth k) from windows
    (B, W): position i predicts token i + k + 1, which counts when it is a target (no ``NOT_TARGET``) and no document
    starts in positions i+1 .. i+k+1; otherwise -1 (ignored by the cross-entropy)."""
    tgt = tokens_BW[:, k + 1:]
    ids = token_ids(tgt)
    keep = (tgt & NOT_TARGET) == 0
    starts = doc_starts(tokens_BW[:, 1:])  # starts at positions 1..S
    if k == 0:
        crossed = starts
    else:  # any start among the k+1 positions i+1 .. i+k+1
        crossed = starts.unfold(1, k + 1, 1).any(-1)
    return torch.where(keep & ~crossed, ids, torch.full_like(ids, -1))


def target_counts(micro_batches: list[torch.Tensor], mtp_depth: int) -> torch.Tensor:
    """(1 + mtp_depth,) float64: the number of targets of the main loss and of each MTP depth over ``micro_batches``
    (device tensors; no host read)."""
    rows = [torch.stack([(target_ids(mb, k) >= 0).sum() for k in range(mtp_depth + 1)]) for mb in micro_batches]
    return torch.stack(rows).sum(0).double()
