"""Token files, the tokenizers and the deterministic data-parallel sampler."""

import json
import os

import numpy as np
import pytest

from hai.cli import main
from hai.config import DataConfig
from hai.data import ByteTokenizer, DataError, Sampler, TokenFile, write_token_file
from hai.data.prepare import prepare


def test_prepare_roundtrip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello wörld")
    (src / "b.txt").write_text("second file")
    path = prepare(DataConfig(source=str(src)), str(tmp_path / "t.haitok"))
    tf = TokenFile.open(path)
    tok = ByteTokenizer()
    expect = tok.encode("hello wörld") + [tok.eos_id] + tok.encode("second file") + [tok.eos_id]
    assert list(tf.tokens) == expect and tf.vocab_size == 257


def test_prepare_cli(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("abc" * 100)
    out = tmp_path / "x.haitok"
    assert main(["prepare", f"data.source={tmp_path / 'x.txt'}", f"data.path={out}"]) == 0
    assert len(TokenFile.open(out)) == 301


def test_not_a_token_file(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("just some text")
    with pytest.raises(DataError, match="is not a HAI token file.*hai prepare"):
        TokenFile.open(bad)


def test_truncated_token_file(tmp_path):
    path = write_token_file(tmp_path / "t.haitok", np.arange(100), 257, "byte", 256)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        TokenFile.open(path)


def test_missing_file_names_fix(tmp_path):
    with pytest.raises(DataError, match="hai prepare"):
        TokenFile.open(tmp_path / "nope.haitok")


def test_sampler_shards_global_batch_independently_of_dp(tmp_path):
    path = write_token_file(tmp_path / "t.haitok", np.arange(10_000), 100_000, "test", 0)  # token = position
    s = Sampler(TokenFile.open(path), seq_len=16, global_batch=8, seed=3)
    for step in (0, 5, 700):  # 700 crosses an epoch boundary (624 windows)
        full = np.concatenate([mb.numpy() for mb in s.micro_batches(step, 0, 1, 2)])
        for dp in (2, 4):
            parts = [mb.numpy() for r in range(dp) for mb in s.micro_batches(step, r, dp, 2)]
            assert np.array_equal(np.concatenate(parts), full)
        # windows are contiguous slices of the file: target = input shifted by one
        assert full.shape == (8, 17) and np.all(full[:, 1:] - full[:, :-1] == 1)
    # resumable: a fresh sampler gives the same batch for the same step
    s2 = Sampler(TokenFile.open(path), 16, 8, 3)
    assert np.array_equal(s2.sequences(5, 0, 8).numpy(), s.sequences(5, 0, 8).numpy())
    # an epoch visits every window once
    starts = {int(s.sequences(st, 0, 8)[j, 0]) for st in range(78) for j in range(8)}
    assert len(starts) == 624


# ---------------------------------------------------------------------------------------------------------- bijection
from hai.config.compose import compose  # noqa: E402
from hai.data import MIX_ROUND, Mixture, Permutation, open_dataset  # noqa: E402
from hai.data.prepare import prepare_corpus  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097, 123_457])
def test_permutation_is_a_bijection(n):
    p = Permutation(n, 5, "x")
    out = p(np.arange(n))
    assert np.array_equal(np.sort(out), np.arange(n))
    assert np.array_equal(Permutation(n, 5, "x")(np.arange(n)), out)  # a function of the key alone
    if n > 64:  # another key is another permutation, and a shuffle (not near the identity)
        assert not np.array_equal(Permutation(n, 6, "x")(np.arange(n)), out)
        assert np.mean(out == np.arange(n)) < 0.05


class _Virtual:
    """A source of n windows that holds no tokens: the sampler's index arithmetic at any scale."""

    def __init__(self, n, name="v"):
        self.n_windows, self.name = n, name

    def window(self, w):
        return np.array([w])


