"""Run a function on N forked CPU ranks (gloo) on this machine and collect what each returns: the launcher of the
multi-rank tests and of the benchmarks (a real multi-node job starts through torchrun, ``hai.launch``).

Ranks are forked from the calling process (cheap: torch is already imported) and join through a ``file://`` store.
The function must be a module-level function ``fn(rank, world_size, *args)``; its return value is pickled back.
OMP_NUM_THREADS=1 is set in every rank (several ranks share two cores). Each rank ends with a barrier and
``destroy_process_group`` (gloo aborts at interpreter exit otherwise, see ENVIRONMENT.md).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

import torch
import torch.distributed as dist

__all__ = ["run_ranks"]


def _entry(fn, rank, world_size, init_file, args, env, queue):
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", pickle.dumps(out)))  # by value: no shared-memory fds
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    queue.close()
    queue.join_thread()  # flush the result before this process exits
    os._exit(0)  # skip interpreter teardown in the forked child (pytest's atexit handlers, gloo threads)


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, env: dict | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results in rank order."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, args, env or {}, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = pickle.loads(payload)
                else:
                    errors.append(f"rank {rank}:\n{payload}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
