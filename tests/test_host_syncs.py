"""Host-sync budget of a training step (tests/host_syncs.py counts every op that makes the host wait for a device
value: item, tolist, cpu, nonzero, bincount, bool(), ...).

Budget per step and rank: one sync per MoE dispatch hop (the exchange of split sizes: 1 for the local and the flat
expert-parallel dispatch, 2 for the hierarchical one, whose second hop's sizes depend on what the first delivered),
for every MoE layer every micro-batch passes through on this rank (MTP's block included), plus 2 per step: the
global gradient norm (clipping and the non-finite skip are decided on the host) and the step's metrics (losses and
balance statistics in one transfer). Before this budget the same steps took 43-81 syncs.

The counter also counts copies of pageable host memory onto a device (``pageable_h2d``; on CUDA each waits for the
stream), so the budget holds them too. A CPU step has none to count; the FP8 launchers are checked on meta tensors
(tests/test_fp8_kernels.py).
"""

import pytest
import torch

from dist_utils import run_ranks
from hai.config.compose import compose
from hai.data import TokenFile, ensure_token_file
from hai.model.moe import MoE
from hai.parallel import Topology
from host_syncs import count_host_syncs
from hai.pipeline.schedules import Kind
from hai.train.trainer import Trainer, init_distributed

BASE = ["model=tiny", "train=test", "wandb.mode=disabled", "train.progress=false"]
LAYOUTS = {
    "single": (1, ["parallel=single", "cluster=cpu1"], 1),
    "dp4_ep4_flat": (4, ["parallel=local", "cluster=local_cpu", "parallel.dispatch=flat"], 1),
    "dp4_ep4_hierarchical_M1": (4, ["parallel=local", "cluster=local_cpu"], 2),
    "pp2_dualpipe_dp2_ep2": (4, ["cluster=local_cpu", "parallel=local", "parallel.pp=2", "parallel.dp=2",
                                 "parallel.ep=2", "parallel.node_limit=0", "parallel.dispatch=flat",
                                 "parallel.schedule=dualpipe", "train.micro_batch_size=1"], 1),
}


def _dispatches(tr) -> int:
    """MoE dispatches one step makes on this rank: per forward of a stage chunk, its MoE layers (+ MTP's)."""
    if tr.pipeline is None:
        return len(tr.model.moe_layers()) * tr.n_micro
    ex, total = tr.pipeline, 0
    for a in ex.actions:
        for part in a.parts if a.is_compute else ():
            if part.kind is Kind.F:
                layers = [tr.model.layers[i] for i in ex.layers[part.stage]]
                total += sum(isinstance(b.ffn, MoE) for b in layers)
                if part.stage == ex.n_stages - 1:
                    total += sum(isinstance(m.block.ffn, MoE) for m in tr.model.mtp)
    return total


def _rank(rank, world, overrides):
    cfg = compose([*BASE, *overrides])
    topo = Topology.from_config(cfg)
    tr = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    tr.train_step()
    with count_host_syncs() as syncs:
        tr.train_step()
    return dict(syncs.counts), _dispatches(tr)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_step_keeps_to_the_host_sync_budget(layout, tmp_path):
    world, overrides, per_dispatch = LAYOUTS[layout]
    for counts, dispatches in run_ranks(_rank, world, [*overrides, f"out_dir={tmp_path}"]):
        assert dispatches > 0
        assert sum(counts.values()) == per_dispatch * dispatches + 2, counts
        assert counts.get("item", 0) == 1, counts  # the gradient norm; everything else is one batched tolist


def test_counter_sees_pageable_host_to_device_copies(monkeypatch):
    """Copies of unpinned host memory onto a device stall the host like a sync (CUDA waits for the stream to stage
    them); meta stands in for the device on CPU. Pinned sources and host-only copies are not counted."""
    host = torch.ones(4)
    with count_host_syncs() as syncs:
        torch.tensor([1, 2], device="meta")
        host.to("meta")
        host.to(device=torch.device("meta"), non_blocking=True)  # non_blocking does not help pageable memory
        torch.empty(4, device="meta").copy_(host)
        torch.empty(1, device="meta").new_tensor([1.0])
        torch.tensor([1, 2]), host.to(torch.float64), host.to("cpu"), torch.empty(4).copy_(host)  # host only
    assert syncs.counts == {"pageable_h2d": 5} and syncs.total == 5
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    with count_host_syncs() as syncs:
        host.to("meta", non_blocking=True)
    assert syncs.total == 0