def test_sampler_memory_is_independent_of_the_window_count():
    import tracemalloc

    peaks = {}
    for n in (10**3, 10**9):
        tracemalloc.start()
        s = Sampler(Mixture([_Virtual(n)], seed=1), seq_len=4096, global_batch=64, seed=1)
        for step in (0, 1, 10**6):
            src, win = s.window_ids(step, 0, 64)
            assert np.all((0 <= win) & (win < n))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[10**9] < 64 * 1024 and abs(peaks[10**9] - peaks[10**3]) < 16 * 1024, peaks
    # at 10^9 windows the old sampler held a permutation of all of them: 8 GB of int64


def test_epochs_visit_every_window_once_and_differ():
    n, G = 1000, 8
    s = Sampler(Mixture([_Virtual(n)], seed=3), 16, G, seed=3)
    per_epoch = [np.concatenate([s.window_ids(st, 0, G)[1] for st in range(e * n // G, (e + 1) * n // G)])
                 for e in range(2)]
    for ids in per_epoch:
        assert np.array_equal(np.sort(ids), np.arange(n))
    assert not np.array_equal(per_epoch[0], per_epoch[1])


def test_resume_after_dp_change_continues_the_exact_window_sequence():
    """Run A: 10 steps at dp=2. Run B: 5 steps at dp=2, then a fresh sampler (a restarted job) at dp=4 from step 5:
    every step's global batch, and so the sequence of windows, is the same."""
    mix = lambda: Mixture([_Virtual(50_000, "a"), _Virtual(7_000, "b")], [0.6, 0.4], seed=11)  # noqa: E731
    G, mb = 16, 2

    def windows(sampler, steps, dp):
        out = []
        for step in steps:
            for r in range(dp):
                per = G // dp
                for i in range(0, per, mb):
                    out.append(np.stack(sampler.window_ids(step, r * per + i, mb), axis=1))
        return np.concatenate(out)

    a = windows(Sampler(mix(), 16, G, 11), range(10), 2)
    b = np.concatenate([windows(Sampler(mix(), 16, G, 11), range(5), 2),
                        windows(Sampler(mix(), 16, G, 11), range(5, 10), 4)])
    assert np.array_equal(a, b)


@pytest.mark.parametrize("weights", [(0.3, 0.7), (0.5, 0.3, 0.2)])
def test_mixture_proportions(weights):
    n_src = len(weights)
    mix = Mixture([_Virtual(10**6 + i, str(i)) for i in range(n_src)], list(weights), seed=2)
    s = Sampler(mix, 16, 64, seed=2)
    # every whole round has the exact quotas
    src, _ = mix.locate(np.arange(MIX_ROUND))
    assert np.array_equal(np.bincount(src, minlength=n_src), mix.quota)
    assert np.allclose(mix.quota / MIX_ROUND, weights, atol=1 / MIX_ROUND)
    # any window of steps is within sampling error (binomial, 4 sigma) of the weights
    for first in (0, 37, 1000):
        src = np.concatenate([s.window_ids(st, 0, 64)[0] for st in range(first, first + 50)])
        frac = np.bincount(src, minlength=n_src) / len(src)
        sigma = np.sqrt(np.array(weights) * (1 - np.array(weights)) / len(src))
        assert np.all(np.abs(frac - weights) < 4 * sigma + 1 / MIX_ROUND), (frac, weights)


def test_mixture_each_source_draws_its_windows_without_repeats():
    mix = Mixture([_Virtual(300, "a"), _Virtual(50, "b")], [0.5, 0.5], seed=4)
    src, win = mix.locate(np.arange(2 * MIX_ROUND))
    a = win[src == 0][:300]
    assert np.array_equal(np.sort(a), np.arange(300))  # source a's first epoch: each window once
    b = win[src == 1]
    for e in range(len(b) // 50):  # source b cycles through its epochs, each a permutation
        assert np.array_equal(np.sort(b[e * 50:(e + 1) * 50]), np.arange(50))


# ------------------------------------------------------------------------------------------------------ shards, splits
def _shards(tmp_path, sizes, vocab=100_000):
    d = tmp_path / "shards"
    d.mkdir()
    base = 0
    for i, n in enumerate(sizes):
        write_token_file(d / f"shard-{i:05d}.haitok", np.arange(base, base + n), vocab, "test", 0)  # token = position
        base += n
    return d


def test_shard_directory_windows_stay_inside_shards(tmp_path):
    d = _shards(tmp_path, [1000, 37, 2500])
    cfg = compose([f"data.path={d}", "data.val_fraction=0"]).data
    ds = open_dataset(cfg, seq_len=16, seed=0)
    ws = ds.train.sources[0]
    assert ws.n_windows == 999 // 16 + 36 // 16 + 2499 // 16 and len(ds.sources[0][1]) == 3
    rows = np.stack([ws.window(w) for w in range(ws.n_windows)])
    assert np.all(np.diff(rows, axis=1) == 1)  # contiguous: no window crosses a shard boundary
    starts = set(rows[:, 0].tolist())
    assert 1000 in starts and 1037 in starts and 992 not in starts  # shard 1 starts at 1000, shard 2 at 1037


def test_validation_split_is_held_out(tmp_path):
    d = _shards(tmp_path, [8001, 4001])
    cfg = compose([f"data.mixture=[0.5:{d}/shard-00000.haitok,0.5:{d}/shard-00001.haitok]",
                   "data.val_fraction=0.1"]).data
    ds = open_dataset(cfg, seq_len=8, seed=0)
    train = Sampler(ds.train, 8, 16, 0)
    val = Sampler(ds.val, 8, 16, 0)
    seen_train = {int(x) for st in range(200) for x in train.sequences(st, 0, 16)[:, 0]}
    seen_val = {int(x) for st in range(20) for x in val.sequences(st, 0, 16)[:, 0]}
    assert seen_train and seen_val and not seen_train & seen_val
    # the held-out windows are the last 10% of each source
    assert min(v for v in seen_val if v < 8001) >= 900 * 8 and min(v for v in seen_val if v >= 8001) >= 8001 + 450 * 8


def test_inconsistent_shards_are_refused(tmp_path):
    d = _shards(tmp_path, [100, 100])
    write_token_file(d / "shard-00002.haitok", np.arange(100), 257, "byte", 256)
    with pytest.raises(DataError, match="shard-00002.haitok.*does not match"):
        open_dataset(compose([f"data.path={d}"]).data, 8)


# -------------------------------------------------------------------------------------------------------------- prepare
def _corpus(tmp_path):
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "corpus"
    src.mkdir()
    docs = {"a.txt": ["plain text file, ünïcode ✓"]}
    docs["b.jsonl"] = [f"json doc {i} " + "x" * i for i in range(40)]
    (src / "a.txt").write_text(docs["a.txt"][0])
    (src / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                         for i, t in enumerate(docs["b.jsonl"])))
    docs["c.jsonl.gz"] = ["gzipped ☃ doc", "second"]
    with gzip.open(src / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in docs["c.jsonl.gz"]))
    docs["d.parquet"] = [f"parquet row {i}" for i in range(300)]
    pq.write_table(pa.table({"text": docs["d.parquet"], "n": list(range(300))}), src / "d.parquet", row_group_size=64)
    return src, [d for name in sorted(docs) for d in docs[name]]


def _decode_docs(paths):
    tok = ByteTokenizer()
    ids = np.concatenate([np.asarray(TokenFile.open(p).tokens) for p in paths])
    cuts = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[a + 1 if i else 0: b]) for i, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_text_jsonl_parquet_round_trip(tmp_path, workers):
    src, expect = _corpus(tmp_path)
    out = tmp_path / f"shards{workers}"
    rep = prepare_corpus(DataConfig(source=str(src), path=str(out), workers=workers, shard_mb=1))
    assert rep["files"] == 4 and rep["documents"] == len(expect) and not rep["skipped"]
    shards = sorted(str(p) for p in out.glob("*.haitok"))
    assert _decode_docs(shards) == expect
    assert sum(TokenFile.open(p).num_docs for p in shards) == len(expect)
    assert json.loads((out / "index.json").read_text())["tokens"] == rep["tokens"]


def test_prepare_bounds_shard_size_at_document_boundaries(tmp_path):
    src = tmp_path / "docs.jsonl"
    docs = [("doc %d " % i) * 500 for i in range(60)]  # ~3.4 KB each
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    cfg = DataConfig(source=str(src), path=str(out), text_field="body", workers=1, shard_mb=1)
    cfg.shard_mb = 1
    import hai.data.prepare as hp
    rep = prepare_corpus(cfg)
    assert rep["shards"] == 1  # 200 KB fits in 1 MB
    # a smaller bound (bytes, through the writer) cuts at document boundaries
    w = hp._ShardWriter(str(tmp_path / "small"), 257, "byte", 256, shard_bytes=20_000)
    tok = ByteTokenizer()
    w.add([np.asarray(tok.encode(d) + [256], np.uint32) for d in docs])
    w.flush()
    files = sorted((tmp_path / "small").glob("*.haitok"))
    assert len(files) > 5 and all(f.stat().st_size <= 20_000 + 4096 for f in files)
    assert _decode_docs([str(f) for f in files]) == docs


def test_prepare_corrupt_input_fails_or_skips_by_name(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (src / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    (src / "worse.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2 is not JSON.*data.on_error=skip"):
        prepare_corpus(DataConfig(source=str(src), path=str(tmp_path / "o1.haitok"), workers=1))
    rep = prepare_corpus(DataConfig(source=str(src), path=str(tmp_path / "o2.haitok"), workers=2, on_error="skip"))
    assert set(map(os.path.basename, rep["skipped"])) == {"bad.jsonl", "worse.parquet"} and rep["files"] == 1
    assert _decode_docs([rep["path"]]) == ["fine"]


def test_prepare_cli_reports(tmp_path, capsys):
    src, expect = _corpus(tmp_path)
    assert main(["prepare", f"data.source={src}", f"data.path={tmp_path / 'out'}", "output=json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["documents"] == len(expect) and rep["mb_per_s"] > 0 and rep["vocab_size"] == 257


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_splits_large_files_without_changing_the_documents(tmp_path, monkeypatch, workers):
    """A jsonl larger than CHUNK_BYTES is tokenized in byte ranges of whole lines, a parquet in runs of row groups,
    by several workers: the shards hold exactly the documents, in order, of the unsplit run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import hai.data.prepare as hp

    src = tmp_path / "big"
    src.mkdir()
    docs = [f"document {i}: " + "é" * (i % 37) + "x" * (i % 101) for i in range(400)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:250]))
    pq.write_table(pa.table({"text": docs[250:]}), src / "b.parquet", row_group_size=16)
    whole = prepare_corpus(DataConfig(source=str(src), path=str(tmp_path / "whole.haitok"), workers=1))
    monkeypatch.setattr(hp, "CHUNK_BYTES", 997)  # odd: ranges start mid-line and mid-UTF-8 character
    jobs = hp.split_jobs(hp.source_files(str(src)), "text")
    assert sum(1 for j in jobs if j[2] and j[2][0] == "bytes") > 10 and sum(1 for j in jobs if j[2] and
                                                                            j[2][0] == "rows") > 1
    split = prepare_corpus(DataConfig(source=str(src), path=str(tmp_path / "split"), workers=workers, shard_mb=1))
    assert split["files"] == 2 and split["documents"] == whole["documents"] == 400
    assert _decode_docs(sorted(str(p) for p in (tmp_path / "split").glob("*.haitok"))) == docs
    assert split["input_bytes"] == pytest.approx(whole["input_bytes"], abs=8)
