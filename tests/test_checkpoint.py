"""Checkpoints: atomic layout, exact resume, resume onto another dp size, and clear failures on bad checkpoints.

Training runs in forked gloo ranks (tests/dist_utils.py) so this process never runs multi-threaded torch ops.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil

import pytest
import torch

from dist_utils import run_ranks
from hai.checkpoint.state import (CheckpointError, SafeReader, latest_checkpoint, list_checkpoints, resolve_resume,
                            verify_checkpoint)
from hai.config.compose import compose

from hai.train.metrics import read_metrics
from hai.parallel import Topology
from hai.train.trainer import Trainer, init_distributed, load_data

pytestmark = pytest.mark.multiproc
STEPS = 6


def overrides(dp: int, out_dir, *extra: str, pp: int = 1) -> list[str]:
    return ["model=tiny", "train=test", "cluster=cpu1", "parallel=single", f"cluster.gpus_per_node={pp * dp}",
            f"parallel.pp={pp}", f"parallel.dp={dp}", "wandb.mode=disabled", f"out_dir={out_dir}",
            f"train.steps={STEPS}", *extra]


def make_trainer(ov: list[str]) -> Trainer:
    cfg = compose(ov)
    topo = Topology.from_config(cfg)
    return Trainer(cfg, topo, init_distributed(topo), load_data(cfg))  # as `hai train` reads it


def fit_rank(rank: int, world: int, ov: list[str]):
    """Train in a gloo rank; rank 0 returns the final parameters, router biases and Adam's step count."""
    trainer = make_trainer(ov)
    trainer.fit()
    if rank:
        return None
    return ({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            [r.bias.clone() for r in trainer.model.routers()], trainer.optimizer.step_count)


def load_error_rank(rank: int, world: int, ov: list[str], path: str):
    """Try to load ``path``; the error (type, message) or None."""
    from hai.checkpoint.state import load_checkpoint

    try:
        tr = make_trainer(ov)
        load_checkpoint(tr.run_state(), path, tr.cfg.model)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return type(e).__name__, isinstance(e, ValueError), str(e)
    return None


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(out_dir))}  # later records (after a restart) win


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    """An uninterrupted dp=2 run of 6 steps, saving every 2 and keeping the last 2 (steps 4 and 6)."""
    out = tmp_path_factory.mktemp("dp2")
    final = run_ranks(fit_rank, 2, overrides(2, out, "train.save_every=2", "train.keep_last=2"))[0]
    return out, losses(out), final


def test_layout_atomic_and_keep_last(dp2):
    out, _, _ = dp2
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000006"]  # no .tmp-*, step 2 pruned
    ck = root / "step_00000004"
    assert {"COMPLETE", "hai.json", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(ck))
    meta = json.loads((ck / "hai.json").read_text())
    assert meta["step"] == 4 and meta["dp"] == 2 and meta["world_size"] == 2 and meta["optimizer_steps"] == 4
    assert meta["model"]["hidden_size"] == 64 and meta["train"]["seq_len"] == 32
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    md = SafeReader(str(ck)).read_metadata().state_dict_metadata
    assert "model.layers.1.ffn.router.bias" in md  # router biases (buffers) are saved
    assert int(md["trainer.step"].size.numel()) == 1
    # ZeRO-1 state: one tensor per parameter (flat; 2-D for the weights TP splits, so tp may change), written as
    # the pieces the dp ranks' shards hold (a 2-D one as rectangles)
    assert tuple(md["optim.embed.weight.master"].size) == (320, 64)
    assert tuple(md["optim.layers.0.attn_norm.weight.master"].size) == (64,)
    masters = {k: v for k, v in md.items() if k.startswith("optim.") and k.endswith(".master")}
    assert {k[len("optim."):-len(".master")] for k in masters} <= {k[len("model."):] for k in md}
    assert any(len(v.chunks) >= 2 for v in masters.values())  # a parameter cut by the shard boundary
    for v in masters.values():
        assert sum(torch.Size(c.sizes).numel() for c in v.chunks) == torch.Size(v.size).numel()
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4, 6]
    assert latest_checkpoint(str(root)) == str(root / "step_00000006")


