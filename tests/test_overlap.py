"""Overlapped F&B (hai.pipeline.overlap): a chunk's forward cut at the MoE all-to-all seams and driven alongside
another chunk's backward.

* The tape (segments + raw seams) computes the same losses and gradients as plain autograd: single process with the
  local dispatcher, and 4 gloo ranks with expert parallelism over 2 simulated nodes (hierarchical dispatch).
  Tolerance rtol 1e-5 / atol 1e-7 (fp32; only the order of gradient accumulation differs).
* Interleaving a forward chunk with another chunk's backward gives bitwise the results of running them one after
  the other, and the seams really alternate: after each collective one chunk issues, the other chunk computes
  before the first waits for it.
* In the trainer: pp=2 DualPipe x dp=2 x ep=2, interleaved FB == sequential FB bitwise over 2 steps, with the
  plain and the FP8 dispatch wire format.
"""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from hai.config.compose import compose
from hai.data import TokenFile, ensure_token_file
from hai.model.transformer import build_model
from hai.parallel import Topology
from hai.parallel.expert import EPDispatcher, shard_experts
from hai.pipeline.overlap import Tape, block_forward, run_fb, supports_seams
from hai.train.trainer import Trainer, init_distributed


def _forward(model, tokens, tape, out):
    tape.begin()
    h = model.embed(tokens[:, :-1])
    tape.end(h)
    for block in model.layers:
        h = yield from block_forward(block, h, tape)
    (h,) = tape.begin(h)
    out.append(model.head_loss(h, tokens))
    tape.end(out[-1].loss)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _two_micro_batches(model, mbs, mode, log=None):
    """Gradients of loss(mb0) + loss(mb1): plain autograd, or on tapes with mb1's forward and mb0's backward as one
    FB pair (sequential or interleaved)."""
    model.zero_grad(set_to_none=True)
    if mode == "plain":
        losses = []
        for mb in mbs:
            out = model(mb)
            out.loss.backward()
            losses.append(out.loss.detach())
        return losses, _grads(model)
    tapes, outs = [Tape(), Tape()], [[], []]
    run_fb(_forward(model, mbs[0], tapes[0], outs[0]), iter(()))
    one = torch.ones(())
    run_fb(_forward(model, mbs[1], tapes[1], outs[1]), tapes[0].backward([(outs[0][0].loss, one)]),
           sequential=mode == "sequential", log=log)
    run_fb(iter(()), tapes[1].backward([(outs[1][0].loss, one)]))
    return [o[0].loss.detach() for o in outs], _grads(model)


def _assert_close(got, want):
    losses, grads = got
    ref_losses, ref_grads = want
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def _assert_equal(got, want):
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    assert got[1].keys() == want[1].keys()
    for n in got[1]:
        assert torch.equal(got[1][n], want[1][n]), n


def _micro_batches(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (2, 17), generator=g) for _ in range(2)]


