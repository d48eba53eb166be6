"""Wire formats as planned: under the bf16 recipe the expert-parallel dispatch, combine and their gradients, and the
pipeline's activations and gradients travel in the bytes `hai plan` prices (hai.plan.cost).

Per MoE layer, the dispatcher's per-link byte counters over one training step divided by the rows it sent to other
ranks give the bytes per row of each phase: dispatch 2D (bf16) or Dp + 4 Dp/128 (FP8 1x128 tiles + fp32 scales,
D padded to 128), combine 2D, and 2D for each gradient. The routing metadata (rows of ids, fp32 gates, count tables)
is not in the plan's price and is not checked here. Every pipeline send is one micro-batch's T x D bf16 tensor.
"""

import pytest

from dist_utils import run_ranks
from hai.config.compose import compose
from hai.data import TokenFile, ensure_token_file
from hai.parallel import Topology
from hai.plan.cost import chunk_comm, p2p_bytes_per_chunk
from hai.train.trainer import Trainer, init_distributed

pytestmark = pytest.mark.multiproc

BASE = ["model=tiny", "train=test", "wandb.mode=disabled", "train.progress=false", "model.precision=bf16"]


def _rank(rank, world, overrides):
    cfg = compose([*BASE, *overrides])
    topo = Topology.from_config(cfg)
    tr = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    tr.train_step()
    per_row = []
    for moe in tr.model.moe_layers():
        d = moe.dispatcher
        per_row.append({phase: (d.traffic[f"{phase}_intra"] + d.traffic[f"{phase}_inter"], d.links.rows[phase])
                        for phase in ("dispatch", "combine", "dispatch_bwd", "combine_bwd")})
    return per_row, tr.pipeline.p2p_sent if tr.pipeline is not None else []


@pytest.mark.parametrize("fp8_dispatch", [False, True])
def test_expert_parallel_wire_bytes_per_row_are_the_plans(fp8_dispatch, tmp_path):
    ov = ["cluster=local_cpu", "parallel=local", f"parallel.fp8_dispatch={fp8_dispatch}", f"out_dir={tmp_path}"]
    cfg = compose([*BASE, *ov])
    D = cfg.model.hidden_size
    price = chunk_comm(cfg, 1)["per_token_per_layer"]
    want = {"dispatch": price["dispatch_row_bytes"], "combine": price["combine_row_bytes"], "dispatch_bwd": 2 * D,
            "combine_bwd": 2 * D}
    assert want["dispatch"] == (128 + 4 if fp8_dispatch else 2 * D)  # D=64 pads to one 1x128 tile
    for layers, _ in run_ranks(_rank, 4, ov, env={"TRITON_INTERPRET": "0"}):
        for phases in layers:
            for phase, (nbytes, rows) in phases.items():
                assert rows > 0 and nbytes == want[phase] * rows, (phase, nbytes, rows)


def test_pipeline_wire_bytes_are_the_plans(tmp_path):
    ov = ["cluster=local_cpu", "parallel=local", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2",
          "parallel.node_limit=0", "parallel.dispatch=flat", "parallel.schedule=dualpipe", "train.micro_batch_size=1",
          f"out_dir={tmp_path}"]
    cfg = compose([*BASE, *ov])
    for _, sent in run_ranks(_rank, 4, ov):
        assert sent and set(sent) == {p2p_bytes_per_chunk(cfg)}  # bf16 activations and gradients
