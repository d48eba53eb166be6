"""Overlapped F&B: how much all-to-all time one FB pair hides, measured on real MoE stages over gloo.

    OMP_NUM_THREADS=1 python benchmarks/overlap.py [--ep 2] [--latency-ms 0 5 20] [--iters 5]

Forks ``ep`` gloo ranks holding a pipeline stage of a small DeepSeek-V3-style model (``--layers`` MoE blocks, experts
sharded ``ep``-way, flat dispatch) and times one FB action (the forward of micro-batch 1 and the backward of
micro-batch 0) run sequentially and interleaved (``hai.pipeline.overlap.run_fb``).

On CPU gloo the all-to-alls of a few KB take well under a millisecond, far less than a real cross-node dispatch, so
each raw seam also gets an injected *link latency*: its ``wait()`` returns no earlier than ``latency`` after it was
issued (the collective itself still runs). Sequential FB waits out every seam: 4 per MoE block (dispatch, combine and
their two gradients). Interleaved FB hides a seam's latency behind the other chunk's compute until the next seam.
Three modes: ``sequential``; ``interleaved``; ``interleaved+W``, which also defers the backward chunk's weight
gradients (as the executor's FB actions do) and runs one whenever a collective is in flight with no other chunk left
to compute (the pair's tail), the rest right after the pair. Printed per latency: the latency injected over all seams
of the pair (4 x blocks x latency, which sequential mode waits out), the median FB time of each mode, and the time
each mode saves against sequential at the same latency (timings on a shared 2-core box vary by ~10-20% run to run). A
seam's latency can only hide behind the other chunk's compute up to that chunk's next seam, so at large latencies
the hidden fraction falls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hai.config.compose import compose
from hai.parallel.pending import Pending
from hai.model.wgrad import WeightGradStore
from hai.model.transformer import build_model
from hai.parallel.expert import EPDispatcher, shard_experts
from hai.pipeline.overlap import Tape, block_forward, run_fb


MODES = ("sequential", "interleaved", "interleaved+W")


class _Slow(Pending):
    """``inner``, whose result is not handed out before ``due`` (perf_counter seconds)."""

    def __init__(self, inner: Pending, due: float):
        super().__init__(None)
        self.inner, self.due = inner, due

    def step(self) -> bool:
        return self.inner.step()

    def ready(self) -> bool:
        return self.inner.ready() and time.perf_counter() >= self.due

    def wait(self):
        out = self.inner.wait()
        time.sleep(max(0.0, self.due - time.perf_counter()))
        return out


class SlowLink:
    """Wraps a dispatcher: every raw seam's ``wait()`` returns no earlier than ``latency`` s after it was issued."""

    def __init__(self, inner, latency: float):
        self.inner, self.latency = inner, latency

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _slow(self, pending: Pending) -> Pending:
        return _Slow(pending, time.perf_counter() + self.latency)

    def dispatch_start(self, *a):
        handle, pending = self.inner.dispatch_start(*a)
        return handle, self._slow(pending)

    def dispatch_backward_start(self, *a):
        return self._slow(self.inner.dispatch_backward_start(*a))

    def combine_start(self, *a):
        return self._slow(self.inner.combine_start(*a))

    def combine_backward_start(self, *a):
        return self._slow(self.inner.combine_backward_start(*a))


def _rank(rank: int, world: int, args) -> dict:
    cfg = compose(["model=tiny", f"model.hidden_size={args.hidden}", f"model.moe_intermediate_size={args.hidden // 2}",
                   f"model.num_layers={args.layers}", "model.first_k_dense_replace=0", "model.mtp_depth=0"]).model
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    blocks = list(model.layers)
    inner = []
    for moe in model.moe_layers():
        shard_experts(moe, rank, world)
        inner.append(EPDispatcher(dist.group.WORLD, cfg.n_routed_experts, gpus_per_node=world))
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(args.batch, args.seq, args.hidden, generator=g) for _ in range(2)]
    grad = torch.randn(args.batch, args.seq, args.hidden, generator=g)

    store = WeightGradStore()  # as the executor does: linear layers can defer their weight gradients
    for m in model.modules():
        if hasattr(m, "wgrad_store"):
            m.wgrad_store = store

    def forward(x, tape, out):
        h = x
        for b in blocks:
            h = yield from block_forward(b, h, tape)
        out.append(h)

    def backward(tape, roots, defer):
        store.recording = defer
        try:
            yield from tape.backward(roots)
        finally:
            store.recording = False

    results = {}
    for latency in args.latency_ms:
        for moe, d in zip(model.moe_layers(), inner):
            moe.dispatcher = SlowLink(d, latency / 1e3)
        for mode in MODES:
            times = []
            for _ in range(args.warmup + args.iters):
                t0_tape, out0 = Tape(), []
                run_fb(forward(xs[0].requires_grad_(), t0_tape, out0), iter(()))
                t1_tape, out1 = Tape(), []
                dist.barrier()
                t0 = time.perf_counter()
                defer = mode == "interleaved+W"
                run_fb(forward(xs[1].requires_grad_(), t1_tape, out1), backward(t0_tape, [(out0[0], grad)], defer),
                       sequential=mode == "sequential", fill=store.run_one if defer else None)
                store.close("fb")
                store.run("fb")  # the deferred weight gradients the pair's tail did not absorb
                times.append(time.perf_counter() - t0)
                run_fb(iter(()), t1_tape.backward([(out1[0], grad)]))
                model.zero_grad(set_to_none=True)
            results[latency, mode] = statistics.median(times[args.warmup:])
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 5.0, 10.0, 20.0])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from dist_utils import run_ranks

    per_rank = run_ranks(_rank, args.ep, args, timeout=1800)
    print(f"FB pair on {args.ep} gloo ranks: {args.layers} MoE blocks, hidden {args.hidden}, {args.batch}x{args.seq} "
          f"tokens per micro-batch; median of {args.iters}, max over ranks")
    t = {key: max(r[key] for r in per_rank) for key in per_rank[0]}
    print(f"{'latency ms':>10s} {'injected s':>11s} " + " ".join(f"{m + ' s':>16s}" for m in MODES) + " " +
          " ".join(f"{'saved ' + m + ' s':>20s}" for m in MODES[1:]))
    for lat in args.latency_ms:
        injected = 4 * args.layers * lat / 1e3  # 2 seams per MoE block in each chunk
        saved = [f"{t[lat, 'sequential'] - t[lat, m]:20.3f}" for m in MODES[1:]]
        print(f"{lat:10.1f} {injected:11.3f} " + " ".join(f"{t[lat, m]:16.3f}" for m in MODES) + " " +
              " ".join(saved))


if __name__ == "__main__":
    main()