def test_resume_same_dp_is_exact(dp2, tmp_path):
    out, ref, (params, biases, _) = dp2
    ck = out / "checkpoints" / "step_00000004"
    got = run_ranks(fit_rank, 2, overrides(2, tmp_path, f"resume={ck}"))[0]
    resumed = losses(tmp_path)
    assert sorted(resumed) == [5, 6]
    assert [resumed[s] for s in (5, 6)] == [ref[5], ref[6]]  # bit-exact in fp32 on CPU
    assert all(torch.equal(got[0][n], params[n]) for n in params)
    assert all(torch.equal(a, b) for a, b in zip(got[1], biases))
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"resumed"' in x]
    assert events[0]["step"] == 4 and events[0]["saved_dp"] == 2


@pytest.mark.parametrize("dp", [1, 4])
def test_resume_onto_another_dp_size(dp2, tmp_path, dp):
    """dp=2 checkpoint -> dp=1 / dp=4: DCP reshards the per-parameter ZeRO-1 state; the curve continues. Not bit-exact:
    the gradient sums are taken in another order (micro-batches per rank and the reduce-scatter change)."""
    out, ref, (params, biases, steps) = dp2
    ck = out / "checkpoints" / "step_00000004"
    got = run_ranks(fit_rank, dp, overrides(dp, tmp_path, f"resume={ck}"))[0]
    resumed = losses(tmp_path)
    assert sorted(resumed) == [5, 6]
    for s in (5, 6):
        assert math.isclose(resumed[s], ref[s], rel_tol=1e-5), (s, resumed[s], ref[s])
    assert got[2] == steps
    for n, p in params.items():
        torch.testing.assert_close(got[0][n], p, rtol=1e-4, atol=1e-6)
    for a, b in zip(got[1], biases):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resume_auto_takes_newest_complete(dp2, tmp_path):
    out, _, _ = dp2
    root = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", root)
    shutil.copytree(root / "step_00000004", root / ".tmp-step_00000008")  # an interrupted save
    shutil.copytree(root / "step_00000004", root / "step_00000010")
    os.remove(root / "step_00000010" / "COMPLETE")  # never committed
    assert list_checkpoints(str(root)) == [str(root / "step_00000004"), str(root / "step_00000006")]
    assert resolve_resume("auto", str(tmp_path)) == str(root / "step_00000006")
    assert resolve_resume("none", str(tmp_path)) is None
    assert resolve_resume("auto", str(tmp_path / "fresh")) is None  # nothing yet: start from scratch
    assert resolve_resume(str(tmp_path), "elsewhere") == str(root / "step_00000006")  # a run directory
    with pytest.raises(CheckpointError, match="resume=none"):
        resolve_resume(str(tmp_path / "nope"), str(tmp_path))


def _damaged(dp2, tmp_path, how: str) -> str:
    out, _, _ = dp2
    ck = str(tmp_path / "step_00000006")
    shutil.copytree(out / "checkpoints" / "step_00000006", ck)
    data = os.path.join(ck, "__1_0.distcp")
    if how == "truncated":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif how == "corrupt":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            f.write(b"\xde\xad\xbe\xef" * 16)
    elif how == "incomplete":
        os.remove(os.path.join(ck, "COMPLETE"))
    elif how == "missing":
        os.remove(data)
    return ck


@pytest.mark.parametrize("how, problem", [("truncated", "truncated"), ("corrupt", "CRC-32"),
                                          ("incomplete", "incomplete"), ("missing", "missing")])
def test_damaged_checkpoint_fails_clearly(dp2, tmp_path, how, problem):
    ck = _damaged(dp2, tmp_path, how)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(ck)
    msg = str(err.value)
    assert ck in msg and problem in msg and f"rm -r {ck}" in msg and "resume=none" in msg
    # through the trainer too (what `hai train resume=...` does): a ValueError naming the path
    name, is_value_error, msg = run_ranks(load_error_rank, 1, overrides(1, tmp_path / "run"), ck)[0]
    assert is_value_error and ck in msg and problem in msg


