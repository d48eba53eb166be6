"""Fork N gloo ranks on this machine (file:// rendezvous) and collect what each returns: the benchmarks' launcher.

``run_ranks(fn, world, *args)`` runs the module-level ``fn(rank, world, *args)`` in forked children with one OpenMP
thread each and returns the results in rank order (an exception on any rank is raised here with its traceback).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback

import torch
import torch.distributed as dist

__all__ = ["run_ranks"]


def _entry(fn, rank, world, init_file, args, queue):
    os.environ.update({"OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported by the parent
        queue.put((rank, "error", traceback.format_exc()))
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 1800.0) -> list:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, os.path.join(d, "store"), args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in procs:
                rank, status, payload = queue.get(timeout=timeout)
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                results[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)]
