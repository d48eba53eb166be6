"""ZeRO-1 data parallelism reproduces the single-process run; the single-process run equals plain torch AdamW."""

import math

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from hai.config.compose import compose
from hai.data import Sampler, TokenFile, ensure_token_file
from hai.model import build_model
from hai.parallel import Topology
from hai.parallel.zero import ZeroAdamW
from hai.train.trainer import Trainer, init_distributed, lr_at

STEPS = 4


def _cfg(dp: int, tmp: str, extra=()):
    return compose(["model=tiny", "train=test", "cluster=cpu1", "parallel=single", f"train.steps={STEPS}", "wandb.mode=disabled", f"out_dir={tmp}",
                    f"cluster.gpus_per_node={dp}", f"parallel.dp={dp}", *extra])


def _run(cfg):
    topo = Topology.from_config(cfg)
    trainer = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    losses = [trainer.train_step()["loss"] for _ in range(cfg.train.steps)]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    biases = [r.bias.clone() for r in trainer.model.routers()]
    return losses, params, biases, trainer.optimizer.state_bytes()


def _rank_run(rank, world, tmp, extra):
    return _run(_cfg(world, tmp, extra))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(_cfg(1, str(tmp_path_factory.mktemp("ref"))))


def test_single_process_equals_torch_adamw(reference, tmp_path):
    """Independent reference: torch.optim.AdamW + clip_grad_norm_ + the router-bias rule, written out plainly."""
    cfg = _cfg(1, str(tmp_path))
    t = cfg.train
    model = build_model(cfg.model, seed=t.seed)
    n_micro = t.global_batch_size // t.micro_batch_size
    model.set_aux_grad_scale(1.0 / n_micro)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(t.beta1, t.beta2),
                            eps=t.eps, foreach=False)
    sampler = Sampler(TokenFile.open(ensure_token_file(cfg.data)), t.seq_len, t.global_batch_size, t.seed)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for tokens in sampler.micro_batches(step, 0, 1, t.micro_batch_size):
            out = model(tokens)
            (out.loss / n_micro).backward()
            total += out.main_loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        opt.step()
        opt.zero_grad()
        for r in model.routers():
            r.update_bias(r.load, cfg.model.bias_update_speed)
            r.load.zero_()
        losses.append(total / n_micro)
    ref_losses, ref_params, ref_biases, _ = reference
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[n], rtol=1e-5, atol=1e-6, msg=n)
    for r, b in zip(model.routers(), ref_biases):
        torch.testing.assert_close(r.bias, b)


@pytest.mark.multiproc
@pytest.mark.parametrize("dp", [2, 4])
def test_data_parallel_matches_single_process(reference, dp, tmp_path):
    results = run_ranks(_rank_run, dp, str(tmp_path), ())
    ref_losses, ref_params, ref_biases, ref_bytes = reference
    for losses, params, biases, state_bytes in results:
        # fp32: the only difference is the summation order of the gradient reduction
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for n, p in params.items():
            torch.testing.assert_close(p, ref_params[n], rtol=1e-4, atol=1e-5, msg=n)
        for b, rb in zip(biases, ref_biases):
            torch.testing.assert_close(b, rb)
        # ZeRO-1: each rank holds ~1/dp of the master weights and moments (padding aside)
        assert state_bytes == pytest.approx(ref_bytes / dp, rel=0.01)
    # every rank ends with identical parameters
    for n in ref_params:
        assert all(torch.equal(r[1][n], results[0][1][n]) for r in results)


@pytest.mark.multiproc
def test_bf16_moments_stay_close(tmp_path):
    """bf16 moments (as V3) change the update slightly; the loss curve must stay within a few percent."""
    ref = _run(_cfg(1, str(tmp_path), ()))
    got = run_ranks(_rank_run, 2, str(tmp_path), ("train.bf16_moments=true",))[0]
    assert got[3] < ref[3] / 2  # moments are half the bytes and sharded in two
    for a, b in zip(got[0], ref[0]):
        assert math.isclose(a, b, rel_tol=0.02)