def test_checkpoint_of_another_model_fails_clearly(dp2, tmp_path):
    out, _, _ = dp2
    ck = str(out / "checkpoints" / "step_00000006")
    err = run_ranks(load_error_rank, 1, overrides(1, tmp_path, "model.hidden_size=32"), ck)[0]
    assert err is not None and err[1], err
    assert ck in err[2] and "different model" in err[2] and "model.hidden_size: 64 in the checkpoint, 32 now" in err[2]


class _Evil:
    def __reduce__(self):
        return os.system, ("touch PWNED_BY_CHECKPOINT",)


def test_loading_never_unpickles_arbitrary_objects(dp2, tmp_path, monkeypatch):
    """A .metadata carrying a pickled callable (with a matching size/CRC in hai.json) is refused, not run."""
    out, _, _ = dp2
    ck = tmp_path / "step_00000006"
    shutil.copytree(out / "checkpoints" / "step_00000006", ck)
    (ck / ".metadata").write_bytes(pickle.dumps(_Evil()))
    meta = json.loads((ck / "hai.json").read_text())
    from hai.checkpoint.files import file_info

    meta["files"].update(file_info(str(ck), [".metadata"]))
    (ck / "hai.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    err = run_ranks(load_error_rank, 1, overrides(1, tmp_path / "run"), str(ck))[0]
    assert err is not None and err[1] and "not allowed in checkpoint metadata" in err[2], err
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_pipeline_checkpoint_resumes_and_reshards(tmp_path):
    """pp=2 DualPipe (two copies of every stage, written once): resumes exactly on the same layout and continues
    on pp=1 x dp=2 (keys are the reference model's parameter names, whatever the stage split)."""
    def pp_overrides(pp: int, dp: int, out, *extra):
        return overrides(dp, out, f"parallel.schedule={'dualpipe' if pp > 1 else '1f1b'}", *extra, pp=pp)

    run_ranks(fit_rank, 2, pp_overrides(2, 1, tmp_path / "a", "train.save_every=4"))
    ref = losses(tmp_path / "a")
    ck = tmp_path / "a" / "checkpoints" / "step_00000004"
    run_ranks(fit_rank, 2, pp_overrides(2, 1, tmp_path / "b", f"resume={ck}"))
    got = losses(tmp_path / "b")
    assert [got[s] for s in (5, 6)] == [ref[5], ref[6]]
    run_ranks(fit_rank, 2, pp_overrides(1, 2, tmp_path / "c", f"resume={ck}"))
    got = losses(tmp_path / "c")
    assert all(math.isclose(got[s], ref[s], rel_tol=1e-5) for s in (5, 6)), (got, ref)


def test_checkpoint_moves_between_pipeline_layouts(tmp_path):
    """Saved under pp=2 1F1B with parallel.layout=Et*3|tLm (3 layers on stage 0), resumed under pp=2 DualPipe with
    Et|t*3Lm (the other way round): keys name the reference model's parameters, so any stage split reads any
    other's checkpoint and training continues on the uninterrupted run's losses."""
    run_ranks(fit_rank, 2, overrides(1, tmp_path / "a", "parallel.schedule=1f1b", "parallel.layout=Et*3|tLm",
                                     "train.save_every=4", pp=2))
    ref = losses(tmp_path / "a")
    ck = tmp_path / "a" / "checkpoints" / "step_00000004"
    run_ranks(fit_rank, 2, overrides(1, tmp_path / "b", "parallel.schedule=dualpipe", "parallel.layout=Et|t*3Lm",
                                     f"resume={ck}", pp=2))
    got = losses(tmp_path / "b")
    assert sorted(got) == [5, 6]
    assert all(math.isclose(got[s], ref[s], rel_tol=1e-5) for s in (5, 6)), (got, ref)
