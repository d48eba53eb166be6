"""Token files, the tokenizers and the deterministic data-parallel sampler."""

import numpy as np
import pytest

from hai.cli import main
from hai.config import DataConfig
from hai.data import ByteTokenizer, DataError, Sampler, TokenFile, prepare, write_token_file


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
