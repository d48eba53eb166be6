"""ZeRO-1's gradient reduce-scatter overlapped with the backward (``train.overlap_grad_reduce``) vs at the step.

Trains ``--steps`` steps on ``--ranks`` forked gloo ranks (dp = ranks), once with the reduce-scatter of every bucket
at the optimizer step and once overlapped (each bucket launched asynchronously when the last micro-batch's backward
has finished its gradients), with ``--bucket`` elements per gradient bucket, and prints per mode the medians (after
``--warmup`` steps) of: the forward/backward time, the time from the end of the backward to the end of the step
(the exposed gradient sync, the AdamW update and the parameter all-gather), the step, and how many buckets started
inside the backward. On a 2-core machine the ranks and gloo's communication threads share the cores, so compute
and communication overlap less than on a GPU, where the reduce-scatter runs on its own stream and links.

    python benchmarks/grad_overlap.py --model small --ranks 2 --steps 8 --bucket 2000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # forked ranks

from forked import run_ranks  # noqa: E402

from hai.config.compose import compose  # noqa: E402
from hai.parallel.topology import Topology  # noqa: E402
from hai.train.trainer import Trainer, init_distributed, load_data  # noqa: E402


def _rank(rank: int, world: int, overrides: list[str], warmup: int) -> dict:
    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    trainer = Trainer(cfg, topo, init_distributed(topo), load_data(cfg))
    recs = [trainer.train_step() for _ in range(cfg.train.steps)][warmup:]
    opt = trainer.optimizer
    return {"fb": statistics.median(r["forward_backward_s"] for r in recs),
            "after": statistics.median(r["optimizer_s"] for r in recs),
            "step": statistics.median(r["forward_backward_s"] + r["optimizer_s"] for r in recs),
            "early": opt.launched_in_backward if opt.overlap else 0, "buckets": len(opt.buckets),
            "elements": sum(b.numel for b in opt.buckets)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    for flag, default in (("--ranks", 2), ("--steps", 8), ("--warmup", 2), ("--bucket", 2_000_000)):
        ap.add_argument(flag, type=int, default=default)  # --bucket: train.grad_bucket_elements
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for overlap in (False, True):
        with tempfile.TemporaryDirectory() as out:
            ov = [f"model={a.model}", "train=test", "cluster=cpu1", "parallel=single", f"cluster.gpus_per_node={a.ranks}",
                  f"parallel.dp={a.ranks}", f"train.steps={a.steps}", "wandb.mode=disabled", "train.progress=false",
                  "train.seq_len=64", f"train.global_batch_size={4 * a.ranks}", "train.micro_batch_size=2",
                  f"train.grad_bucket_elements={a.bucket}", f"train.overlap_grad_reduce={str(overlap).lower()}",
                  f"out_dir={out}"]
            res = run_ranks(_rank, a.ranks, ov, a.warmup, timeout=3600)
        rows.append((overlap, max(res, key=lambda r: r["step"])))  # the slowest rank sets the step
    r0 = rows[0][1]
    print(f"model={a.model} ranks={a.ranks} (dp) steps={a.steps} (medians after {a.warmup}, seconds, slowest rank); "
          f"{r0['elements'] / 1e6:.1f}M gradient elements in {r0['buckets']} buckets of <= {a.bucket / 1e6:g}M")
    print(f"{'reduce-scatter':16s} {'forward+backward':>17s} {'backward end -> step end':>25s} {'step':>8s} "
          f"{'buckets started in backward':>28s}")
    for overlap, r in rows:
        print(f"{'overlapped' if overlap else 'at the step':16s} {r['fb']:17.3f} {r['after']:25.3f} {r['step']:8.3f} "
              f"{r['early']:>22d} / {r['buckets']}")


if __name__ == "__main__":
    main()
