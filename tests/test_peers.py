"""HAI against torch's own implementations of the same thing, as correctness references (the timings live in
``benchmarks/peers.py``): pipeline schedules vs torch.distributed.pipelining on the same modules and micro-batches,
and the pieces the peer comparison changed (W split only where a schedule defers W, the router's weight gradient
through autograd, the gradient norm)."""

import importlib.util
import os

import pytest
import torch

from dist_utils import run_ranks
from hai.config.compose import compose
from hai.data import ensure_token_file

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "peers.py")


def _peers():
    spec = importlib.util.spec_from_file_location("peers", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.multiproc
@pytest.mark.parametrize("schedule", ["1f1b", "zb1p"])
def test_pipeline_gradients_equal_torch_pipelining(schedule):
    """One step of HAI's executor and of torch's Schedule1F1B / ScheduleInterleavedZeroBubble (pp=4, 8 micro-batches,
    8 layers) on the same per-rank modules: the same gradients on every rank. 1F1B is bitwise; under ZB1P HAI's
    deferred head GEMM sums the head's two uses (main loss, MTP) in the other order: an ulp on head.weight only."""
    peers = _peers()
    ensure_token_file(compose(peers.PIPELINE_MODEL).data)
    res = run_ranks(peers.pipeline_rank, peers.PP, schedule, 0, 0)
    for r in res:
        assert r["n_grads"] > 0
        if schedule == "1f1b":
            assert r["bitwise"], r["differ"]
        else:
            assert set(r["differ"]) <= {"head.weight"} and r["max_diff"] < 1e-6, (r["differ"], r["max_diff"])


@pytest.mark.multiproc
def test_weight_grad_store_attached_only_where_the_schedule_defers_w():
    peers = _peers()
    ensure_token_file(compose(peers.PIPELINE_MODEL).data)
    got = {s: run_ranks(_store_rank, 2, s) for s in ("1f1b", "zb1p", "dualpipe")}
    assert got["1f1b"] == [(False, 0), (False, 0)]  # no Python Function per Linear under plain 1F1B
    assert all(defers and n > 0 for defers, n in got["zb1p"] + got["dualpipe"])


def _store_rank(rank, world, schedule):
    from hai.parallel import Topology
    from hai.train.trainer import Trainer, init_distributed
    from hai.data import TokenFile

    cfg = compose(["model=tiny", "train=test", "cluster=cpu1", "parallel=single", "cluster.gpus_per_node=2",
                   "parallel.pp=2", f"parallel.schedule={schedule}", "wandb.mode=disabled"])
    topo = Topology.from_config(cfg)
    tr = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    return tr.pipeline.defers_w, sum(getattr(m, "wgrad_store", None) is not None for m in tr.model.modules())


def test_router_weight_gradient_flows_through_autograd_without_main_grad():
    """Without HAI's optimizer (no main_grad) the router's fp32 GEMM returns its weight gradient to autograd, so
    torch.autograd.grad and graph-based W splits see it; equals x^T dy in float64."""
    from hai.model.moe import Router

    cfg = compose(["model=tiny"]).model
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.1)
    x = torch.randn(6, cfg.hidden_size, requires_grad=True)
    dy = torch.randn(6, cfg.n_routed_experts)
    (gw,) = torch.autograd.grad(router.logits(x), [router.weight], dy)
    torch.testing.assert_close(gw.double(), dy.double().t() @ x.detach().double(), rtol=1e-5, atol=1e-6)
    router.weight.main_grad = torch.zeros_like(router.weight)  # with HAI's optimizer: into main_grad instead
    router.logits(x).backward(dy)
    assert router.weight.grad is None
    torch.testing.assert_close(router.weight.main_grad, gw)


def test_gradient_norm_is_float64_accurate():
    from hai.parallel.zero import _sq_norm

    g = torch.randn(3 * 1024 * 1024 + 77) * 1e-3  # not a multiple of the row length
    ref = torch.linalg.vector_norm(g.double()).square()
    assert _sq_norm(g).dtype == torch.float64
    assert abs(_sq_norm(g).item() / ref.item() - 1) < 1e-8
