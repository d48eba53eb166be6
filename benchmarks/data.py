"""Data at scale: the sampler's memory and speed at up to 10^9 windows (new vs old), reading, and `hai prepare` MB/s.

    python benchmarks/data.py [--old-max 1e9] [--prepare-mb 64]

1. Index memory and speed per number of windows (no data needed: a source of n windows that holds no tokens).
   - new: ``hai.data.Sampler`` (a keyed Feistel bijection per epoch, O(1) state): traced peak bytes of building it
     and drawing 200 global batches of 64 at a random step, and draws/s;
   - old: the previous sampler's per-epoch ``rng.permutation(n_windows)`` (int64; rebuilt every epoch, on every
     rank): its peak bytes and seconds to build, measured up to ``--old-max`` windows.
2. Reading: sequences/s of seq_len 4096 windows from a memory-mapped shard directory (a single source and a 0.3/0.7
   mixture of two), the sampler's index work included.
3. `hai prepare` on a synthetic jsonl corpus (8 files): MB/s of input with 1 and 2 worker processes, with the byte
   tokenizer and with a BPE ``tokenizer.json`` (trained here on the corpus by the `tokenizers` package, 8k vocab).

Prints one markdown table per part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hai.config import DataConfig  # noqa: E402
from hai.data import Mixture, Sampler, WindowSet, TokenFile, write_token_file  # noqa: E402
from hai.data.prepare import prepare_corpus  # noqa: E402


class Virtual:
    def __init__(self, n):
        self.n_windows, self.name = n, f"virtual-{n}"

    def window(self, w):
        return np.array([w])


def new_sampler(n: int, G: int = 64, batches: int = 200) -> dict:
    Sampler(Mixture([Virtual(7)], seed=0), 4096, G, seed=0).window_ids(0, 0, G)  # numpy's first-call allocations
    tracemalloc.start()
    s = Sampler(Mixture([Virtual(n)], seed=1), 4096, G, seed=1)
    step0 = (n // G) // 3  # somewhere inside the first epoch
    t0 = time.perf_counter()
    for st in range(step0, step0 + batches):
        s.window_ids(st, 0, G)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"peak_bytes": peak, "draws_per_s": batches * G / dt}


def old_sampler(n: int) -> dict:
    tracemalloc.start()
    t0 = time.perf_counter()
    perm = np.random.default_rng([1, 0]).permutation(n)
    dt = time.perf_counter() - t0
    _ = int(perm[n // 3])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del perm
    return {"peak_bytes": peak, "build_s": dt}


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:,.1f} {unit}" if unit != "B" else f"{b:,.0f} B"
        b /= 1024
    return ""


def part_index(old_max: float) -> None:
    print("\n### Sampler index: memory and speed vs number of windows\n")
    print("| windows | new: peak bytes | new: draws/s | old: peak bytes | old: build per epoch (s) |")
    print("|---:|---:|---:|---:|---:|")
    for n in (10**6, 10**7, 10**8, 10**9):
        new = new_sampler(n)
        if n <= old_max:
            old = old_sampler(n)
            old_b, old_s = fmt_bytes(old["peak_bytes"]), f"{old['build_s']:.2f}"
        else:
            old_b, old_s = f"{fmt_bytes(8 * n)} (8 B/window, not run)", "-"
        print(f"| {n:.0e} | {fmt_bytes(new['peak_bytes'])} | {new['draws_per_s']:,.0f} | {old_b} | {old_s} |",
              flush=True)


def part_read(tmp: str) -> None:
    print("\n### Reading windows of 4096 tokens from memory-mapped shards\n")
    rng = np.random.default_rng(0)
    dirs = []
    for name, shards in (("a", 4), ("b", 2)):
        d = os.path.join(tmp, name)
        os.makedirs(d)
        for i in range(shards):
            write_token_file(os.path.join(d, f"shard-{i:05d}.haitok"), rng.integers(0, 50_000, 12_500_000), 129_280,
                             "synthetic", 1)
        dirs.append(d)
    import glob

    files = {d: [TokenFile.open(p) for p in sorted(glob.glob(os.path.join(d, "*.haitok")))] for d in dirs}
    cases = {"one source (4 shards, 50M tokens)": Mixture([WindowSet(files[dirs[0]], 4096)], seed=0),
             "mixture 0.3/0.7 (6 shards, 75M tokens)": Mixture([WindowSet(files[d], 4096) for d in dirs], [0.3, 0.7],
                                                               seed=0)}
    print("| data | windows | sequences/s | MB/s |")
    print("|---|---:|---:|---:|")
    for name, mix in cases.items():
        s = Sampler(mix, 4096, 64, seed=0)
        for st in range(1, 21):  # warm: the same windows again, now in the page cache
            s.sequences(st, 0, 64)
        t0, n = time.perf_counter(), 0
        for st in range(1, 21):
            n += len(s.sequences(st, 0, 64))
        dt = time.perf_counter() - t0
        print(f"| {name} | {mix.n_windows:,} | {n / dt:,.0f} | {n * 4097 * 4 / dt / 2**20:,.0f} |", flush=True)


def part_prepare(tmp: str, total_mb: int) -> None:
    print(f"\n### `hai prepare`: {total_mb} MB of jsonl in 8 files\n")
    src = os.path.join(tmp, "corpus")
    os.makedirs(src)
    words = open(__file__).read().split()
    rng = np.random.default_rng(0)
    per_file = total_mb * 2**20 // 8
    for i in range(8):
        with open(os.path.join(src, f"part-{i}.jsonl"), "w") as f:
            size = 0
            while size < per_file:
                doc = " ".join(rng.choice(words, 300))
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                size += len(line)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    sample = [json.loads(line)["text"] for line in open(os.path.join(src, "part-0.jsonl")).readlines()[:2000]]
    bpe.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "</s>"]))
    tok_path = os.path.join(tmp, "tokenizer.json")
    bpe.save(tok_path)
    print("| tokenizer | workers | MB/s | tokens | documents | shards | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for tok_name, spec in (("byte", "byte"), ("BPE 8k (tokenizer.json)", tok_path)):
        for workers in (1, 2):
            out = os.path.join(tmp, f"out-{abs(hash(spec))}-{workers}")
            rep = prepare_corpus(DataConfig(source=src, path=out, tokenizer=spec, workers=workers, shard_mb=16))
            print(f"| {tok_name} | {workers} | {rep['mb_per_s']:.1f} | {rep['tokens']:,} | {rep['documents']:,} | "
                  f"{rep['shards']} | {rep['seconds']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-max", type=float, default=1e8, help="largest window count to run the old sampler at "
                    "(1e9 needs ~8 GB)")
    ap.add_argument("--prepare-mb", type=int, default=64)
    ap.add_argument("--skip", nargs="*", default=[], choices=["index", "read", "prepare"])
    args = ap.parse_args()
    print(f"# benchmarks/data.py on {os.cpu_count()} CPU core(s)")
    with tempfile.TemporaryDirectory() as tmp:
        if "index" not in args.skip:
            part_index(args.old_max)
        if "read" not in args.skip:
            part_read(tmp)
        if "prepare" not in args.skip:
            part_prepare(tmp, args.prepare_mb)


if __name__ == "__main__":
    main()
