"""`hai prepare`: tokenize text, jsonl and parquet corpora into token files, many files at once.

Inputs (``data.source``): a file, a directory (every file below it) or a glob. By extension: ``.jsonl``/``.json``
(one JSON record per line, the document in ``data.text_field``; ``.gz`` accepted), ``.parquet`` (the column
``data.text_field``, read with pyarrow batch by batch), anything else is one UTF-8 text document. Each file (a
large jsonl: each 64 MB byte range of whole lines; a large parquet: each run of row groups) is tokenized by a worker
process (``data.workers``; HF ``tokenizer.json`` or bytes), every document followed by the tokenizer's EOS. The
parent writes the documents in input order:

- ``data.path`` ending in ``.haitok``: one token file;
- otherwise a directory of shards ``shard-00000.haitok`` ... of at most ``data.shard_mb`` MB each (cut at document
  boundaries unless a single document is larger), plus ``index.json`` (files, documents, tokens, shards).

A file (or a range of a split file) that cannot be read or parsed fails the run by name (``data.on_error=fail``) or
is skipped and listed in the report (``skip``), never silently. The progress bar counts input bytes (MB/s).
"""

from __future__ import annotations

import glob
import gzip
import json
import multiprocessing as mp
import os
import hashlib
import sys
import sysconfig
import time

import numpy as np

from hai.config import DataConfig
from hai.data.tokenizer import load_tokenizer
from hai.data.tokens import DataError, write_token_file

__all__ = ["prepare_corpus", "prepare", "source_files", "default_token_file", "ensure_token_file", "split_jobs",
           "jsonl_lines", "file_kind", "init_worker", "worker_tool"]


def source_files(source: str | None) -> list[str]:
    if source is None:  # the Python standard library's own sources: real text present on every machine
        root = sysconfig.get_paths()["stdlib"]
        return sorted(glob.glob(os.path.join(root, "*.py")))
    source = os.path.expanduser(source)
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        files = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True) if os.path.isfile(p))
    else:
        files = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"data.source={source!r} is not a file, a non-empty directory or a glob matching files")
    return files


