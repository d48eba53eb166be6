"""The one topology object: degrees, rank layout, node map and named device meshes.

Rank order is pp outermost, then edp, then ep innermost::

    rank = (pp_idx * edp + edp_idx) * ep + ep_idx        dp_idx = edp_idx * ep + ep_idx

so an EP group is a run of ``ep`` consecutive ranks, i.e. whole consecutive nodes (or a slice of one node), and a
data-parallel group is the ``dp`` consecutive ranks of one pipeline stage. Everything is validated in
:meth:`Topology.from_config` before any process group exists; the meshes are built by :meth:`build_meshes` once the
process group is initialized. Leaves receive only the group they need (``mesh["dp"].get_group()`` etc.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hai.config import Config, ConfigError
from hai.parallel.layout import check_schedule, num_stages, stage_layer_split

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["Topology", "Meshes", "AXES"]

AXES = ("pp", "dp", "edp", "ep")


def _fail(msg: str) -> None:
    raise ConfigError(msg)


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int
    pp: int
    dp: int
    ep: int
    node_limit: int = 0
    device: str = "cpu"
    backend: str = "gloo"

    # ------------------------------------------------------------------ construction / validation
    @classmethod
    def from_config(cls, cfg: Config) -> "Topology":
        c, p, m = cfg.cluster, cfg.parallel, cfg.model
        world = c.nodes * c.gpus_per_node
        if world != p.pp * p.dp:
            _fail(f"world size {world} (cluster.nodes={c.nodes} x cluster.gpus_per_node={c.gpus_per_node}) != "
                  f"parallel.pp={p.pp} x parallel.dp={p.dp} = {p.pp * p.dp}: set parallel.dp={world // p.pp} "
                  f"or change the cluster" if world % p.pp == 0 else
                  f"world size {world} (cluster.nodes={c.nodes} x cluster.gpus_per_node={c.gpus_per_node}) is not "
                  f"divisible by parallel.pp={p.pp}: choose pp dividing {world}")
        if p.dp % p.ep:
            _fail(f"parallel.ep={p.ep} does not divide parallel.dp={p.dp}: experts are sharded over ep ranks out of "
                  f"the dp ranks of a stage; choose ep among the divisors of {p.dp}")
        if p.ep > 1 and not m.is_moe:
            _fail(f"parallel.ep={p.ep} but model {m.name!r} has no routed experts: set parallel.ep=1")
        if m.is_moe and m.n_routed_experts % p.ep:
            _fail(f"parallel.ep={p.ep} does not divide model.n_routed_experts={m.n_routed_experts}: each EP rank "
                  f"holds n_routed_experts/ep experts; choose ep among the divisors of {m.n_routed_experts}")
        if p.ep % c.gpus_per_node and c.gpus_per_node % p.ep:
            _fail(f"parallel.ep={p.ep} neither fills whole nodes nor fits in one (cluster.gpus_per_node="
                  f"{c.gpus_per_node}): choose ep as a multiple or a divisor of {c.gpus_per_node}")
        stage_layer_split(m.num_layers, p.pp)
        topo = cls(c.nodes, c.gpus_per_node, p.pp, p.dp, p.ep, p.node_limit, c.device,
                       _resolve_backend(c.backend, c.device))
        topo._check_node_limit(cfg)
        _check_batch(cfg)
        return topo

    def _check_node_limit(self, cfg: Config) -> None:
        m, M = cfg.model, self.node_limit
        if M == 0 or not m.is_moe:
            return
        n_nodes = self.ep_nodes
        if M > n_nodes:
            _fail(f"parallel.node_limit={M} exceeds the {n_nodes} node(s) of an EP group (ep={self.ep}, "
                  f"gpus_per_node={self.gpus_per_node}): set parallel.node_limit <= {n_nodes} (or 0 for unlimited)")
        if m.n_group != n_nodes or m.topk_group != M:
            _fail(f"node-limited routing (parallel.node_limit={M}) needs the router's groups to be the EP group's "
                  f"nodes: set model.n_group={n_nodes} model.topk_group={M} (got n_group={m.n_group}, "
                  f"topk_group={m.topk_group})")

    # ------------------------------------------------------------------ layout
    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def ep_nodes(self) -> int:
        """Nodes spanned by one EP group."""
        return max(1, self.ep // self.gpus_per_node)

    def coords(self, rank: int) -> dict[str, int]:
        pp_idx, rest = divmod(rank, self.dp)
        edp_idx, ep_idx = divmod(rest, self.ep)
        return {"pp": pp_idx, "dp": rest, "edp": edp_idx, "ep": ep_idx}

    def rank_of(self, pp: int, edp: int, ep: int) -> int:
        return (pp * self.edp + edp) * self.ep + ep

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def group_ranks(self, axis: str, rank: int) -> list[int]:
        """The ranks of ``rank``'s group along ``axis`` (in group-rank order)."""
        c = self.coords(rank)
        if axis == "pp":
            return [self.rank_of(s, c["edp"], c["ep"]) for s in range(self.pp)]
        if axis == "dp":
            return [c["pp"] * self.dp + d for d in range(self.dp)]
        if axis == "ep":
            return [self.rank_of(c["pp"], c["edp"], e) for e in range(self.ep)]
        if axis == "edp":
            return [self.rank_of(c["pp"], e, c["ep"]) for e in range(self.edp)]
        raise ValueError(f"axis {axis!r} is not one of {AXES}")

    # ------------------------------------------------------------------ process groups
    def build_meshes(self) -> "Meshes":
        """3-D mesh ("pp", "edp", "ep") plus the flattened "dp" axis; call after init_process_group."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device, (self.pp, self.edp, self.ep), mesh_dim_names=("pp", "edp", "ep"))
        return Meshes(mesh, mesh["edp", "ep"]._flatten("dp"))


class Meshes:
    """The 3-D device mesh and its flattened "dp" mesh: ``meshes[axis]`` for any of pp, dp, edp, ep; other
    attributes are the 3-D mesh's. (The flattened mesh is kept here: torch deprecates slicing a flattened dim back
    out of the root mesh.)"""

    def __init__(self, root: "DeviceMesh", dp: "DeviceMesh"):
        self.root, self.dp = root, dp

    def __getitem__(self, axis):
        return self.dp if axis == "dp" else self.root[axis]

    def __getattr__(self, name):
        if name in ("root", "dp"):  # not set yet (copy, unpickle): no recursion through self.root
            raise AttributeError(name)
        return getattr(self.root, name)


def _resolve_backend(backend: str, device: str) -> str:
    if backend != "auto":
        return backend
    import torch

    return "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"


def _check_batch(cfg: Config) -> None:
    t, p = cfg.train, cfg.parallel
    per_rank = t.global_batch_size // p.dp if t.global_batch_size % p.dp == 0 else None
    if per_rank is None or per_rank % t.micro_batch_size:
        _fail(f"train.global_batch_size={t.global_batch_size} must be divisible by parallel.dp={p.dp} x "
              f"train.micro_batch_size={t.micro_batch_size} = {p.dp * t.micro_batch_size}: adjust one of them")
    n_micro = per_rank // t.micro_batch_size
    if p.micro_batches and p.micro_batches != n_micro:
        _fail(f"parallel.micro_batches={p.micro_batches} but train.global_batch_size={t.global_batch_size} / "
              f"(parallel.dp={p.dp} x train.micro_batch_size={t.micro_batch_size}) gives {n_micro} micro-batches "
              f"per rank: set parallel.micro_batches={n_micro} (or 0) or change the batch sizes")
    if p.pp > 1:
        try:
            check_schedule(p.schedule, p.pp, n_micro)
        except ValueError as e:
            raise ConfigError(f"parallel.schedule={p.schedule} with parallel.pp={p.pp} and {n_micro} micro-batches "
                              f"per rank (train.global_batch_size / (dp x micro_batch_size)): {e}") from None
        stage_layer_split(cfg.model.num_layers, num_stages(p.schedule, p.pp))
    _check_layout(cfg)


def _check_layout(cfg: Config) -> None:
    """An explicit parallel.layout parses and fits the model and the schedule (auto is resolved by the planner)."""
    from hai.parallel.layout import PipelineLayout

    p = cfg.parallel
    if p.layout in ("", "auto"):
        return
    try:
        PipelineLayout.from_config(cfg.model, p.schedule, p.pp, p.layout).specs
    except ValueError as e:
        raise ConfigError(str(e)) from None