def _tensors(obj, seen=None):
    """Every tensor reachable from obj through attributes, dataclass fields, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        names = list(getattr(obj, "__dict__", {})) + list(getattr(obj, "__slots__", ()))
        items = [getattr(obj, n, None) for n in names]
    else:
        return []
    return [t for x in items for t in _tensors(x, seen)]


def test_tape_matches_autograd_single_process():
    cfg = compose(["model=tiny"]).model
    model = build_model(cfg, seed=0)
    mbs = _micro_batches(cfg, 1)
    plain = _two_micro_batches(model, mbs, "plain")
    for mode in ("sequential", "interleaved"):
        _assert_close(_two_micro_batches(model, mbs, mode), plain)
    # the tape holds no activation (only scalars: roots, seeds, its anchor); autograd saves what the ops need
    tape, out = Tape(), []
    run_fb(_forward(model, mbs[0], tape, out), iter(()))
    held = [t for n in tape.nodes for t in _tensors(n)] + [tape._anchor]
    assert held and all(t.numel() <= 1 for t in held), [tuple(t.shape) for t in held if t.numel() > 1]


def _ep_rank(rank, world):
    cfg = compose(["model=tiny"]).model
    model = build_model(cfg, seed=0)
    for moe in model.moe_layers():
        shard_experts(moe, rank, world)
        moe.dispatcher = EPDispatcher(dist.group.WORLD, cfg.n_routed_experts, gpus_per_node=2, mode="hierarchical")
    mbs = _micro_batches(cfg, 100 + rank)  # different tokens on every rank
    plain = _two_micro_batches(model, mbs, "plain")
    seq = _two_micro_batches(model, mbs, "sequential")
    log: list = []
    inter = _two_micro_batches(model, mbs, "interleaved", log)
    _assert_close(seq, plain)
    _assert_equal(inter, seq)
    # MoE blocks of the main model (MTP's block runs inside the head segment, on the synchronous autograd seams)
    return [(chunk, seam) for chunk, seam, _ in log], sum(map(supports_seams, model.layers))


def test_interleaved_fb_is_bitwise_sequential_under_expert_parallelism():
    results = run_ranks(_ep_rank, 4)
    log, n_moe = results[0]
    assert n_moe >= 2
    assert all(r[0] == log for r in results)  # every rank issued its collectives in the same order
    # the chunks alternate at every seam, and at every hop of the hierarchical route (2 hops: node, then rank): each
    # all-to-all is in flight while the other chunk computes
    hops = 2
    assert [c for c, _ in log] == ["F", "B"] * (2 * hops * n_moe)
    assert [s for c, s in log if c == "F"] == (["dispatch"] * hops + ["combine"] * hops) * n_moe
    assert [s for c, s in log if c == "B"] == (["combine_bwd"] * hops + ["dispatch_bwd"] * hops) * n_moe


def _train_rank(rank, world, overrides, sequential, nccl_order=False):
    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    trainer = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    trainer.pipeline.fb_sequential = sequential
    if nccl_order:  # run_fb's NCCL rule (waits do not block the host): one deferred W enqueued per issued collective
        for m in trainer.model.moe_layers():
            m.dispatcher.host_blocking = False
    store = trainer.pipeline.store
    recs = [trainer.train_step() for _ in range(2)]
    if nccl_order and not sequential:  # the weight gradients ran inside the F&B pairs, one per issued collective
        issued = sum(len(fb) for fb in trainer.pipeline.seam_log)
        assert 0 < store.filled <= issued, (store.filled, issued)
    # the exposed (host-blocked) EP communication is logged and is part of the forward/backward time
    assert all(0 < r["ep_comm_blocked_s"] < r["forward_backward_s"] for r in recs), recs
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.pipeline.write_timeline(cfg.out_dir if rank == 0 else None)
    return [r["loss"] for r in recs], params, [[c for c, _, _ in fb] for fb in trainer.pipeline.seam_log]


@pytest.mark.parametrize("extra,nccl_order", [([], False), (["parallel.fp8_dispatch=true"], False), ([], True)],
                         ids=["bf16_wire", "fp8_dispatch", "nccl_order"])
def test_trainer_interleaved_fb_equals_sequential(extra, nccl_order, tmp_path):
    """nccl_order: the dispatchers say their waits do not block the host (NCCL's stream dependencies), so the F&B
    enqueues a deferred weight gradient right after each collective instead of polling for completion; the result
    is still bitwise the sequential pair's."""
    overrides = ["model=tiny", "train=test", "cluster=cpu1", "parallel=single", "wandb.mode=disabled",
                 "cluster.gpus_per_node=4", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2",
                 "parallel.schedule=dualpipe", "train.global_batch_size=16", f"out_dir={tmp_path}", *extra]
    inter = run_ranks(_train_rank, 4, overrides, False, nccl_order)
    seq = run_ranks(_train_rank, 4, overrides, True, nccl_order)
    for (l1, p1, fbs), (l2, p2, _) in zip(inter, seq):
        assert l1 == l2
        assert all(torch.equal(p1[n], p2[n]) for n in p1)
        assert fbs, "no FB action ran"
        for chunks in fbs:
            assert chunks.count("F") > 0 and chunks.count("B") > 0  # both chunks hold MoE blocks (seams)
            # the chunks alternate until the one with fewer MoE blocks is done; then the other runs on alone
            n_alt = 2 * min(chunks.count("F"), chunks.count("B"))
            assert chunks[:n_alt] == ["F", "B"] * (n_alt // 2), chunks
    # the executed trace marks each seam on its rank's own track
    import json

    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    seams = [e for e in trace if e.get("cat") == "seam"]
    assert {e["pid"] for e in seams} == {0, 1} and any(e["name"] == "B combine_bwd issued" for e in seams)


def test_ready_means_the_host_would_not_block():
    """Pending.ready(): on gloo (host-blocking waits) only once the work completed; on NCCL, whose wait() is a stream
    dependency, always (the host never blocks there, so there is nothing to fill)."""
    from hai.parallel.pending import Chain

    class Work:
        done = False

        def is_completed(self):
            return self.done

        def wait(self):
            self.done = True

    def hops(work):
        yield work
        work.wait()
        return "rows"

    for blocking in (True, False):
        work = Work()
        chain = Chain(hops(work), host_blocking=blocking)
        assert chain.ready() is (not blocking)
        work.done = True
        assert chain.ready() and chain.wait() == "rows"


def test_nccl_order_enqueues_one_weight_gradient_behind_each_collective():
    """run_fb with waits that do not block the host (NCCL): right after a chunk issues a collective, one deferred
    weight-gradient unit is enqueued, before the other chunk runs and before the collective's consumer; with
    host-blocking waits (gloo) nothing is filled once the work has completed."""
    from hai.model.moe import Pending

    class InFlight(Pending):
        def __init__(self, blocking):
            super().__init__(None)
            self.host_blocking = blocking

    def chunk(name, seams, events, blocking):
        for seam in seams:
            events.append(f"{name} issue {seam}")
            yield seam, InFlight(blocking)
            events.append(f"{name} consume {seam}")

    for blocking in (False, True):
        events, units = [], iter(range(100))

        def fill():
            events.append(f"W{next(units)}")
            return True

        run_fb(chunk("F", ["dispatch", "combine"], events, blocking),
               chunk("B", ["combine_bwd", "dispatch_bwd"], events, blocking), fill=fill)
        if blocking:  # gloo: the works report completion (ready), so there is no wait to fill
            assert not [e for e in events if e.startswith("W")]
            continue
        assert events == ["F issue dispatch", "W0", "B issue combine_bwd", "W1",
                          "F consume dispatch", "F issue combine", "W2",
                          "B consume combine_bwd", "B issue dispatch_bwd", "W3",
                          "F consume combine", "B consume dispatch_bwd"]
