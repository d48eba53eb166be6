"""Build one rank of a layout through the real construction path on the ``meta`` device and count what it allocates.

The same calls a training rank makes (``build_model`` on meta, :func:`hai.parallel.parallelize` with the rank's
process groups, :class:`hai.parallel.zero.ZeroAdamW` over its parameters), with the fake backend standing in for
the world (``torch.testing._internal.distributed.fake_pg``: groups exist, collectives do nothing), so the 2048-rank
production layout is built in one process in seconds without allocating a byte.
"""

from __future__ import annotations

import contextlib

from hai.config import Config

__all__ = ["constructed_bytes", "fake_world"]


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """A fake-backend process group in this process for the duration (nothing if one already exists)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    if dist.is_initialized():
        yield False
        return
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield True
    finally:
        dist.destroy_process_group()


def constructed_bytes(cfg: Config, rank: int) -> dict:
    """Bytes global ``rank`` allocates for weights, gradients and the optimizer shard, and its parameter elements,
    from the model and optimizer built on meta exactly as ``hai train`` builds them."""
    from hai.model import build_model, materialize, param_dtype
    from hai.parallel.parallelize import parallelize
    from hai.parallel.topology import Topology
    from hai.parallel.zero import ZeroAdamW, ZeroGroups, is_expert_param

    topo = Topology.from_config(cfg)
    with fake_world(rank, topo.world_size) as made:
        mesh = topo.build_meshes() if topo.world_size > 1 else None
        model = build_model(cfg.model, device="meta", recompute=cfg.train.recompute)
        placement = parallelize(model, topo, cfg, mesh, rank)
        materialize(model, "meta", param_dtype(cfg.model), cfg.train.seed, cfg.model.init_std)

        def group(axis):
            return mesh[axis].get_group() if mesh is not None else None

        opt = ZeroAdamW(model.named_parameters(), cfg.train, ZeroGroups(group("dp_cp"), group("edp")), placement)
        dense = sum(p.numel() for n, p in model.named_parameters() if not is_expert_param(n))
        expert = sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n))
        return {"rank": rank, "pp_rank": topo.coords(rank)["pp"], **opt.buffer_bytes(),
                "params": {"dense": dense, "expert": expert, "total": dense + expert}}
