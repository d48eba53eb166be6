"""Token files and shard directories (the ``.haitok`` format), read memory-mapped.

Token file format (``.haitok``): the 8-byte magic ``HAITOKS1``, a little-endian uint32 header length, a JSON header
(dtype, num_tokens, vocab_size, tokenizer, eos_id, num_docs) padded so the payload starts at a multiple of 64 bytes,
then the tokens as little-endian uint16 or uint32; documents end with ``eos_id``. A source is one token file, a
directory of them (shards, read in name order) or a glob; every shard is memory-mapped, never loaded whole.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["TokenFile", "write_token_file", "shard_paths", "DataError", "MAGIC"]

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
    num_docs: int = -1  # -1: not recorded (files written before the field existed)

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
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n,)) if n else np.zeros(0, dtype)
        return cls(path, tokens, int(header["vocab_size"]), str(header.get("tokenizer", "?")),
                   int(header.get("eos_id", -1)), int(header.get("num_docs", -1)))

    def __len__(self) -> int:
        return len(self.tokens)


def _payload_offset(hlen: int) -> int:
    return -(-(12 + hlen) // _ALIGN) * _ALIGN


def write_token_file(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int, tokenizer: str,
                     eos_id: int, num_docs: int | None = None) -> str:
    """Write atomically (temp file + rename). ``num_docs`` defaults to the number of EOS tokens."""
    dtype = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")
    tokens = np.asarray(tokens)
    if num_docs is None:
        num_docs = int(np.count_nonzero(tokens == eos_id))
    header = json.dumps({"version": 1, "dtype": dtype.name, "num_tokens": int(len(tokens)), "vocab_size": vocab_size,
                         "tokenizer": tokenizer, "eos_id": eos_id, "num_docs": int(num_docs)}).encode()
    offset = _payload_offset(len(header))
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        f.write(b"\0" * (offset - 12 - len(header)))
        f.write(tokens.astype(dtype).tobytes())
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


