"""Tokenizers: UTF-8 bytes (``data.tokenizer=byte``) or a Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import os

from hai.data.tokens import DataError

__all__ = ["ByteTokenizer", "load_tokenizer", "check_tokenizer_spec"]



class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, EOS = 256 (vocab 257)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def check_tokenizer_spec(spec: str) -> None:
    """``data.tokenizer`` is ``byte`` or an existing tokenizer.json file (else a DataError naming it)."""
    if spec != "byte" and not os.path.isfile(spec):
        raise DataError(f"data.tokenizer={spec!r} is neither 'byte' nor an existing tokenizer.json file")


def load_tokenizer(spec: str):
    check_tokenizer_spec(spec)
    return ByteTokenizer() if spec == "byte" else _HFTokenizer(spec)