def file_kind(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


CHUNK_BYTES = 64 << 20  # an uncompressed jsonl / a parquet file larger than this is split across workers


def split_jobs(files: list[str], field: str) -> list[tuple]:
    """(path, field, part) per worker job, in input order: a large uncompressed jsonl in byte ranges (each a whole
    number of lines: a line belongs to the range it starts in), a large parquet in runs of row groups."""
    jobs = []
    for path in files:
        size, kind = os.path.getsize(path), file_kind(path)
        if size <= CHUNK_BYTES or path.endswith(".gz") or kind == "text":
            jobs.append((path, field, None))
        elif kind == "jsonl":
            jobs += [(path, field, ("bytes", a, min(size, a + CHUNK_BYTES))) for a in range(0, size, CHUNK_BYTES)]
        else:
            try:
                import pyarrow.parquet as pq

                meta = pq.ParquetFile(path).metadata
            except Exception:  # noqa: BLE001 - unreadable: the worker reports it by name
                jobs.append((path, field, None))
                continue
            start, acc, total = 0, 0, sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                if acc >= CHUNK_BYTES or g == meta.num_row_groups - 1:  # last: the share of the file's bytes
                    jobs.append((path, field, ("rows", start, g + 1, round(size * acc / max(total, 1)))))
                    start, acc = g + 1, 0
    return jobs


def jsonl_lines(path: str, part):
    """(where, line) of a jsonl file, or of the lines starting in byte range ``part``."""
    if part is None:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                yield f"line {n}", line
        return
    _, start, end = part
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous range
        while f.tell() < end:
            pos, raw = f.tell(), f.readline()
            if not raw:
                break
            yield f"the line at byte {pos}", raw.decode("utf-8")


def _documents(path: str, field: str, part=None):
    kind = file_kind(path)
    opener = gzip.open if path.endswith(".gz") else open
    if kind == "text":
        with opener(path, "rb") as f:
            yield f.read().decode("utf-8")
    elif kind == "jsonl":
        for where, line in jsonl_lines(path, part):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise ValueError(f"{where} has no string field {field!r} (set data.text_field)")
            yield rec[field]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("parquet input needs pyarrow: pip install 'hai[parquet]'") from None
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise ValueError(f"has no column {field!r} (columns: {pf.schema_arrow.names}; set data.text_field)")
        groups = None if part is None else list(range(part[1], part[2]))
        for batch in pf.iter_batches(columns=[field], row_groups=groups):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


_WORKER = None  # what a worker process loaded once: the tokenizer (text) or the chat template (chat data)


def init_worker(load, spec: str) -> None:
    """Worker-pool initializer (and the one-process path): ``load(spec)`` once per process, for
    :func:`worker_tool`."""
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = load(spec)


def worker_tool():
    return _WORKER


def _tokenize(args: tuple):
    """(path, field, part) -> (name, bytes read, token arrays or None, documents, error or None)."""
    path, field, part = args
    tok = worker_tool()
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if part is not None:  # a byte range of a jsonl (its size), or row groups of a parquet (their share)
        size = part[2] - part[1] if part[0] == "bytes" else part[3]
        name = f"{path} [{'bytes' if part[0] == 'bytes' else 'row groups'} {part[1]}-{part[2]}]"
    else:
        name = path
    try:
        parts, batch = [], []

        def flush():
            for ids in tok.encode_batch(batch):
                ids.append(tok.eos_id)
                parts.append(np.asarray(ids, dtype=np.uint32))
            batch.clear()

        for text in _documents(path, field, part):
            batch.append(text)
            if len(batch) == 256:  # the Rust tokenizer's batch call: far less Python per document
                flush()
        flush()
        return name, size, parts, len(parts), None
    except Exception as e:  # noqa: BLE001 - OSError, UnicodeDecodeError, ValueError, and pyarrow's own types
        return name, size, None, 0, f"{type(e).__name__}: {e}"


class _ShardWriter:
    def __init__(self, out: str, vocab: int, name: str, eos: int, shard_bytes: int):
        self.single = out.endswith(".haitok")
        self.out, self.vocab, self.name, self.eos = out, vocab, name, eos
        self.itemsize = 2 if vocab <= 65536 else 4
        self.cap = max(1, shard_bytes // self.itemsize)  # tokens per shard
        self.buf: list[np.ndarray] = []
        self.n_buf = self.docs_buf = 0
        self.shards: list[dict] = []
        if not self.single:
            if os.path.isdir(out) and glob.glob(os.path.join(out, "*.haitok")):
                raise DataError(f"data.path={out!r} already holds shards: write to a new directory (or remove it)")
            os.makedirs(out, exist_ok=True)

    def add(self, docs: list[np.ndarray]) -> None:
        for d in docs:
            if not self.single and self.n_buf and self.n_buf + len(d) > self.cap:
                self.flush()
            self.buf.append(d)
            self.n_buf += len(d)
            self.docs_buf += 1

    def flush(self) -> None:
        if not self.n_buf:
            return
        tokens = np.concatenate(self.buf)
        path = self.out if self.single else os.path.join(self.out, f"shard-{len(self.shards):05d}.haitok")
        write_token_file(path, tokens, self.vocab, self.name, self.eos, self.docs_buf)
        self.shards.append({"path": path, "tokens": int(len(tokens)), "docs": self.docs_buf})
        self.buf, self.n_buf, self.docs_buf = [], 0, 0


def prepare_corpus(cfg: DataConfig, out_path: str | None = None, progress: bool = False) -> dict:
    """Tokenize ``cfg.source`` (default: Python's stdlib sources, up to ``cfg.max_bytes``) into ``out_path`` (or
    ``cfg.path``). Returns the report: path, shards, files, skipped (name -> error), documents, tokens, MB/s."""
    if cfg.format == "chat":
        raise DataError("data.format=chat is prepared by hai.data.chat_prepare.prepare_chat (`hai prepare "
                        "data.format=chat`), which needs train.seq_len")
    tok = load_tokenizer(cfg.tokenizer)
    out = out_path or cfg.path or default_token_file(cfg)
    files = source_files(cfg.source)
    capped = cfg.source is None
    jobs = split_jobs(files, cfg.text_field)
    workers = min(len(jobs), cfg.workers or os.cpu_count() or 1)
    writer = _ShardWriter(out, tok.vocab_size, tok.name, tok.eos_id, cfg.shard_mb * 2**20)
    skipped: dict[str, str] = {}
    t0, read, used, done = time.perf_counter(), 0, 0, set()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(os.path.getsize(p) for p in files), unit="B", unit_scale=True, unit_divisor=2**20,
                   desc="hai prepare", file=sys.stderr, dynamic_ncols=True)
    pool = None
    if workers > 1:
        pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            workers, initializer=init_worker, initargs=(load_tokenizer, cfg.tokenizer))
        results = pool.imap(_tokenize, jobs, chunksize=1 if len(jobs) < 64 * workers else 8)  # ordered
    else:
        init_worker(load_tokenizer, cfg.tokenizer)
        results = map(_tokenize, jobs)
    try:
        for path, size, parts, docs, err in results:
            read += size
            if bar is not None:
                bar.update(size)
            if err is not None:
                if capped:  # the default corpus: a stdlib file that is not UTF-8 is skipped (and listed)
                    skipped[path] = err
                    continue
                if cfg.on_error == "fail":
                    raise DataError(f"cannot read {path!r}: {err}. Fix or remove the file, or pass data.on_error=skip "
                                    f"to skip unreadable files (they are listed in the report)")
                skipped[path] = err
                print(f"hai prepare: skipped {path}: {err}", file=sys.stderr)
                continue
            if capped and used + size > cfg.max_bytes:
                break
            used += size
            writer.add(parts)
            done.add(path.split(" [")[0])  # a split file's ranges count once
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    writer.flush()
    if not writer.shards or sum(s["tokens"] for s in writer.shards) < 2:
        raise DataError(f"data.source={cfg.source!r} produced no tokens ({len(skipped)} of {len(files)} file(s) "
                        f"skipped): give it readable text, jsonl or parquet files")
    seconds = time.perf_counter() - t0
    report = {"path": out, "shards": len(writer.shards), "files": len(done), "skipped": skipped,
              "documents": sum(s["docs"] for s in writer.shards), "tokens": sum(s["tokens"] for s in writer.shards),
              "vocab_size": tok.vocab_size, "tokenizer": tok.name, "input_bytes": read, "seconds": seconds,
              "mb_per_s": read / 2**20 / max(seconds, 1e-9), "workers": workers}
    if not writer.single:
        with open(os.path.join(out, "index.json"), "w") as f:
            json.dump({**report, "shard_files": writer.shards}, f, indent=1)
    return report


def prepare(cfg: DataConfig, out_path: str | None = None, progress: bool = False) -> str:
    """Tokenize ``cfg.source`` into a token file or a directory of shards; returns the path."""
    return prepare_corpus(cfg, out_path, progress=progress)["path"]


def default_token_file(cfg: DataConfig) -> str:
    key = hashlib.sha1(f"v2|{cfg.source}|{cfg.tokenizer}|{cfg.max_bytes}|{sysconfig.get_paths()['stdlib']}".encode())
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
