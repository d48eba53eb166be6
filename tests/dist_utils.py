"""The multi-rank tests' launcher: ``run_ranks(fn, world_size, *args)`` forks gloo ranks (tests/forked.py); and the
collective-byte meter the plan's TP and CP byte counts are checked against."""

import torch.distributed as dist

from forked import run_ranks

__all__ = ["run_ranks", "collective_bytes", "planned_bytes", "trainer_for", "train_and_save", "resume_and_train", "truncate_and_die", "rank_params"]


def collective_bytes(module, group, run) -> dict[str, int]:
    """Tensor bytes per kind (all_gather: the output, reduce_scatter: the input, all_reduce) of the collectives
    ``run()`` issues on ``group`` through ``module``'s ``_all_gather`` / ``_reduce_scatter`` and
    ``dist.all_reduce``."""
    got: dict[str, int] = {}
    ag, rs, ar = module._all_gather, module._reduce_scatter, dist.all_reduce

    def count(kind, t, g):
        if g is group:
            got[kind] = got.get(kind, 0) + t.numel() * t.element_size()

    module._all_gather = lambda out, inp, group=None, **k: (count("all_gather", out, group),
                                                             ag(out, inp, group=group, **k))[1]
    module._reduce_scatter = lambda out, inp, group=None, **k: (count("reduce_scatter", inp, group),
                                                                 rs(out, inp, group=group, **k))[1]
    dist.all_reduce = lambda t, op=dist.ReduceOp.SUM, group=None, **k: (count("all_reduce", t, group),
                                                                        ar(t, op=op, group=group, **k))[1]
    try:
        run()
    finally:
        module._all_gather, module._reduce_scatter, dist.all_reduce = ag, rs, ar
    return got


def planned_bytes(chunk_bytes: dict[str, dict[str, int]], n_micro: int) -> dict[str, int]:
    """A plan's per-chunk bytes (phase -> kind -> bytes) summed over phases for ``n_micro`` micro-batches."""
    want: dict[str, int] = {}
    for phase in chunk_bytes.values():
        for k, v in phase.items():
            want[k] = want.get(k, 0) + v * n_micro
    return want


def trainer_for(overrides: list[str]):
    """A Trainer of the composed ``overrides`` in this process (a forked rank joins its gloo world)."""
    from hai.config.compose import compose
    from hai.data import TokenFile, ensure_token_file
    from hai.parallel import Topology
    from hai.train.trainer import Trainer, init_distributed

    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    return Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))


def train_and_save(rank, world, overrides: list[str], steps: int):
    """(losses of ``steps`` training steps, the checkpoint saved after them)."""
    tr = trainer_for(overrides)
    losses = [tr.train_step()["loss"] for _ in range(steps)]
    return losses, tr.save_checkpoint()


def resume_and_train(rank, world, overrides: list[str], steps: int):
    """(the step ``resume=`` restored, the losses of the next ``steps`` steps)."""
    tr = trainer_for(overrides)
    tr.resume()
    return tr.step, [tr.train_step()["loss"] for _ in range(steps)]


def truncate_and_die(directory: str) -> None:
    """A crash in the middle of a checkpoint write: every DCP data file in ``directory`` cut to half its size,
    then SIGKILL of this process (no .metadata, no commit)."""
    import os
    import signal

    for name in os.listdir(directory):
        if name.endswith(".distcp"):
            path = os.path.join(directory, name)
            os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def rank_params(model) -> tuple[dict, dict]:
    """(name -> a copy of each parameter this rank holds, and of each router's aux-loss-free bias; name -> its TP
    shard (dim, first global index, global size)) for comparing a layout with the single-process run."""
    params, shards = {}, {}
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{pname}" if mod_name else pname
            params[name] = p.detach().clone()
            if pname in getattr(module, "tp_shard", {}):
                shards[name] = module.tp_shard[pname]
        for bname, b in module.named_buffers(recurse=False):  # the aux-loss-free biases, updated from loads
            if bname == "bias":
                params[f"{mod_name}.{bname}"] = b.detach().clone()
    return params, shards
