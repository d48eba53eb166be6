"""Windows, mixtures, datasets and the deterministic, resumable, data-parallel sampler.

Windows. A source's windows are the fixed slices ``[w*L, w*L+L+1)`` of each shard (L = ``train.seq_len``; a window
never spans two shards). The held-out split is the last ``data.val_fraction`` of a source's windows (or a separate
``data.val_path``); training draws from the rest.

Sampler. The global batch of step s is the draws s*G .. s*G+G-1 of an infinite stream, and data-parallel rank r takes
the r-th contiguous slice of it, so a run resumes from its step alone and any dp size (or number of ranks) sees
exactly the same global batch. Draw g of a single source is window ``P_e(g mod n)`` of epoch ``e = g // n``, where
``P_e`` is a keyed Feistel bijection of ``[0, n)`` (cycle-walking over the next even power of two), so the sampler
holds O(1) state for any number of windows instead of a permutation of all of them. A mixture assigns draws to
sources in rounds of ``R`` draws: source i gets ``c_i`` positions of every round (largest-remainder rounding of
``R * w_i``, so the proportions are exact per round), the positions shuffled by a keyed bijection of ``[0, R)``, and
source i's draws, in stream order, are its own single-source stream (O(R) state for the round being read).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from hai.config import DataConfig, mixture_item
from hai.data.tokens import START, TARGET, DataError, TokenFile, shard_paths
from hai.model.batch import ID_BITS

__all__ = ["WindowSet", "Mixture", "Dataset", "open_dataset", "Sampler", "Permutation", "MIX_ROUND"]

MIX_ROUND = 4096  # draws per mixture round: weights resolve to 1/4096


# ----------------------------------------------------------------------------------------------------------------------
# Keyed bijections
# ----------------------------------------------------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key64(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class Permutation:
    """A keyed bijection of ``[0, n)`` with O(1) state: a 4-round balanced Feistel network over the smallest even
    number of bits covering n, cycle-walked (re-applied while the value is >= n; the domain is < 4n, so fewer than
    4 applications on average)."""

    ROUNDS = 4

    def __init__(self, n: int, *key):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits & 1
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [np.uint64(_key64("feistel", r, *key)) for r in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64)
        if self.n == 1:
            return np.zeros(x.shape, np.int64)
        out = self._feistel(x)
        bad = out >= np.uint64(self.n)
        while bad.any():
            out[bad] = self._feistel(out[bad])
            bad = out >= np.uint64(self.n)
        return out.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# Windows, mixtures, datasets
# ----------------------------------------------------------------------------------------------------------------------

class WindowSet:
    """The windows ``[lo, hi)`` of a source (its shards' windows, numbered shard after shard). A chat file
    (version 2, ``TokenFile.window``) is whole windows of seq_len + 1 tokens back to back; its windows carry their
    flags (:mod:`hai.model.batch`: not-a-target, document start) in the bits above the token ids."""

    def __init__(self, files: list[TokenFile], seq_len: int, lo: int = 0, hi: int | None = None, name: str = ""):
        self.files, self.seq_len, self.name = files, seq_len, name or (files[0].path if files else "?")
        self.stride = _stride(files, seq_len, self.name)
        edge = 0 if self.stride > seq_len else 1  # a stream's last window needs one token past its end
        per_shard = np.array([max(0, (len(f) - edge) // self.stride) for f in files], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])  # O(shards), not O(windows)
        total = int(self.starts[-1])
        self.lo, self.hi = lo, total if hi is None else hi
        if self.hi - self.lo < 1:
            raise DataError(f"{self.name!r} has {sum(len(f) for f in files)} tokens in {len(files)} file(s), "
                            f"{total} window(s) of train.seq_len+1={seq_len + 1} tokens, none left for this split: "
                            f"use more data, a shorter train.seq_len or a smaller data.val_fraction")

    @property
    def n_windows(self) -> int:
        return self.hi - self.lo

    @property
    def num_tokens(self) -> int:
        return int(sum(len(f) for f in self.files))

    def window(self, w: int) -> np.ndarray:
        """Tokens of window ``w`` of this set (0 <= w < n_windows), seq_len + 1 of them."""
        g = self.lo + int(w)
        shard = int(np.searchsorted(self.starts, g, side="right")) - 1
        start = (g - int(self.starts[shard])) * self.stride
        f = self.files[shard]
        tokens = np.asarray(f.tokens[start: start + self.seq_len + 1])
        if f.mask is None:
            return tokens
        return _flagged(tokens, np.asarray(f.mask[start: start + self.seq_len + 1]))


def _stride(files: list[TokenFile], seq_len: int, name: str) -> int:
    """Tokens between window starts: seq_len (a token stream; windows share their edge token) or the chat files'
    whole windows of seq_len + 1 (which must be this run's)."""
    window = files[0].window if files else 0
    if window and window != seq_len + 1:
        raise DataError(f"{name!r} holds chat windows of {window} tokens, prepared for train.seq_len={window - 1}, "
                        f"but train.seq_len={seq_len}: train with train.seq_len={window - 1} or re-run `hai prepare "
                        f"data.format=chat train.seq_len={seq_len}`")
    return window or seq_len


def _flagged(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int64 token ids with the flags of :mod:`hai.model.batch` from the file's mask bits."""
    out = tokens.astype(np.int64)
    out |= ((mask & TARGET) == 0).astype(np.int64) << ID_BITS
    out |= ((mask & START) != 0).astype(np.int64) << (ID_BITS + 1)
    return out


class Mixture:
    """Weighted sources drawn in rounds of :data:`MIX_ROUND` with exact per-round quotas (one source: quota 1)."""

    def __init__(self, sources: list[WindowSet], weights: list[float] | None = None, seed: int = 0):
        self.sources = sources
        w = np.asarray(weights if weights is not None else [1.0] * len(sources), dtype=np.float64)
        self.weights = w / w.sum()
        if len(sources) == 1:
            self.quota = np.array([1], dtype=np.int64)
        else:
            raw = self.weights * MIX_ROUND
            q = np.floor(raw).astype(np.int64)
            q[np.argsort(-(raw - q), kind="stable")[: MIX_ROUND - int(q.sum())]] += 1  # largest remainders
            for s, c in zip(sources, q):
                if c == 0:
                    raise DataError(f"data.mixture weight of {s.name!r} is below 1/{MIX_ROUND} of the total: raise "
                                    f"it or drop the source")
            self.quota = q
        self.round = int(self.quota.sum())
        self.bounds = np.concatenate([[0], np.cumsum(self.quota)])
        self.seed = seed

    @lru_cache(maxsize=64)
    def _perm(self, *key) -> Permutation:
        n = self.round if key[0] == "mix" else self.sources[key[1]].n_windows
        return Permutation(n, self.seed, *key)

    @lru_cache(maxsize=4)
    def _round(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Round r's (source, draw index within the source) per position: the quotas' slots shuffled, and the j-th
        slot of source i in position order is that source's draw r*c_i + j (so each source's draws stay in stream
        order: its first n draws are one epoch of its windows)."""
        slot = self._perm("mix", r)(np.arange(self.round))
        src = np.searchsorted(self.bounds, slot, side="right") - 1
        order = np.argsort(src, kind="stable")  # positions grouped by source, in position order within each
        j = np.empty(self.round, dtype=np.int64)
        j[order] = np.arange(self.round) - np.repeat(self.bounds[:-1], self.quota)
        return src, r * self.quota[src] + j

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Draws ``g`` (int64 array) -> (source index, window index in that source)."""
        g = np.asarray(g, dtype=np.int64)
        if len(self.sources) == 1:
            src, k = np.zeros_like(g), g
        else:
            rnd, pos = np.divmod(g, self.round)
            src, k = np.empty_like(g), np.empty_like(g)
            for r in np.unique(rnd):
                sel = rnd == r
                r_src, r_k = self._round(int(r))
                src[sel], k[sel] = r_src[pos[sel]], r_k[pos[sel]]
        win = np.empty_like(g)
        for s in np.unique(src):
            sel = src == s
            n = self.sources[s].n_windows
            epoch, pos = np.divmod(k[sel], n)
            out = np.empty_like(pos)
            for e in np.unique(epoch):
                m = epoch == e
                out[m] = self._perm("src", int(s), int(e))(pos[m])
            win[sel] = out
        return src, win

    def rows(self, g: np.ndarray) -> np.ndarray:
        src, win = self.locate(g)
        return np.stack([self.sources[s].window(w) for s, w in zip(src.tolist(), win.tolist())])

    @property
    def n_windows(self) -> int:
        return sum(s.n_windows for s in self.sources)


@dataclass
class Dataset:
    train: Mixture
    val: Mixture | None
    vocab_size: int
    tokenizer: str
    eos_id: int
    sources: list[tuple[float, list[str]]]  # (weight, shard paths) per training source
    loss_mask: bool = False  # chat data: windows carry flags (hai.model.batch), the loss counts targets only


def _open_source(spec: str, key: str) -> list[TokenFile]:
    files = [TokenFile.open(p) for p in shard_paths(spec, key)]
    first = files[0]
    for f in files[1:]:
        if (f.mask is None, f.window) != (first.mask is None, first.window):
            raise DataError(f"shard {f.path!r} ({_kind(f)}) does not match {first.path!r} ({_kind(first)}) in "
                            f"{key}={spec!r}: re-create the source with one `hai prepare` run")
        if (f.vocab_size, f.tokenizer, f.eos_id) != (first.vocab_size, first.tokenizer, first.eos_id):
            raise DataError(f"shard {f.path!r} (vocab {f.vocab_size}, tokenizer {f.tokenizer!r}, eos {f.eos_id}) does "
                            f"not match {first.path!r} (vocab {first.vocab_size}, tokenizer {first.tokenizer!r}, eos "
                            f"{first.eos_id}) in {key}={spec!r}: re-create the source with one tokenizer")
    return files


def _kind(f: TokenFile) -> str:
    return f"chat windows of {f.window} tokens" if f.mask is not None else "a plain token stream"


def open_dataset(cfg: DataConfig, seq_len: int, seed: int = 0, path: str | None = None) -> Dataset:
    """The training and held-out windows ``cfg`` names (``path``: the resolved single source, e.g. the default
    corpus, used when the config has no mixture)."""
    specs = [mixture_item(m) for m in cfg.mixture] if cfg.mixture else [(1.0, path or cfg.path)]
    opened = [(w, spec, _open_source(spec, "data.mixture" if cfg.mixture else "data.path")) for w, spec in specs]
    val_files = _open_source(cfg.val_path, "data.val_path") if cfg.val_path else None
    ref = opened[0][2][0]
    for _, spec, files in opened[1:] + ([(0, cfg.val_path, val_files)] if val_files else []):
        f = files[0]
        if (f.mask is None) != (ref.mask is None):
            raise DataError(f"{spec!r} holds {_kind(f)} but {specs[0][1]!r} {_kind(ref)}: chat data (a loss mask) "
                            f"and plain text cannot be mixed in one run; prepare both with data.format=chat or neither")
        if (f.vocab_size, f.tokenizer, f.eos_id) != (ref.vocab_size, ref.tokenizer, ref.eos_id):
            raise DataError(f"{spec!r} was tokenized with {f.tokenizer!r} (vocab {f.vocab_size}) but {specs[0][1]!r} "
                            f"with {ref.tokenizer!r} (vocab {ref.vocab_size}): every source needs the same tokenizer")
    train_sets, val_sets = [], []
    for _, spec, files in opened:
        whole = WindowSet(files, seq_len, name=spec)
        n_val = 0 if val_files is not None or cfg.val_fraction == 0 else \
            max(1, int(round(whole.n_windows * cfg.val_fraction)))
        if n_val and whole.n_windows - n_val < 1:
            raise DataError(f"{spec!r} has {whole.n_windows} window(s) of {seq_len + 1} tokens: too few to hold out "
                            f"data.val_fraction={cfg.val_fraction}; use more data or data.val_fraction=0")
        train_sets.append(WindowSet(files, seq_len, 0, whole.n_windows - n_val, name=spec))
        if n_val:
            val_sets.append(WindowSet(files, seq_len, whole.n_windows - n_val, whole.n_windows, name=f"{spec} (val)"))
    weights = [w for w, _, _ in opened]
    if val_files is not None:
        val = Mixture([WindowSet(val_files, seq_len, name=cfg.val_path)], seed=_key64("val", seed))
    else:
        val = Mixture(val_sets, weights, seed=_key64("val", seed)) if val_sets else None
    return Dataset(Mixture(train_sets, weights, seed=seed), val, ref.vocab_size, ref.tokenizer, ref.eos_id,
                   [(w, [f.path for f in files]) for w, _, files in opened], ref.mask is not None)


# ----------------------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------------------

class Sampler:
    """Deterministic global batches of windows of seq_len+1 tokens; rank r takes its contiguous slice.

    ``data``: a :class:`Mixture`, or a :class:`TokenFile` (all of its windows, one source)."""

    def __init__(self, data: Mixture | TokenFile, seq_len: int, global_batch: int, seed: int):
        if isinstance(data, TokenFile):
            data = Mixture([WindowSet([data], seq_len)], seed=seed)
        self.data, self.seq_len, self.global_batch, self.seed = data, seq_len, global_batch, seed
        self.n_windows = data.n_windows

    def _draws(self, step: int, start: int, count: int) -> np.ndarray:
        return step * self.global_batch + np.arange(start, start + count, dtype=np.int64)

    def window_ids(self, step: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window) of sequences start..start+count-1 of step's global batch."""
        return self.data.locate(self._draws(step, start, count))

    def sequences(self, step: int, start: int, count: int) -> torch.Tensor:
        """Sequences start..start+count-1 of step's global batch, as int64 (count, seq_len+1)."""
        return torch.from_numpy(self.data.rows(self._draws(step, start, count)).astype(np.int64))

    def micro_batches(self, step: int, dp_rank: int, dp: int, micro_batch: int) -> list[torch.Tensor]:
        """This rank's share of step's global batch, split into micro-batches."""
        per_rank = self.global_batch // dp
        base = dp_rank * per_rank
        return [self.sequences(step, base + i, micro_batch) for i in range(0, per_rank, micro_batch)]
