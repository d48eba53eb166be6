"""Long context on this machine: memory per rank and step time against the sequence length, at cp = 1, 2, 4.

    OMP_NUM_THREADS=1 python benchmarks/long_context.py [--seq 1024,2048,4096,8192,16384] [--cp 1,2,4]
    python benchmarks/long_context.py --cores [--device cuda]   # the attention cores alone: reference vs sdpa

Each row trains ``model=tiny`` (or ``--model small``) with V3's recompute recipe and the fused attention core
(``model.attention=sdpa``) on one sequence per step, its positions split over ``cp`` forked gloo ranks (zig-zag
chunks; MLA gathers the kv latents). Per rank: the activation bytes one micro-batch keeps for its backward
(saved-tensor hooks) against ``hai plan``'s count, the weights/gradients/optimizer buffers, the attention working
set the plan estimates (one layer's backward: the window's k and v for the heads attended at once and their fp32
gradients), the process's peak RSS, and the median step time over the measured steps (the slowest rank's). The
ranks share this machine's cores, so at cp > 1 the wall time is not a speed-up measurement: the columns that transfer
to a GPU cluster are the per-rank bytes and the per-rank attention work (equal across ranks with zig-zag chunks,
``work max/min``).

``--cores`` times the attention core alone (forward + backward, causal, V3's head dims 192/128) of both
implementations on one device, for the GPU check kit.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # forked ranks
from forked import run_ranks  # noqa: E402


def _overrides(model: str, seq: int, cp: int, steps: int, out_dir: str) -> list[str]:
    return [f"model={model}", "cluster=cpu1", "parallel=single", f"cluster.gpus_per_node={cp}", f"parallel.cp={cp}",
            f"train.seq_len={seq}", f"model.max_seq_len={max(seq, 4096)}", "train.global_batch_size=1",
            "train.micro_batch_size=1", f"train.steps={steps}", "train.recompute=v3", "model.attention=sdpa",
            "model.precision=fp32", "wandb.mode=disabled", "train.progress=false", "train.eval_every=0",
            "train.warmup_steps=0", f"out_dir={out_dir}"]


def _rank(rank: int, world: int, overrides: list[str], steps: int) -> dict:
    from measure import kept_for_backward

    from hai.config.compose import compose
    from hai.data import TokenFile, ensure_token_file
    from hai.parallel import Topology
    from hai.plan.cp import attention_working_set
    from hai.plan.memory import stage_act_bytes
    from hai.train.trainer import Trainer, init_distributed

    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    tr = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    tokens = tr.sampler.micro_batches(0, 0, 1, 1)[0]
    kept, out = kept_for_backward(lambda: tr.model(tokens), tr.model.parameters())
    del out
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.train_step()
        times.append(time.perf_counter() - t0)
    return {"kept": kept, "plan": stage_act_bytes(cfg, 0), "static": sum(tr.optimizer.buffer_bytes().values()),
            "working_set": attention_working_set(cfg), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "times": times}


def _work(seq: int, cp: int) -> float:
    """Busiest over idlest rank's causal (query, key) pairs under the zig-zag split."""
    from hai.model.sequence import zigzag_runs

    w = [sum(n * g0 + n * (n + 1) // 2 for _, n, g0 in zigzag_runs(seq // cp, cp, r)) for r in range(cp)]
    return max(w) / min(w)


def _table(args) -> None:
    steps = args.steps
    print(f"model={args.model}, V3 recompute, model.attention=sdpa, fp32, 1 sequence per step, ranks forked on this "
          f"machine ({os.cpu_count()} cores); MB = 1e6 bytes; kept/plan = measured / hai plan; step = median of "
          f"steps 2..{steps} (slowest rank)")
    columns = [("seq", 6), ("cp", 3), ("act kept MB", 11), ("plan MB", 9), ("kept/plan", 9), ("static MB", 9),
               ("attn ws MB", 10), ("peak RSS MB", 11), ("step s", 8), ("tok/s", 8), ("work max/min", 12)]
    head = " ".join(name.rjust(width) for name, width in columns)
    print(f"{head}\n{'-' * len(head)}")
    with tempfile.TemporaryDirectory() as out_dir:
        for seq in args.seq:
            for cp in args.cp:
                ov = _overrides(args.model, seq, cp, steps, out_dir)
                rows = run_ranks(_rank, cp, ov, steps, timeout=3600)  # fresh processes: RSS of this row only
                r = rows[0]
                step = max(statistics.median(x["times"][1:] or x["times"]) for x in rows)
                rss = max(x["rss"] for x in rows)
                print(f"{seq:>6} {cp:>3} {r['kept'] / 1e6:>11.2f} {r['plan'] / 1e6:>9.2f} "
                      f"{r['kept'] / r['plan']:>9.3f} {r['static'] / 1e6:>9.2f} {r['working_set'] / 1e6:>10.2f} "
                      f"{rss / 1e6:>11.0f} {step:>8.2f} {seq / step:>8.0f} {_work(seq, cp):>12.3f}", flush=True)


def _cores(args) -> None:
    """Forward + backward of the attention core alone, reference loop vs fused kernels, causal, on one device."""
    from hai.model.attention import attention

    dev, H = torch.device(args.device), args.heads
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(f"attention core fwd+bwd, {H} heads, q/k 192, v 128, batch 1, causal, {dtype}, {dev}; ms (median of "
          f"{args.repeat})")
    print(f"{'seq':>6} {'reference ms':>12} {'sdpa ms':>9} {'speed-up':>8}")
    for seq in args.seq:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, seq, H, d, generator=g, device=dev, dtype=dtype, requires_grad=True)
                   for d in (192, 192, 128))
        out = {}
        for impl in ("reference", "sdpa"):
            ts = []
            for _ in range(args.repeat + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                attention(q, k, v, 192 ** -0.5, None, impl).sum().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            out[impl] = statistics.median(ts[1:]) * 1e3
        print(f"{seq:>6} {out['reference']:>12.1f} {out['sdpa']:>9.1f} {out['reference'] / out['sdpa']:>8.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--cp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cores", action="store_true", help="time the attention cores alone")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    (_cores if args.cores else _table)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