def _overlap_rank(rank, world, tmp, overlap, pp=1, schedule="1f1b", recompute="none"):
    if recompute == "v3":  # the attention backward a head at a time: nested backwards add partial gradients
        import hai.model.attention

        hai.model.attention.HEAD_CHUNK_BYTES = 1
    cfg = _cfg(world // pp, tmp, ("train.grad_bucket_elements=3000", f"train.overlap_grad_reduce={overlap}",
                                  f"cluster.gpus_per_node={world}", f"parallel.pp={pp}",
                                  f"parallel.schedule={schedule}", f"train.recompute={recompute}"))
    topo = Topology.from_config(cfg)
    trainer = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    opt, losses, early = trainer.optimizer, [], []
    for _ in range(cfg.train.steps):
        losses.append(trainer.train_step()["loss"])
        early.append(opt.launched_in_backward if overlap else 0)
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return losses, params, early, len(opt.buckets), len(opt._launch)


class _Chunked(torch.autograd.Function):
    """y = x Wᵀ whose backward recomputes the product and back-propagates it in two nested backwards (halves of
    the output features), as the attention region does per head range; W is an input, so its own node runs last."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        ctx.w = w
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        from hai.model.wgrad import inner_backward

        (x,) = ctx.saved_tensors
        w, half = ctx.w, dy.shape[1] // 2
        with torch.enable_grad(), inner_backward():
            for lo, hi in ((0, half), (half, dy.shape[1])):
                torch.autograd.backward(x @ w[lo:hi].t(), dy[:, lo:hi])
        return dy @ w, None


def _nested_rank(rank, world):
    from types import SimpleNamespace

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.randn(6))
    train = SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=0.0,
                            bf16_moments=False, grad_bucket_elements=1, overlap_grad_reduce=True)
    from hai.parallel.zero import ZeroGroups

    opt = ZeroAdamW([("w", w), ("b", b)], train, ZeroGroups(dp=dist.group.WORLD, grad_divisor=world))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
    opt.arm_grad_sync()
    (_Chunked.apply(x, w) + b).square().sum().backward()
    launched = opt.launched_in_backward
    shards = [bk.grad_shard().clone() for bk in opt.buckets]
    return launched, [(bk.names, s.tolist()) for bk, s in zip(opt.buckets, shards)], x.tolist()


@pytest.mark.multiproc
def test_nested_backward_accumulations_are_not_final():
    """A region that back-propagates its recomputed graph in nested backwards (hai.model.wgrad.inner_backward) adds
    partial gradients to its weight: the weight's bucket starts its reduce-scatter only when the weight's own node
    runs after the region (without the guard the first nested accumulation would start it, and the second would
    raise), and the reduced gradient is the sum of every rank's whole gradient (float64 reference)."""
    results = run_ranks(_nested_rank, 2)
    torch.manual_seed(0)
    w, b = torch.randn(6, 4).double(), torch.randn(6).double()  # the ranks' parameters
    total_w, total_b = torch.zeros_like(w), torch.zeros_like(b)
    for _, _, x in results:
        y = torch.tensor(x, dtype=torch.float64) @ w.t() + b
        total_w += 2 * (y.t() @ torch.tensor(x, dtype=torch.float64))
        total_b += 2 * y.sum(0)
    full = {"w": total_w.flatten(), "b": total_b}  # one bucket each (matrices decay, vectors do not)
    for rank, (launched, shards, _) in enumerate(results):
        assert launched == 2  # both buckets started inside the backward
        for (names, shard), ref in ((x, full[x[0][0]]) for x in shards):
            n = len(shard)
            want = torch.cat([ref, ref.new_zeros(2 * n - ref.numel())])[rank * n:(rank + 1) * n]
            torch.testing.assert_close(torch.tensor(shard, dtype=torch.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.multiproc
@pytest.mark.parametrize("schedule", ["1f1b", "zb1p"])
def test_overlapped_gradient_reduce_scatter_in_the_pipeline(reference, schedule, tmp_path):
    """pp=2 x dp=2: a stage's buckets start their reduce-scatter when the schedule has run the stage's last backward
    and weight-gradient work (ZB1P defers W past the last B), before the schedule ends; every bucket synced over
    dp alone (not a pipeline copy, such as the embedding MTP shares with the first stage) starts inside the
    schedule; bit-for-bit the non-overlapped run; the single-process run within fp32 reduction order."""
    on = run_ranks(_overlap_rank, 4, str(tmp_path), True, 2, schedule)
    off = run_ranks(_overlap_rank, 4, str(tmp_path), False, 2, schedule)
    ref_losses, ref_params = reference[:2]
    for (l_on, p_on, early, n_buckets, n_launch), (l_off, p_off, *_) in zip(on, off):
        assert n_launch >= 5 and early == [n_launch] * STEPS, (early, n_launch, n_buckets)
        assert l_on == l_off
        for n, p in p_on.items():
            assert torch.equal(p, p_off[n]), n
            torch.testing.assert_close(p, ref_params[n], rtol=1e-4, atol=1e-5, msg=n)
        assert l_on == pytest.approx(ref_losses, rel=1e-5)


@pytest.mark.multiproc
@pytest.mark.parametrize("recompute", ["none", "v3"])
def test_overlapped_gradient_reduce_scatter(reference, recompute, tmp_path):
    """train.overlap_grad_reduce: with ~3k-element buckets, the reduce-scatters start during the last backward
    (every bucket, in launch order, before the step), the result is bit-for-bit the non-overlapped step's with the
    same buckets, and both equal the single-process run within fp32 reduction-order tolerance. Under V3's recompute
    the regions write weight gradients into main_grad inside their backward, before the weight's hook runs, and the
    attention region (one head range at a time here) back-propagates its recomputed graph in nested backwards whose
    partial accumulations must not count as final."""
    on = run_ranks(_overlap_rank, 2, str(tmp_path), True, 1, "1f1b", recompute)
    off = run_ranks(_overlap_rank, 2, str(tmp_path), False, 1, "1f1b", recompute)
    ref_losses, ref_params = reference[:2]
    for (l_on, p_on, early, n_buckets, n_launch), (l_off, p_off, *_) in zip(on, off):
        assert n_buckets > 10 and n_launch == n_buckets  # small buckets, every one a single dp reduce-scatter
        assert early == [n_launch] * STEPS  # all started inside the backward, none left for the step to start
        assert l_on == l_off
        for n, p in p_on.items():
            assert torch.equal(p, p_off[n]), n
            torch.testing.assert_close(p, ref_params[n], rtol=1e-4, atol=1e-5, msg=n)
        assert l_on == pytest.approx(ref_losses, rel=1e-5)


def _adamw_run(fused: bool, steps: int = 4) -> list[torch.Tensor]:
    """Four steps of ZeroAdamW (one rank, clipping and weight decay on) on fixed gradients; the master weights."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 48)), torch.nn.Parameter(torch.randn(48))]
    train = SimpleNamespace(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
                            bf16_moments=False)
    opt = ZeroAdamW([("w", params[0]), ("b", params[1])], train)
    opt.fused_update = fused
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in opt.params():
            p.main_grad.copy_(torch.randn(p.shape, generator=gen))
        opt.step()
    return [b.master.clone() for b in opt.buckets]


def test_fused_adamw_equals_the_explicit_arithmetic():
    """torch's fused AdamW kernel (CUDA's path for fp32 moments; it has a CPU kernel too) gives the explicit
    single-tensor arithmetic's weights up to the rounding of fused multiply-adds."""
    for fused, plain in zip(_adamw_run(True), _adamw_run(False)):
        assert not torch.equal(fused, torch.zeros_like(fused))
        torch.testing.assert_close(fused, plain, rtol=2e-6, atol=1e-7)


def test_fused_adamw_where_the_device_has_it():
    from types import SimpleNamespace

    opt = ZeroAdamW([], SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=0.0,
                                        bf16_moments=False))

    def bucket(device, moments):
        return SimpleNamespace(master=SimpleNamespace(device=torch.device(device)),
                               exp_avg=SimpleNamespace(dtype=moments))

    assert opt.fused(bucket("cuda", torch.float32))
    assert not opt.fused(bucket("cuda", torch.bfloat16))  # one dtype per fused call: bf16 moments stay explicit
    assert not opt.fused(bucket("cpu", torch.float32))  # chunked explicit ops: bitwise torch.optim.AdamW
