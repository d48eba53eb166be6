"""Data: token files (``tokens``), tokenizers (``tokenizer``), windows, mixtures and the sampler (``sampler``),
and ``hai prepare`` (``prepare``: ``prepare_corpus``, ``ensure_token_file``), which tokenizes corpora into
token files."""

from hai.data.prepare import default_token_file, ensure_token_file, prepare_corpus
from hai.data.sampler import MIX_ROUND, Dataset, Mixture, Permutation, Sampler, WindowSet, open_dataset
from hai.data.tokenizer import ByteTokenizer, load_tokenizer
from hai.data.tokens import MAGIC, DataError, TokenFile, shard_paths, write_token_file

__all__ = ["TokenFile", "write_token_file", "shard_paths", "DataError", "MAGIC", "ByteTokenizer", "load_tokenizer",
           "prepare_corpus", "default_token_file", "ensure_token_file", "WindowSet", "Mixture", "Dataset",
           "open_dataset", "Sampler", "Permutation", "MIX_ROUND"]
