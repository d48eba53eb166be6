"""Expert-parallel dispatch on CPU gloo ranks: bytes per link class and dispatch+combine time, flat vs hierarchical.

    OMP_NUM_THREADS=1 python benchmarks/ep_dispatch.py [--ep 8] [--gpus-per-node 2] [--tokens 256] [--hidden 512]

Forks ``ep`` gloo ranks (simulated nodes of ``gpus_per_node`` ranks), routes a fixed token batch with the model's
Router (top-k over ``experts`` experts, n_group = nodes of the EP group, topk_group = M) for M in {1, 2, 4, unlimited},
and for each path prints the inter-/intra-node bytes per token of the dispatch payload (sent by all ranks / all
tokens; self-sends are free) and the dispatch+combine (forward) time. Then checks, for the hierarchical path, that
inter-node bytes per token <= M x hidden x bytes-per-element (FP8 rows: hidden + 4 bytes of scale per 128).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from hai.config import ModelConfig
from hai.model.moe import Router
from hai.parallel.expert import EPDispatcher

PHASES = ("dispatch", "combine")


def _route(args, M: int, rank: int):
    nodes = args.ep // args.gpus_per_node
    cfg = ModelConfig(hidden_size=args.hidden, n_routed_experts=args.experts, n_activated_experts=args.topk,
                      moe_intermediate_size=16, n_group=nodes if M else 1, topk_group=M or 1)
    g = torch.Generator().manual_seed(1000 + rank)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        r = router(torch.randn(args.tokens, args.hidden, generator=g))
    return r.topk_idx, r.topk_weight


def _measure(args, disp, x, idx, w) -> tuple[dict, float]:
    times = []
    for it in range(args.warmup + args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        recv, _, handle = disp.dispatch(x, idx, w)
        disp.combine(recv, handle)  # identity experts: time the communication only
        times.append(time.perf_counter() - t0)
    return handle.traffic, statistics.median(times[args.warmup:])


def _rank(rank: int, args) -> list[dict]:
    rows = []
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    for M in args.limits:
        idx, w = _route(args, M, rank)
        for mode, fp8 in (("flat", False), ("hierarchical", False), ("hierarchical", True)):
            disp = EPDispatcher(dist.group.WORLD, args.experts, gpus_per_node=args.gpus_per_node, mode=mode, fp8=fp8)
            traffic, sec = _measure(args, disp, x, idx, w)
            stats = torch.tensor([traffic[f"{p}_{link}"] for p in PHASES for link in ("intra", "inter")] + [sec],
                                 dtype=torch.float64)
            dist.all_reduce(stats[:-1])
            dist.all_reduce(stats[-1:], op=dist.ReduceOp.MAX)
            rows.append(dict(M=M, mode=mode + (" fp8" if fp8 else ""), stats=stats.tolist(),
                             quantizer=disp.quantizer))
    return rows


def _entry(rank, args, init_file, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.ep)
    try:
        out = _rank(rank, args)
        queue.put((rank, out))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _launch(args) -> list[dict]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_entry, args=(r, args, os.path.join(d, "store"), queue)) for r in range(args.ep)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    return results[0]


def _print(args, rows) -> bool:
    total_tokens = args.ep * args.tokens
    elem = 2  # bf16 payload
    print(f"ep={args.ep} over {args.ep // args.gpus_per_node} simulated nodes of {args.gpus_per_node}; "
          f"{args.tokens} tokens/rank, hidden {args.hidden}, top-{args.topk} of {args.experts} experts, bf16 payload "
          f"(fp8 rows: 1x128 e4m3 + fp32 scales, quantizer {next(r['quantizer'] for r in rows if r['quantizer'])})")
    head = (f"{'M':>9} {'path':>17} | {'disp inter B/tok':>16} {'disp intra B/tok':>16} | {'comb inter B/tok':>16} "
            f"{'comb intra B/tok':>16} | {'bound M*D*b':>11} {'check':>5} | {'disp+comb ms':>12}")
    print(head + "\n" + "-" * len(head))
    ok = True
    for r in rows:
        d_intra, d_inter, c_intra, c_inter, sec = r["stats"]
        row_bytes = args.hidden + args.hidden // 128 * 4 if r["mode"].endswith("fp8") else args.hidden * elem
        bound, check = "-", ""
        if r["M"] and r["mode"].startswith("hierarchical"):
            b = r["M"] * row_bytes
            passed = d_inter / total_tokens <= b and c_inter / total_tokens <= r["M"] * args.hidden * elem
            ok &= passed
            bound, check = str(b), "ok" if passed else "FAIL"
        print(f"{r['M'] or 'unlimited':>9} {r['mode']:>17} | {d_inter / total_tokens:>16.1f} "
              f"{d_intra / total_tokens:>16.1f} | {c_inter / total_tokens:>16.1f} {c_intra / total_tokens:>16.1f} | "
              f"{bound:>11} {check:>5} | {sec * 1e3:>12.2f}")
    print(f"check: hierarchical inter-node bytes/token <= M x hidden x bytes-per-element "
          f"(dispatch and bf16 combine): {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ep", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--limits", type=int, nargs="+", default=[1, 2, 4, 0], help="node limits M (0: unlimited)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    nodes = args.ep // args.gpus_per_node
    args.limits = [m for m in args.limits if m <= nodes]
    raise SystemExit(0 if _print(args, _launch(args)) else 1)


if __name__ == "__main__":
    main()
