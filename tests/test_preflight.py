"""Everything the parent can check is checked before torchrun starts: printed once, exit 2, no rank started."""

import os
import subprocess
import sys

import numpy as np
import pytest

import hai.launch.torchrun as torchrun
from hai.cli import main
from hai.data import write_token_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_ranks(monkeypatch):
    def started(*a, **k):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(torchrun, "run_local", started)


def _refused(capsys, args, message):
    rc = main(["train", *args])  # the default layout: 4 ranks, so a pass would start torchrun
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count(message) == 1 and err.startswith("hai train: error:"), err
    return err


def _token_file(tmp_path, vocab=257, n=5000):
    return write_token_file(tmp_path / "t.haitok", np.arange(n) % min(vocab, 200), vocab, "byte", 256)


def test_data_path_not_a_token_file(no_ranks, capsys, tmp_path):
    _refused(capsys, [f"data.path={os.path.join(ROOT, 'README.md')}", f"out_dir={tmp_path}"],
             "is not a HAI token file")


def test_data_path_missing(no_ranks, capsys, tmp_path):
    _refused(capsys, [f"data.path={tmp_path / 'nope.haitok'}", f"out_dir={tmp_path}"], "does not exist")


def test_data_directory_without_shards(no_ranks, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(capsys, [f"data.path={tmp_path / 'empty'}", f"out_dir={tmp_path}"], "without *.haitok shards")


def test_mixture_source_missing(no_ranks, capsys, tmp_path):
    good = _token_file(tmp_path)
    _refused(capsys, [f"data.mixture=[0.5:{good},0.5:{tmp_path / 'gone'}]", f"out_dir={tmp_path}"],
             "does not exist")


def test_seq_len_beyond_max_seq_len(no_ranks, capsys, tmp_path):
    _refused(capsys, ["train.seq_len=8192", "model.max_seq_len=4096", f"out_dir={tmp_path}"],
             "train.seq_len=8192 exceeds model.max_seq_len=4096")


def test_vocabulary_larger_than_model(no_ranks, capsys, tmp_path):
    path = _token_file(tmp_path, vocab=1000)
    _refused(capsys, [f"data.path={path}", "model.vocab_size=512", f"out_dir={tmp_path}"],
             "uses a vocabulary of 1000")


def test_too_little_data_for_the_split(no_ranks, capsys, tmp_path):
    path = _token_file(tmp_path, n=100)
    _refused(capsys, [f"data.path={path}", "train.seq_len=64", f"out_dir={tmp_path}"], "too few to hold out")


def test_resume_path_missing(no_ranks, capsys, tmp_path):
    _refused(capsys, [f"resume={tmp_path / 'nothing'}", f"out_dir={tmp_path}"], "is not a checkpoint directory")


def test_resume_checkpoint_of_another_model(no_ranks, capsys, tmp_path):
    out = tmp_path / "run"
    common = ["cluster=cpu1", "parallel=single", "train=test", "train.steps=1", "train.save_every=1",
              "wandb.mode=disabled", "output=json"]
    assert main(["train", *common, f"out_dir={out}"]) == 0  # single process: no torchrun here either
    capsys.readouterr()
    _refused(capsys, [f"resume={out}", "model.num_layers=3", f"out_dir={tmp_path / 'b'}"],
             "model.num_layers: 4 in the checkpoint, 3 now")


def test_hf_directory_missing(no_ranks, capsys, tmp_path):
    _refused(capsys, [f"model.init_from=hf:{tmp_path / 'no_model'}", f"out_dir={tmp_path}"],
             "is not a Hugging Face checkpoint directory")


def test_hf_directory_without_weights(no_ranks, capsys, tmp_path):
    from hf_models import v3  # a real release's config.json, its weights removed

    d = str(tmp_path / "hf")
    v3().config.save_pretrained(d)
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(d, f))
    _refused(capsys, [f"model.init_from=hf:{d}", f"out_dir={tmp_path / 'o'}"], "has config.json but no *.safetensors shards")


def test_refused_in_the_parent_end_to_end(tmp_path):
    """The real command: one message, exit 2, and neither torchrun nor a rank ever ran."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "hai.cli", "train", f"data.path={os.path.join(ROOT, 'README.md')}",
                          f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("is not a HAI token file") == 1, out.stderr
    assert "torch.distributed" not in out.stderr and "rank" not in out.stderr.lower(), out.stderr
    assert not (tmp_path / "run").exists()


def test_fp8_on_a_gpu_without_fp8_is_refused_before_launch(capsys, no_ranks, monkeypatch):
    """An A100 (capability 8.0; mocked): model.precision=fp8 is refused in the parent, naming the GPU, its
    capability and the fix."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    err = _refused(capsys, ["model.precision=fp8", "cluster.device=cuda"], "model.precision=fp8 needs a GPU")
    assert "NVIDIA A100-SXM4-80GB" in err and "capability 8.0" in err and "set model.precision=bf16" in err
