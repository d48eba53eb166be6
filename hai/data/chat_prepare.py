"""`hai prepare data.format=chat`: chat rows -> whole windows of train.seq_len + 1 tokens with a loss mask.

Inputs (``data.source``; unset: the synthetic corpus of :mod:`hai.data.chat_corpus`, written once to the cache):
jsonl (``.gz`` accepted) and parquet files of rows in the forms :func:`hai.data.chat.conversation` reads. Workers
(``data.workers``) render the rows with the tokenizer's chat template (:mod:`hai.data.chat`); the parent packs the
conversations in input order and writes version-2 token files (:mod:`hai.data.tokens`): the tokens, a flag per token
(``TARGET``: an assistant token or its EOS; ``START``: a conversation starts here) and the window length.

Packing (``data.pack=true``): best fit over the last 64 windows being filled (a conversation goes to the open window
with the least room that holds it; a new window opens when none does; the fullest is closed when 64 are open), so a
conversation that fits a window is never split. The rest of a window is padding (``pad_id``, no target, a document
of its own). ``data.pack=false``: one conversation per window, padded. Training attends within each conversation
and restarts its RoPE positions (``data.document_mask`` / ``data.reset_positions``, set by ``train=sft``).

Bad rows are counted by kind (:data:`hai.data.chat.KINDS`) and named: ``data.on_error=fail`` stops at the first with
its file and line, ``skip`` counts them (the report lists the first few of each kind). A conversation longer than a
window is ``too_long`` unless ``data.truncate=true`` cuts it to the window (counted as ``truncated``).

The report: conversations, windows, tokens, ``packing_efficiency`` (conversation tokens / window tokens) and
``target_fraction`` (target tokens / window tokens: the share of the computed positions the loss learns from).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from hai.config import DataConfig
from hai.data.chat import KINDS, ChatError, conversation, load_chat_template
from hai.data.chat_corpus import CORPUS_VERSION, write_corpus
from hai.data.prepare import file_kind, init_worker, jsonl_lines, source_files, split_jobs, worker_tool
from hai.data.tokens import START, TARGET, DataError, write_token_file

__all__ = ["prepare_chat", "ensure_chat_file", "default_chat_file", "default_chat_source", "Packer"]

OPEN_WINDOWS = 64  # windows being filled at once by the best-fit packer
EXAMPLES = 3  # bad rows named per kind in the report


def _cache(cfg: DataConfig) -> str:
    return cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hai")


def default_chat_source(cfg: DataConfig) -> str:
    """The synthetic corpus (hai.data.chat_corpus) as jsonl in the cache, written on first use."""
    path = os.path.join(_cache(cfg), f"chat-corpus-v{CORPUS_VERSION}.jsonl")
    return path if os.path.isfile(path) else write_corpus(path)


def default_chat_file(cfg: DataConfig, seq_len: int) -> str:
    """Where ``hai prepare data.format=chat`` writes without ``data.path`` (keyed by everything that shapes it)."""
    key = hashlib.sha1(f"chat-v{CORPUS_VERSION}|{cfg.source}|{cfg.tokenizer}|{seq_len}|{cfg.pack}|{cfg.truncate}|"
                       f"{cfg.on_error}".encode()).hexdigest()[:12]
    return os.path.join(_cache(cfg), f"chat-{key}.haitok")


def ensure_chat_file(cfg: DataConfig, seq_len: int) -> str:
    """The chat token file to train on: ``data.path`` if set, else the default one (prepared on first use)."""
    if cfg.path:
        return cfg.path
    path = default_chat_file(cfg, seq_len)
    if not os.path.isfile(path):
        prepare_chat(cfg, seq_len, path)
    return path


# ------------------------------------------------------------------------------------------------ reading rows
def _parquet_rows(path: str, part):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ChatError("unreadable", "parquet input needs pyarrow: pip install 'hai[parquet]'") from None
    pf = pq.ParquetFile(path)
    cols = [c for c in ("messages", "prompt", "completion", "system") if c in pf.schema_arrow.names]
    if not cols:
        raise ChatError("unreadable", f"has no 'messages' or 'prompt'/'completion' column (columns: "
                                      f"{pf.schema_arrow.names})")
    groups = None if part is None else list(range(part[1], part[2]))
    n = 0
    for batch in pf.iter_batches(columns=cols, row_groups=groups):
        for row in batch.to_pylist():
            n += 1
            yield f"row {n}", {k: v for k, v in row.items() if v is not None}


def _rows(path: str, part):
    """(where, record or ChatError) per row of a file (or of a byte range / row groups of it)."""
    kind = file_kind(path)
    if kind == "parquet":
        yield from _parquet_rows(path, part)
        return
    if kind != "jsonl":
        raise ChatError("unreadable", "is neither jsonl (.jsonl/.json/.ndjson, .gz) nor parquet")
    for where, line in jsonl_lines(path, part):
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, ChatError("malformed", f"is not JSON ({e.msg})")


def _render_job(args: tuple):
    """(path, field, part) -> (name, bytes read, [(where, ids, target)], [(kind, where, message)])."""
    path, _, part = args
    size = os.path.getsize(path) if os.path.exists(path) else 0
    name = path
    if part is not None:
        size = part[2] - part[1] if part[0] == "bytes" else part[3]
        name = f"{path} [{'bytes' if part[0] == 'bytes' else 'row groups'} {part[1]}-{part[2]}]"
    convs, errors, rows = [], [], 0
    try:
        for where, rec in _rows(path, part):
            rows += 1
            try:
                if isinstance(rec, ChatError):
                    raise rec
                ids, target = worker_tool().render(conversation(rec))
                convs.append((f"{path} {where}", ids, target))
            except ChatError as e:
                errors.append((e.kind, f"{path} {where}", str(e)))
        if rows == 0 and part is None:
            errors.append(("empty_file", path, "has no rows"))
    except ChatError as e:
        errors.append((e.kind, name, str(e)))
    except Exception as e:  # noqa: BLE001 - OSError, UnicodeDecodeError, pyarrow's own types
        errors.append(("unreadable", name, f"{type(e).__name__}: {e}"))
    return name, size, convs, errors


# ------------------------------------------------------------------------------------------------ packing
class Packer:
    """Conversations -> whole windows of ``window`` tokens: (tokens uint32, flags uint8, conversations) each."""

    def __init__(self, window: int, pack: bool, pad_id: int, open_windows: int = OPEN_WINDOWS):
        self.window, self.pack, self.pad_id, self.limit = window, pack, pad_id, open_windows
        self.bins: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self.free = np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, target: np.ndarray) -> list[tuple]:
        """Place one conversation (at most ``window`` tokens); returns the windows this closed."""
        if not self.pack:
            return [self._close([(ids, target)])]
        fits = np.flatnonzero(self.free >= len(ids))
        if len(fits):
            i = int(fits[np.argmin(self.free[fits])])
            self.bins[i].append((ids, target))
            self.free[i] -= len(ids)
            return []
        self.bins.append([(ids, target)])
        self.free = np.append(self.free, self.window - len(ids))
        if len(self.bins) <= self.limit:
            return []
        i = int(np.argmin(self.free))  # the fullest window leaves the pool
        parts = self.bins.pop(i)
        self.free = np.delete(self.free, i)
        return [self._close(parts)]

    def finish(self) -> list[tuple]:
        out = [self._close(parts) for parts in self.bins]
        self.bins, self.free = [], np.zeros(0, np.int64)
        return out

    def _close(self, parts) -> tuple[np.ndarray, np.ndarray, int]:
        tokens = np.full(self.window, self.pad_id, np.uint32)
        flags = np.zeros(self.window, np.uint8)
        at = 0
        for ids, target in parts:
            tokens[at:at + len(ids)] = ids
            flags[at:at + len(ids)] = np.where(target, TARGET, 0)
            flags[at] |= START
            at += len(ids)
        if at < self.window:
            flags[at] |= START  # the padding is a document of its own
        return tokens, flags, len(parts)


class _WindowWriter:
    """Windows into one file (``*.haitok``) or shards of whole windows of at most ``shard_bytes`` each."""

    def __init__(self, out: str, tok, pad_id: int, window: int, shard_bytes: int):
        self.single = out.endswith(".haitok")
        self.out, self.tok, self.pad_id, self.window = out, tok, pad_id, window
        per_token = (2 if tok.vocab_size <= 65536 else 4) + 1
        self.cap = max(1, shard_bytes // (window * per_token))  # windows per shard
        self.buf: list[tuple[np.ndarray, np.ndarray, int]] = []
        self.shards: list[dict] = []
        if not self.single:
            if os.path.isdir(out) and any(n.endswith(".haitok") for n in os.listdir(out)):
                raise DataError(f"data.path={out!r} already holds shards: write to a new directory (or remove it)")
            os.makedirs(out, exist_ok=True)

    def add(self, windows) -> None:
        for w in windows:
            self.buf.append(w)
            if not self.single and len(self.buf) >= self.cap:
                self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        tokens = np.concatenate([t for t, _, _ in self.buf])
        flags = np.concatenate([f for _, f, _ in self.buf])
        path = self.out if self.single else os.path.join(self.out, f"shard-{len(self.shards):05d}.haitok")
        docs = sum(n for _, _, n in self.buf)  # conversations (the padding's START flags are not documents)
        write_token_file(path, tokens, self.tok.vocab_size, self.tok.name, self.tok.eos_id, docs, flags,
                         self.window, self.pad_id)
        self.shards.append({"path": path, "tokens": int(len(tokens)), "windows": len(self.buf)})
        self.buf = []


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class _Stats:
    on_error: str
    truncate: bool
    window: int
    rows: int = 0
    conversations: int = 0
    conversation_tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    files: set = field(default_factory=set)

    def bad(self, kind: str, where: str, message: str) -> None:
        if self.on_error == "fail":
            fix = " (or data.truncate=true, or a longer train.seq_len)" if kind == "too_long" else ""
            raise DataError(f"{where} {message} [{kind}]: fix the row, or pass data.on_error=skip to skip bad rows "
                            f"(counted by kind in the report){fix}")
        self.errors[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(f"{where} {message}")

    def accept(self, where: str, ids: np.ndarray, target: np.ndarray):
        """The conversation to pack (cut to the window under data.truncate), or None when it is refused."""
        if len(ids) > self.window:
            if not self.truncate:
                self.bad("too_long", where, f"renders to {len(ids)} tokens, more than a window of "
                                            f"train.seq_len+1={self.window}")
                return None
            ids, target = ids[: self.window], target[: self.window]
            self.truncated += 1
        self.conversations += 1
        self.conversation_tokens += len(ids)
        self.target_tokens += int(target.sum())
        return ids, target


def _results(cfg: DataConfig, jobs: list[tuple], workers: int):
    if workers > 1:
        pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            workers, initializer=init_worker, initargs=(load_chat_template, cfg.tokenizer))
        try:
            yield from pool.imap(_render_job, jobs, chunksize=1)  # ordered
        finally:
            pool.terminate()
        return
    init_worker(load_chat_template, cfg.tokenizer)
    yield from map(_render_job, jobs)


def prepare_chat(cfg: DataConfig, seq_len: int, out_path: str | None = None, progress: bool = False) -> dict:
    """Render, pack and write ``cfg.source`` (default: the synthetic corpus) as windows of ``seq_len + 1`` tokens
    into ``out_path`` (or ``cfg.path``). Returns the report (module docstring)."""
    template = load_chat_template(cfg.tokenizer)  # a missing template fails here, once, before any worker starts
    out = out_path or cfg.path or default_chat_file(cfg, seq_len)
    files = source_files(cfg.source or default_chat_source(cfg))
    jobs = split_jobs(files, "")
    workers = min(len(jobs), cfg.workers or os.cpu_count() or 1)
    window = seq_len + 1
    stats = _Stats(cfg.on_error, cfg.truncate, window)
    packer = Packer(window, cfg.pack, template.pad_id)
    writer = _WindowWriter(out, template.tok, template.pad_id, window, cfg.shard_mb * 2**20)
    t0, read, bar = time.perf_counter(), 0, None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(os.path.getsize(p) for p in files), unit="B", unit_scale=True, unit_divisor=2**20,
                   desc="hai prepare (chat)", file=sys.stderr, dynamic_ncols=True)
    try:
        for name, size, convs, errors in _results(cfg, jobs, workers):
            read += size
            if bar is not None:
                bar.update(size)
            for kind, where, message in errors:
                stats.bad(kind, where, message)
            stats.rows += len(convs) + sum(k not in ("empty_file", "unreadable") for k, _, _ in errors)
            stats.files.add(name.split(" [")[0])
            for where, ids, target in convs:
                kept = stats.accept(where, ids, target)
                if kept is not None:
                    writer.add(packer.add(*kept))
    finally:
        if bar is not None:
            bar.close()
    writer.add(packer.finish())
    writer.flush()
    return _report(cfg, out, template, stats, writer, read, time.perf_counter() - t0, workers)


def _report(cfg, out, template, stats: _Stats, writer: _WindowWriter, read: int, seconds: float,
            workers: int) -> dict:
    if stats.conversations == 0:
        raise DataError(f"data.source={cfg.source!r} produced no conversations ({stats.rows} row(s), bad rows by kind: "
                        f"{dict(stats.errors) or 'none'}): give it jsonl or parquet rows with 'messages' or "
                        f"'prompt'/'completion'")
    windows = sum(s["windows"] for s in writer.shards)
    window_tokens = windows * stats.window
    report = {"path": out, "format": "chat", "template": template.name, "shards": len(writer.shards),
              "files": len(stats.files), "rows": stats.rows, "conversations": stats.conversations,
              "bad_rows": {k: stats.errors[k] for k in KINDS if stats.errors[k]}, "bad_examples": stats.examples,
              "truncated": stats.truncated, "windows": windows, "window": stats.window, "pack": cfg.pack,
              "tokens": window_tokens, "conversation_tokens": stats.conversation_tokens,
              "target_tokens": stats.target_tokens,
              "packing_efficiency": stats.conversation_tokens / window_tokens,
              "target_fraction": stats.target_tokens / window_tokens,
              "vocab_size": template.tok.vocab_size, "tokenizer": template.tok.name, "input_bytes": read,
              "seconds": seconds, "mb_per_s": read / 2**20 / max(seconds, 1e-9), "workers": workers,
              "documents": stats.conversations, "skipped": {}}
    if not writer.single:
        with open(os.path.join(out, "index.json"), "w") as f:
            json.dump({**report, "shard_files": writer.shards}, f, indent=1)
    return report
