"""Token files, tokenizers and the deterministic, resumable, data-parallel sampler.

Token file format (``.haitok``): the 8-byte magic ``HAITOKS1``, a little-endian uint32 header length, a JSON header
(dtype, num_tokens, vocab_size, tokenizer, eos_id) padded so the payload starts at a multiple of 64 bytes, then the
tokens as little-endian uint16 or uint32. Files are memory-mapped, never loaded whole.

The sampler is a pure function of (seed, step): the global batch of step s is the sequences s*G .. s*G+G-1 of a
seeded per-epoch permutation of fixed windows, and data-parallel rank r takes the r-th contiguous slice of it. So a
run resumes from its step alone, and any dp size sees exactly the same global batch (which is what makes the
parallel layouts reproduce the single-process run).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hai.config import DataConfig

__all__ = ["TokenFile", "write_token_file", "ByteTokenizer", "load_tokenizer", "prepare", "default_token_file",
           "Sampler", "DataError"]

MAGIC = b"HAITOKS1"
_ALIGN = 64


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent with the model."""


@dataclass(frozen=True)
class TokenFile:
    path: str
    tokens: np.ndarray  # memory-mapped, shape (num_tokens,)
    vocab_size: int
    tokenizer: str
    eos_id: int

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenFile":
        path = str(path)
        if not os.path.isfile(path):
            raise DataError(f"data.path={path!r} does not exist: create a token file with `hai prepare "
                            f"data.source=DIR data.path={path}` or leave data.path unset for the default corpus")
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:8] != MAGIC:
                raise DataError(f"{path!r} is not a HAI token file (no {MAGIC!r} magic; starts with {head[:8]!r}): "
                                f"convert text with `hai prepare data.source={path} data.path=OUT.haitok`")
            (hlen,) = struct.unpack("<I", head[8:12])
            try:
                header = json.loads(f.read(hlen).decode("utf-8"))
                dtype = np.dtype(header["dtype"]).newbyteorder("<")
                n = int(header["num_tokens"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path!r} has a corrupt header ({e}): re-create it with `hai prepare`") from None
        offset = _payload_offset(hlen)
        expected = offset + n * dtype.itemsize
        actual = os.path.getsize(path)
        if actual != expected:
            raise DataError(f"{path!r} is truncated or padded: header says {n} tokens ({expected} bytes) but the "
                            f"file has {actual} bytes; re-create it with `hai prepare`")
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n,))
        return cls(path, tokens, int(header["vocab_size"]), str(header.get("tokenizer", "?")),
                   int(header.get("eos_id", -1)))

    def __len__(self) -> int:
        return len(self.tokens)


def _payload_offset(hlen: int) -> int:
    return -(-(12 + hlen) // _ALIGN) * _ALIGN


def write_token_file(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int, tokenizer: str,
                     eos_id: int) -> str:
    """Write atomically (temp file + rename)."""
    dtype = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")
    header = json.dumps({"version": 1, "dtype": dtype.name, "num_tokens": int(len(tokens)), "vocab_size": vocab_size,
                         "tokenizer": tokenizer, "eos_id": eos_id}).encode()
    offset = _payload_offset(len(header))
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        f.write(b"\0" * (offset - 12 - len(header)))
        f.write(np.asarray(tokens, dtype=dtype).tobytes())
    os.replace(tmp, path)
    return path


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, EOS = 256 (vocab 257)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"data.tokenizer={path!r} needs the `tokenizers` package: pip install tokenizers") from None
        self._tok = Tokenizer.from_file(path)
        self.name = path
        self.vocab_size = self._tok.get_vocab_size()
        eos = next((t for t in ("<|end_of_text|>", "</s>", "<｜end▁of▁sentence｜>", "<|endoftext|>")
                    if self._tok.token_to_id(t) is not None), None)
        self.eos_id = self._tok.token_to_id(eos) if eos else self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str):
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise DataError(f"data.tokenizer={spec!r} is neither 'byte' nor an existing tokenizer.json file")
    return _HFTokenizer(spec)


def _source_files(source: str | None) -> list[str]:
    if source is None:  # the Python standard library's own sources: real text present on every machine
        root = sysconfig.get_paths()["stdlib"]
        return sorted(glob.glob(os.path.join(root, "*.py")))
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        files = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True) if os.path.isfile(p))
        if files:
            return files
    raise DataError(f"data.source={source!r} is not a file or a non-empty directory of text files")


def prepare(cfg: DataConfig, out_path: str | None = None) -> str:
    """Tokenize ``cfg.source`` (default: Python's stdlib sources, up to ``cfg.max_bytes``) into a token file."""
    tok = load_tokenizer(cfg.tokenizer)
    out_path = out_path or cfg.path or default_token_file(cfg)
    ids: list[int] = []
    used = 0
    for path in _source_files(cfg.source):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable files are skipped
        if cfg.source is None and used + len(text) > cfg.max_bytes:
            break
        used += len(text)
        ids.extend(tok.encode(text))
        ids.append(tok.eos_id)
    if len(ids) < 2:
        raise DataError(f"data.source={cfg.source!r} produced {len(ids)} tokens: give it readable text files")
    return write_token_file(out_path, np.asarray(ids), tok.vocab_size, tok.name, tok.eos_id)


def default_token_file(cfg: DataConfig) -> str:
    key = hashlib.sha1(f"{cfg.source}|{cfg.tokenizer}|{cfg.max_bytes}|{sysconfig.get_paths()['stdlib']}".encode())
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hai")
    return os.path.join(cache, f"corpus-{key.hexdigest()[:12]}.haitok")


def ensure_token_file(cfg: DataConfig) -> str:
    """The token file to train on: ``data.path`` if set, else the cached default corpus (built on first use)."""
    if cfg.path:
        return cfg.path
    path = default_token_file(cfg)
    if not os.path.isfile(path):
        prepare(cfg, path)
    return path


class Sampler:
    """Deterministic global batches of fixed windows of seq_len+1 tokens; rank r takes its contiguous slice."""

    def __init__(self, data: TokenFile, seq_len: int, global_batch: int, seed: int):
        self.data, self.seq_len, self.global_batch, self.seed = data, seq_len, global_batch, seed
        self.n_windows = (len(data) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"{data.path!r} has {len(data)} tokens, fewer than train.seq_len+1={seq_len + 1}: "
                            f"use more data or a shorter train.seq_len")
        self._perm_epoch, self._perm = -1, None

    def _window(self, g: int) -> int:
        epoch, pos = divmod(g, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def sequences(self, step: int, start: int, count: int) -> torch.Tensor:
        """Sequences start..start+count-1 of step's global batch, as int64 (count, seq_len+1)."""
        rows = []
        for j in range(start, start + count):
            w = self._window(step * self.global_batch + j)
            rows.append(np.asarray(self.data.tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1]))
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def micro_batches(self, step: int, dp_rank: int, dp: int, micro_batch: int) -> list[torch.Tensor]:
        """This rank's share of step's global batch, split into micro-batches."""
        per_rank = self.global_batch // dp
        base = dp_rank * per_rank
        return [self.sequences(step, base + i, micro_batch) for i in range(0, per_rank, micro_batch)]
