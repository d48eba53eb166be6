"""Tensor parallelism on CPU ranks: the TP collectives' bytes against `hai plan`'s, and step time at tp = 1, 2, 4.

    OMP_NUM_THREADS=1 python benchmarks/tp.py [--steps 6] [--model small]

For each layout (4 gloo ranks: dp=4 / dp=2 x tp=2 / tp=4, with and without sequence parallelism; ep=4 for MoE), one
training step is run with every TP collective of ``hai.parallel.tensor_parallel`` counted on rank 0 (tensor bytes:
an all-gather's output, a reduce-scatter's input, an all-reduce's tensor, what ``hai.plan.tp`` counts), next to the
plan's bytes for the same micro-batches; then ``--steps`` steps are timed (median step, after one warm-up step).
The step time on 2 CPU cores measures the code path (collectives through gloo, the smaller GEMMs), not NVLink.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # forked ranks
from forked import run_ranks  # noqa: E402

LAYOUTS = {
    "tp=1 (dp=4, ep=4)": ["parallel.dp=4"],
    "tp=2 x dp=2, SP": ["parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "tp=4, SP": ["parallel.dp=1", "parallel.tp=4", "parallel.sequence_parallel=true"],
}
DENSE_LAYOUTS = {
    "dense tp=2 x dp=2, no SP": ["parallel.dp=2", "parallel.tp=2"],
    "dense tp=2 x dp=2, SP": ["parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "dense tp=4, no SP": ["parallel.dp=1", "parallel.tp=4"],
}


def _count(tp_group, counts: dict, on: list):
    """Wrap the TP module's collectives; count tensor bytes per kind on the TP group while ``on[0]``."""
    import hai.parallel.tensor_parallel as tpm

    ag, rs, ar = tpm._all_gather, tpm._reduce_scatter, dist.all_reduce

    def all_gather(out, inp, group=None, **kw):
        if group is tp_group and on[0]:
            counts["all_gather"] = counts.get("all_gather", 0) + out.numel() * out.element_size()
        return ag(out, inp, group=group, **kw)

    def reduce_scatter(out, inp, group=None, **kw):
        if group is tp_group and on[0]:
            counts["reduce_scatter"] = counts.get("reduce_scatter", 0) + inp.numel() * inp.element_size()
        return rs(out, inp, group=group, **kw)

    def all_reduce(t, op=dist.ReduceOp.SUM, group=None, **kw):
        if group is tp_group and group is not None and on[0]:
            counts["all_reduce"] = counts.get("all_reduce", 0) + t.numel() * t.element_size()
        return ar(t, op=op, group=group, **kw)

    tpm._all_gather, tpm._reduce_scatter = all_gather, reduce_scatter
    dist.all_reduce = all_reduce


def _rank(rank, world, overrides, steps):
    from hai.config.compose import compose
    from hai.data import TokenFile, ensure_token_file
    from hai.parallel import Topology
    from hai.plan.tp import tp_chunk_bytes
    from hai.train.trainer import Trainer, init_distributed

    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    tr = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    counts: dict = {}
    on = [False]
    if topo.tp > 1:  # count the model's forward and backward only (not the step's router-load / gradient sums)
        _count(tr.tp_group, counts, on)
        fb = tr.forward_backward

        def counted_fb(mbs):
            on[0] = True
            try:
                return fb(mbs)
            finally:
                on[0] = False

        tr.forward_backward = counted_fb
    tr.train_step()  # one step, counted (and the warm-up)
    counted = dict(counts)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.train_step()
        times.append(time.perf_counter() - t0)
    plan = {}
    if topo.tp > 1:
        by = tp_chunk_bytes(cfg, 0)
        n = cfg.n_micro_batches
        for phase in by.values():
            for k, v in phase.items():
                plan[k] = plan.get(k, 0) + v * n
    return {"counted": counted, "plan": plan, "step_s": statistics.median(times),
            "tokens": cfg.train.global_batch_size * cfg.train.seq_len}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--model", default="small")
    args = ap.parse_args()
    base = [f"model={args.model}", "train=test", "cluster=cpu1", "cluster.gpus_per_node=4", "parallel=single",
            "wandb.mode=disabled", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
            "model.precision=fp32"]
    print(f"# benchmarks/tp.py: model={args.model}, 4 gloo ranks on {os.cpu_count()} CPU core(s), "
          f"seq_len 64, global batch 8, micro-batch 2\n")
    print("| layout | TP bytes counted / plan (all-gather, reduce-scatter, all-reduce in the model) | "
          "step (s) | tokens/s |")
    print("|---|---|---:|---:|")
    rows = [(k, [*v, "parallel.ep=4"]) for k, v in LAYOUTS.items()]
    rows += [(k, [*v, "model.n_routed_experts=0"]) for k, v in DENSE_LAYOUTS.items()]
    for name, ov in rows:
        r = run_ranks(_rank, 4, [*base, *ov], args.steps, timeout=1800)[0]
        parts = []
        for kind in ("all_gather", "reduce_scatter", "all_reduce"):
            got, want = r["counted"].get(kind, 0), r["plan"].get(kind, 0)
            if got or want:
                parts.append(f"{kind} {got / 1e6:.3f}/{want / 1e6:.3f} MB")
        print(f"| {name} | {'; '.join(parts) or '-'} | {r['step_s']:.3f} | {r['tokens'] / r['step_s']:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
