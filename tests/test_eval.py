"""Validation loss: the held-out split evaluated under a parallel layout (pp, ep, dp) equals a single-process
evaluation of the same weights, and evaluating does not change training.

Tolerance (fp32, gloo): at init the layouts differ from the single process only in the order of the all-to-all and
P2P sums, rel 1e-5; after two AdamW steps the weights themselves differ at rtol 1e-4 (tests/test_parallel_train.py),
so the eval losses are compared at rel 1e-4.
"""

import pytest
import torch

from dist_utils import run_ranks
from hai.config.compose import compose
from hai.data import ensure_token_file, open_dataset
from hai.parallel import Topology
from hai.train.trainer import Trainer, init_distributed

BASE = ["model=tiny", "train=test", "cluster=cpu1", "parallel=single", "wandb.mode=disabled", "train.eval_every=1",
        "train.eval_batches=2", "data.val_fraction=0.02"]


def _eval(overrides, steps=2):
    cfg = compose([*BASE, *overrides])
    topo = Topology.from_config(cfg)
    data = open_dataset(cfg.data, cfg.train.seq_len, cfg.train.seed, path=ensure_token_file(cfg.data))
    trainer = Trainer(cfg, topo, init_distributed(topo), data)
    before = trainer.evaluate()
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    return before, trainer.evaluate(), losses


def _rank(rank, world, overrides):
    return _eval(overrides)


@pytest.fixture(scope="module")
def reference():
    return _eval([])


LAYOUTS = {
    "pp2_ep2_dp2_dualpipe": (4, ["cluster.gpus_per_node=4", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2",
                                 "parallel.schedule=dualpipe", "train.micro_batch_size=1"]),
    "pp2_1f1b_uneven": (2, ["cluster.gpus_per_node=2", "parallel.pp=2", "parallel.schedule=1f1b",
                            "parallel.layout=Et*3|tLm"]),
    "ep2": (2, ["cluster.gpus_per_node=2", "parallel.dp=2", "parallel.ep=2"]),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_eval_under_layout_equals_single_process(name, reference):
    world, ov = LAYOUTS[name]
    (ref_before, ref_after, ref_losses) = reference
    for before, after, losses in run_ranks(_rank, world, ov):
        assert before["val_loss"] == pytest.approx(ref_before["val_loss"], rel=1e-5)
        assert before["val_mtp_loss"] == pytest.approx(ref_before["val_mtp_loss"], rel=1e-5)
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert after["val_loss"] == pytest.approx(ref_after["val_loss"], rel=1e-4)
    assert ref_after["val_loss"] < ref_before["val_loss"]  # two steps of training lower the held-out loss


def test_eval_does_not_change_training():
    """Evaluating between steps leaves the router loads, the biases and the losses exactly as without it."""
    cfg = compose(BASE)
    topo = Topology.from_config(cfg)
    data = open_dataset(cfg.data, cfg.train.seq_len, cfg.train.seed, path=ensure_token_file(cfg.data))
    runs = []
    for with_eval in (False, True):
        tr = Trainer(cfg, topo, None, data)
        losses = []
        for _ in range(3):
            if with_eval:
                tr.evaluate()
            losses.append(tr.train_step()["loss"])
        runs.append((losses, [r.bias.clone() for r in tr.model.routers()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    ev = tr.evaluate()
    assert ev["val_ppl"] == pytest.approx(torch.tensor(ev["val_loss"]).exp().item(), rel=1e-6)
