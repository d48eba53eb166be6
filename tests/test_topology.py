"""Rank layout arithmetic, and the production 2048-rank topology built with the fake backend in one process."""

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

from hai.config.compose import compose
from hai.parallel import Topology, stage_layer_split


def _v3():
    return Topology.from_config(compose(["model=deepseek_v3_671b", "cluster=h800_2048", "parallel=v3_2048",
                                         "train=v3_pretrain"]))


def test_rank_order_pp_edp_ep():
    topo = _v3()
    assert topo.coords(1234) == {"pp": 9, "dp": 82, "cp": 0, "tp": 0, "edp": 1, "ep": 18, "f": 82}
    assert topo.group_ranks("ep", 1234) == list(range(1216, 1280))  # 64 consecutive ranks
    assert sorted({topo.node_of(r) for r in topo.group_ranks("ep", 1234)}) == list(range(152, 160))  # 8 nodes
    assert topo.group_ranks("edp", 1234) == [1170, 1234]
    assert topo.group_ranks("pp", 1234) == [82 + 128 * s for s in range(16)]
    assert topo.group_ranks("dp", 1234) == list(range(1152, 1280))
    for r in range(topo.world_size):  # coords and rank_of are inverse
        c = topo.coords(r)
        assert topo.rank_of(c["pp"], c["edp"], c["ep"]) == r


def test_rank_order_with_tp():
    """V3 with tp=4 x pp=8: tp innermost (a TP group is 4 consecutive ranks of one node), dp groups stride 4, EP
    groups 64 consecutive ranks of a stage (8 nodes: tokens from every TP rank), edp the same ep index."""
    cfg = compose(["model=deepseek_v3_671b", "cluster=h800_2048", "parallel=v3_2048", "train=v3_pretrain",
                   "model.precision=bf16", "parallel.pp=8", "parallel.dp=64", "parallel.tp=4",
                   "parallel.sequence_parallel=true"])
    topo = Topology.from_config(cfg)
    assert topo.world_size == 2048 and topo.stage_size == 256 and topo.edp == 4
    r = 1234  # stage 4, position 210 = dp 52 x 4 + tp 2 = edp 3 x 64 + ep 18
    assert topo.coords(r) == {"pp": 4, "dp": 52, "cp": 0, "tp": 2, "edp": 3, "ep": 18, "f": 210}
    assert topo.group_ranks("tp", r) == [1232, 1233, 1234, 1235]
    assert len({topo.node_of(x) for x in topo.group_ranks("tp", r)}) == 1
    assert topo.group_ranks("dp", r) == [1024 + 4 * d + 2 for d in range(64)]
    assert topo.group_ranks("ep", r) == list(range(1216, 1280))
    assert topo.group_ranks("edp", r) == [1024 + 64 * e + 18 for e in range(4)]
    assert topo.group_ranks("pp", r) == [256 * s + 210 for s in range(8)]
    for x in range(0, topo.world_size, 7):
        c = topo.coords(x)
        assert topo.rank_of(c["pp"], c["edp"], c["ep"]) == x == topo.rank_of_dp(c["pp"], c["dp"], c["tp"])


def test_v3_stage_split():
    split = stage_layer_split(61, 16)  # the outer stages also hold embedding / head+MTP: they get the short share
    assert sum(split) == 61 and split[0] == split[-1] == 3 and max(split) - min(split) == 1
    assert stage_layer_split(8, 4) == [2, 2, 2, 2]


def test_fake_backend_2048_meshes():
    topo = _v3()
    dist.init_process_group("fake", rank=1234, world_size=2048, store=FakeStore())
    try:
        mesh = topo.build_meshes()
        assert mesh.mesh_dim_names == ("pp", "edp", "ep") and tuple(mesh.shape) == (16, 2, 64)
        for axis in ("pp", "dp", "edp", "ep"):
            sub = mesh[axis]
            assert sub.mesh.flatten().tolist() == topo.group_ranks(axis, 1234), axis
            assert dist.get_world_size(sub.get_group()) == len(topo.group_ranks(axis, 1234))
        assert mesh["ep"].get_local_rank() == 18 and mesh["pp"].get_local_rank() == 9
    finally:
        dist.destroy_process_group()
