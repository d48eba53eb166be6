"""Device discipline, proven on CPU: every tensor a training step creates takes its device from an input or the
topology, never from the process default.

The ranks compute on CPU while ``torch.set_default_device("meta")`` is in force around construction, the training
steps, the metrics, a checkpoint save and a resume. A factory call without an explicit device then makes a meta
tensor, which fails at its first use with a CPU tensor or in a collective — the way a CPU tensor fails on CUDA.
(0-dim CPU/meta scalars mixed into ops are not caught this way; the collectives' inputs are checked separately: a
wrapper asserts every tensor handed to torch.distributed lives on the rank's device.)
"""

import functools

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from hai.config.compose import compose
from hai.data import TokenFile, ensure_token_file
from hai.parallel import Topology
from hai.train.trainer import Trainer, init_distributed

pytestmark = pytest.mark.multiproc

BASE = ["model=tiny", "train=test", "wandb.mode=disabled", "train.progress=false", "train.save_every=1"]
LAYOUTS = {
    # dp=4, ep=4 over 2 simulated nodes, hierarchical node-limited dispatch, FP8 GEMMs, recompute=v3
    "dp4_ep4_hier_M1_fp8": ["cluster=local_cpu", "parallel=local", "model.precision=fp8", "train.recompute=v3"],
    # pp=2 DualPipe (overlapped F&B) x dp=2 x ep=2, FP8 dispatch, bf16
    "pp2_dualpipe_dp2_ep2_fp8_dispatch": [
        "cluster=local_cpu", "parallel=local", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2",
        "parallel.node_limit=0", "parallel.dispatch=flat", "parallel.schedule=dualpipe", "parallel.fp8_dispatch=true",
        "model.precision=bf16", "train.micro_batch_size=1"],
}
_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
                "all_gather_single", "reduce_scatter_single", "batch_isend_irecv")


def _checked(fn, device):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        items = [*args, *kwargs.values()]
        items += [op.tensor for x in items if isinstance(x, list) for op in x if isinstance(op, dist.P2POp)]
        for t in items:
            if isinstance(t, torch.Tensor) and t.device != device:
                raise AssertionError(f"torch.distributed.{fn.__name__} got a tensor on {t.device}, not {device}")
        return fn(*args, **kwargs)
    return wrapper


def _rank(rank, world, overrides):
    device = torch.device("cpu")
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _checked(getattr(dist, name), device))
    cfg = compose([*BASE, *overrides])
    topo = Topology.from_config(cfg)
    mesh = init_distributed(topo)
    data = TokenFile.open(ensure_token_file(cfg.data))
    torch.set_default_device("meta")
    try:
        first = Trainer(cfg, topo, mesh, data).fit()  # 2 steps, metrics, a checkpoint after each
        resumed_cfg = compose([*BASE, *overrides, "resume=auto", "train.steps=3"])
        resumed = Trainer(resumed_cfg, topo, mesh, data)
        out = resumed.fit()  # loads the step-2 checkpoint, runs step 3
    finally:
        torch.set_default_device(None)
    from hai.cli import format_summary

    line = format_summary(resumed_cfg, out).splitlines()[0]
    return first["steps"], out["steps"], out["final_loss"], (first["steps_run"], out["steps_run"]), line


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_step_creates_nothing_on_the_default_device(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # FP8 GEMMs: torch reference (the kernels have their own tests)
    results = run_ranks(_rank, 4, [*LAYOUTS[layout], "train.steps=2", f"out_dir={tmp_path}"],
                        env={"TRITON_INTERPRET": "0"})
    for first, resumed, loss, run, line in results:
        assert (first, resumed) == (2, 3) and loss == loss  # finite
        # the resumed run ran one step (3), and its summary says so rather than counting from step 0
        assert run == (2, 1) and line.startswith("hai train: 1 step (resumed: now at step 3) in "), line


def test_cuda_ranks_bind_their_gpu_when_joining(monkeypatch):
    """On CUDA every rank joins with ``device_id`` = its LOCAL_RANK GPU (NCCL communicators created eagerly and
    bound, not lazily inside the first P2P batch); on CPU no device is named (mocked: no GPU here)."""
    import torch.distributed as dist

    from hai.parallel import Topology
    from hai.train import trainer

    calls = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(set_device=d))
    monkeypatch.setattr(Topology, "build_meshes", lambda self: "meshes")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    topo = Topology(nodes=1, gpus_per_node=8, pp=1, dp=8, ep=8, device="cuda", backend="nccl")
    assert trainer.init_distributed(topo) == "meshes"
    assert calls["device_id"] == torch.device("cuda", 3) and calls["set_device"] == torch.device("cuda", 3)
    assert calls["backend"] == "nccl"
    calls.clear()
    trainer.init_distributed(Topology(nodes=1, gpus_per_node=8, pp=1, dp=8, ep=8))
    assert "device_id" not in calls and "set_device" not in calls
