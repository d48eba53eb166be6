"""wandb: an offline run is read back from its .wandb file and holds the per-step metrics, the config and the summary;
the API key in the environment is written nowhere under the run directory.

The .wandb file is wandb's record log: a 7-byte header (":W&B", magic 0xBEE1, version), then leveldb-log framing
(32 KiB blocks; each fragment has a 7-byte header: CRC-32C, length, type FULL/FIRST/MIDDLE/LAST; a block tail shorter
than a header is zero padding) around serialized ``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
STEP_KEYS = {"loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device",
             "mfu", "step_time_s", "forward_backward_s", "optimizer_s", "expert_load_max_violation",
             "router_bias_spread", "memory_bytes", "skipped"}
SECRET = "hai-test-not-a-real-key-0123456789abcdef"


def read_wandb_records(path: Path) -> list:
    """Every Record in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic, version)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += left
            continue
        fragment = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            records.append(fragment)
        elif kind == FIRST:
            pending = fragment
        elif kind == MIDDLE:
            pending += fragment
        elif kind == LAST:
            records.append(pending + fragment)
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("wandb")
    out = tmp / "run"
    env = dict(os.environ, WANDB_API_KEY=SECRET, OMP_NUM_THREADS="1", WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp / "wandb-cache"), WANDB_DATA_DIR=str(tmp / "wandb-data"))
    cmd = [sys.executable, "-m", "hai.cli", "train", "model=tiny", "train=test", "cluster=cpu1", "parallel=single",
           "train.steps=3", "wandb.mode=offline", "wandb.project=hai-test", "wandb.tags=[ci,tiny]",
           f"out_dir={out}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(out.rglob("*"))
    return out, read_wandb_records(files[0]), res


def test_per_step_metrics_are_logged(offline_run):
    out, records, _ = offline_run
    history = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3]
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for h, row in zip(history, jsonl):
        assert STEP_KEYS <= set(h), STEP_KEYS - set(h)
        assert h["loss"] == row["loss"] and math.isfinite(h["loss"]) and h["lr"] == row["lr"]
        assert h["tokens_per_s"] > 0 and h["tokens_per_s_per_device"] > 0 and h["mfu"] > 0
        assert h["memory_bytes"] > 0


def test_config_and_summary(offline_run):
    _, records, _ = offline_run
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "hai-test" and list(run.tags) == ["ci", "tiny"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    # wandb wraps each top-level config value as {"value": ...}
    value = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}
    assert value["model"]["name"] == "tiny" and value["model"]["hidden_size"] == 64
    assert value["train"]["steps"] == 3 and value["cluster"]["name"] and value["parallel"]["dp"] == 1
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"]) and math.isfinite(summary["first_loss"])
    assert summary["wall_time_s"] > 0
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finish() ran


def test_api_key_is_written_nowhere(offline_run):
    out, _, res = offline_run
    needle = SECRET.encode()
    leaked = [str(p) for p in out.parent.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert leaked == []
    assert SECRET not in res.stdout and SECRET not in res.stderr


def test_resumed_training_continues_the_same_wandb_run(tmp_path):
    """The run id travels in the checkpoint: resuming from it logs into the same wandb run, whatever out_dir; a fresh
    run gets a new id."""
    pytest.importorskip("wandb")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_CONFIG_DIR=str(tmp_path / "cfg"),
               WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_DATA_DIR=str(tmp_path / "data"))
    base = [sys.executable, "-m", "hai.cli", "train", "model=tiny", "train=test", "cluster=cpu1", "parallel=single",
            "wandb.mode=offline", "train.save_every=2", "train.progress=false"]

    def run_ids(out, *extra):
        res = subprocess.run([*base, f"out_dir={out}", *extra], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return sorted({r.run.run_id for f in out.glob("wandb/offline-run-*/run-*.wandb")
                       for r in read_wandb_records(f) if r.WhichOneof("record_type") == "run"})

    a, b = tmp_path / "a", tmp_path / "b"
    (first,) = run_ids(a, "train.steps=2")
    (other,) = run_ids(b, "train.steps=1", "train.save_every=0")  # a fresh run: a new id
    assert other != first
    ckpt = a / "checkpoints" / "step_00000002"
    assert run_ids(b, "train.steps=3", f"resume={ckpt}") == sorted([first, other])  # continued run a, not b's
    assert run_ids(a, "train.steps=3", "resume=auto") == [first]
