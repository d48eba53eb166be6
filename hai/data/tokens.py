"""Token files and shard directories (the ``.haitok`` format), read memory-mapped.

Token file format (``.haitok``): the 8-byte magic ``HAITOKS1``, a little-endian uint32 header length, a JSON header
(version, dtype, num_tokens, vocab_size, tokenizer, eos_id, num_docs) padded so the payload starts at a multiple of
64 bytes, then the tokens as little-endian uint16 or uint32; documents end with ``eos_id``. A source is one token
file, a directory of them (shards, read in name order) or a glob; every shard is memory-mapped, never loaded whole.

Version 2 (chat data, ``hai prepare data.format=chat``) adds to the header ``"mask": "u1"``: after the tokens,
padded to the next multiple of 64 bytes, one uint8 per token of flags, bit 0 ``TARGET`` (the token is a loss
target: an assistant token or the EOS ending its turn) and bit 1 ``START`` (a conversation starts here); and
``"window": W``: the file is whole windows of W = train.seq_len + 1 tokens (conversations packed, or one per window
padded with ``pad_id``), read back to back. Version-1 files (no mask) read as before: every token a target. Files
without a mask are still written as version 1.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["TokenFile", "write_token_file", "shard_paths", "DataError", "MAGIC", "VERSION", "TARGET", "START"]

MAGIC = b"HAITOKS1"
VERSION = 2  # the newest format this code reads and writes
TARGET, START = 1, 2  # bits of the version-2 mask array
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
    num_docs: int = -1  # -1: not recorded (files written before the field existed)
    mask: np.ndarray | None = None  # version 2: memory-mapped uint8 flags (TARGET, START) per token
    window: int = 0  # version 2: the file is whole windows of this many tokens (0: a plain token stream)
    pad_id: int = -1  # version 2: the token padding a window (-1: none)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenFile":
        path = str(path)
        if not os.path.isfile(path):
            raise DataError(f"data.path={path!r} does not exist: create a token file with `hai prepare "
                            f"data.source=DIR data.path={path}` or leave data.path unset for the default corpus")
        header, hlen = _read_header(path)
        try:
            dtype = np.dtype(header["dtype"]).newbyteorder("<")
            n = int(header["num_tokens"])
            version = int(header.get("version", 1))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path!r} has a corrupt header ({e}): re-create it with `hai prepare`") from None
        if version > VERSION:
            raise DataError(f"{path!r} is a version-{version} token file; this HAI reads versions 1..{VERSION}: "
                            f"update HAI or re-create the file with this one's `hai prepare`")
        offset = _payload_offset(hlen)
        has_mask = header.get("mask") is not None
        if has_mask and header["mask"] != "u1":
            raise DataError(f"{path!r} has an unknown mask type {header['mask']!r} (expected 'u1'): re-create it")
        mask_offset = _align(offset + n * dtype.itemsize)
        expected = mask_offset + n if has_mask and n else offset + n * dtype.itemsize
        actual = os.path.getsize(path)
        if actual != expected:
            raise DataError(f"{path!r} is truncated or padded: header says {n} tokens{' and flags' if has_mask else ''}"
                            f" ({expected} bytes) but the file has {actual} bytes; re-create it with `hai prepare`")
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n,)) if n else np.zeros(0, dtype)
        mask = None
        if has_mask:
            mask = np.memmap(path, dtype=np.uint8, mode="r", offset=mask_offset, shape=(n,)) if n else \
                np.zeros(0, np.uint8)
        window = int(header.get("window") or 0)
        if window and n % window:
            raise DataError(f"{path!r} holds {n} tokens, not whole windows of {window}: re-create it with "
                            f"`hai prepare`")
        return cls(path, tokens, int(header["vocab_size"]), str(header.get("tokenizer", "?")),
                   int(header.get("eos_id", -1)), int(header.get("num_docs", -1)), mask, window,
                   int(header.get("pad_id", -1)))

    def __len__(self) -> int:
        return len(self.tokens)


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise DataError(f"{path!r} is not a HAI token file (no {MAGIC!r} magic; starts with {head[:8]!r}): "
                            f"convert text with `hai prepare data.source={path} data.path=OUT.haitok`")
        (hlen,) = struct.unpack("<I", head[8:12])
        try:
            header = json.loads(f.read(hlen).decode("utf-8"))
        except ValueError as e:
            raise DataError(f"{path!r} has a corrupt header ({e}): re-create it with `hai prepare`") from None
    if not isinstance(header, dict):
        raise DataError(f"{path!r} has a corrupt header (not a JSON object): re-create it with `hai prepare`")
    return header, hlen


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _payload_offset(hlen: int) -> int:
    return _align(12 + hlen)


def write_token_file(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int, tokenizer: str,
                     eos_id: int, num_docs: int | None = None, mask: np.ndarray | None = None,
                     window: int = 0, pad_id: int = -1) -> str:
    """Write atomically (temp file + rename). ``num_docs`` defaults to the number of EOS tokens (with ``mask``: the
    number of ``START`` flags). ``mask`` (uint8 flags per token) and ``window`` make a version-2 file."""
    dtype = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")
    tokens = np.asarray(tokens)
    if mask is not None:
        mask = np.asarray(mask, dtype=np.uint8)
        if mask.shape != tokens.shape:
            raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
    if window and len(tokens) % window:
        raise ValueError(f"{len(tokens)} tokens are not whole windows of {window}")
    if num_docs is None:
        num_docs = int(np.count_nonzero(mask & START)) if mask is not None else int(np.count_nonzero(tokens == eos_id))
    fields = {"version": 1, "dtype": dtype.name, "num_tokens": int(len(tokens)), "vocab_size": vocab_size,
              "tokenizer": tokenizer, "eos_id": eos_id, "num_docs": int(num_docs)}
    if mask is not None:
        fields.update(version=2, mask="u1", window=int(window), pad_id=int(pad_id))
    header = json.dumps(fields).encode()
    offset = _payload_offset(len(header))
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        f.write(b"\0" * (offset - 12 - len(header)))
        f.write(tokens.astype(dtype).tobytes())
        if mask is not None and len(tokens):
            end = offset + len(tokens) * dtype.itemsize
            f.write(b"\0" * (_align(end) - end))
            f.write(mask.tobytes())
    os.replace(tmp, path)
    return path


def shard_paths(spec: str, key: str = "data.path") -> list[str]:
    """The token files a source names: a file, a directory of ``*.haitok`` shards (name order) or a glob."""
    spec = os.path.expanduser(str(spec))
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.haitok")))
        if not paths:
            raise DataError(f"{key}={spec!r} is a directory without *.haitok shards: write shards into it with "
                            f"`hai prepare data.source=TEXT_FILES data.path={spec}`")
        return paths
    if any(c in spec for c in "*?["):
        paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not paths:
            raise DataError(f"{key}={spec!r} matches no files: check the pattern (shards are written by `hai prepare`)")
        return paths
    if not os.path.exists(spec):
        raise DataError(f"{key}={spec!r} does not exist: create a token file with `hai prepare data.source=DIR "
                        f"data.path={spec}` or leave data.path unset for the default corpus")
    return [spec]


