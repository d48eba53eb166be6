"""Apply a parallel layout to a model built on the ``meta`` device, so each rank materializes only what it owns.

The construction path of every run (and of ``hai plan``, which stops before materializing)::

    model = build_model(cfg.model, device="meta")          # the whole architecture, no memory
    placement = parallelize(model, topo, cfg, mesh, rank)   # this rank's layout, still on meta
    materialize(model, device, dtype, seed)                 # allocate + initialize what the rank holds
    optimizer = ZeroAdamW(model.named_parameters(), ...)    # flat buffers, ZeRO-1 shards

:func:`parallelize` applies, in this fixed order:

1. the pipeline split: the modules the rank's stages do not use are dropped (transformer layers become
   ``nn.Identity`` so every kept parameter keeps the single-process model's name); DualPipe's two copies of every
   stage are simply the same stage held by two ranks (:class:`~hai.parallel.layout.PipelineLayout`);
2. expert sharding over "ep": each MoE keeps rows ``[e0, e1)`` of its stacked expert weights
   (:func:`~hai.parallel.expert.shard_experts`), recording the global offset for initialization and checkpoints;
3. the dispatcher swap: the expert-parallel all-to-all dispatcher over the rank's "ep" group;
4. tensor parallelism (``parallel.tp > 1``): this TP rank's slices of the head-, column-, row- and vocabulary-split
   weights, the TP group handed to the modules that communicate (:mod:`hai.parallel.tensor_parallel`);
4b. context parallelism (``parallel.cp > 1``): the CP group handed to the modules that meet the sequence split
   (:mod:`hai.parallel.context_parallel`; no weight is split);
5. the groups over which copies of a parameter (held by several pipeline ranks) sum their gradients.

Initialization (:func:`hai.model.materialize`) is a function of (seed, parameter name, global expert index), so a
rank's shard holds exactly the values of the same slice of the single-process model, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from hai.config import Config
from hai.parallel.layout import PipelineLayout
from hai.parallel.topology import Topology

__all__ = ["Placement", "parallelize", "split_model", "copy_group_ranks"]


@dataclass
class Placement:
    """What :func:`parallelize` decided for one rank."""

    layout: PipelineLayout
    rank: int
    coords: dict[str, int]
    holders: dict[str, tuple[int, ...]]  # parameter name -> pipeline ranks holding it
    copy_groups: dict[tuple[int, ...], object] = field(default_factory=dict)  # holders -> group (this dp index)
    tp_partial: set[str] = field(default_factory=set)  # replicated over tp, gradient summed over tp
    tp_replicated: set[str] = field(default_factory=set)  # held whole by every TP rank (norm counts them once)

    @property
    def stages(self) -> tuple[int, ...]:
        return self.layout.rank_stages(self.coords["pp"])

    def copies(self, name: str) -> int:
        return len(self.holders.get(name, (self.coords["pp"],)))

    def copy_group(self, name: str):
        """The group summing this parameter's gradient over its pipeline copies (None: held once)."""
        return self.copy_groups.get(self.holders.get(name, ()))


def split_model(model: nn.Module, keep: set[str]) -> None:
    """Drop (in place) every top-level unit (``module_of`` name) not in ``keep``; parameter names stay the
    single-process model's."""
    for i in range(len(model.layers)):
        if f"layers.{i}" not in keep:
            model.layers[i] = nn.Identity()
    for name in ("embed", "norm", "head"):
        if name not in keep:
            setattr(model, name, None)
    if "mtp" not in keep:
        model.mtp = nn.ModuleList()


def copy_group_ranks(layout: PipelineLayout, topo: Topology) -> list[tuple[tuple[int, ...], int, list[int]]]:
    """Every (holders, position f in the stage, global ranks) group of parameter copies, in the order every rank
    creates them (f = the position in the stage, (dp x cp + cp) x tp + tp: a copy lives at the same f of each
    holding stage)."""
    units = [f"layers.{i}" for i in range(layout.num_layers)] + ["embed", "norm", "head"]
    units += ["mtp"] if layout.mtp_depth else []
    sets = sorted({layout.holders(u) for u in units if len(layout.holders(u)) > 1})
    n = topo.stage_size
    return [(h, f, [p * n + f for p in h]) for h in sets for f in range(n)]


def _copy_groups(layout: PipelineLayout, topo: Topology, coords: dict[str, int]) -> dict:
    """Collective over the world: create every copy group (all ranks, same order); keep this rank's."""
    import torch.distributed as dist

    mine = {}
    here = coords["f"]
    for holders, f, ranks in copy_group_ranks(layout, topo):
        group = dist.new_group(ranks)
        if f == here and coords["pp"] in holders:
            mine[holders] = group
    return mine


def _ep_meta_group(mesh):
    """Collective over the world: a second communicator over every EP group's ranks (the dispatch's count tables
    and routing rows, ``hai.parallel.expert``); this rank's."""
    import torch.distributed as dist

    ranks = mesh["ep"].mesh  # this rank's EP group; every group: the expert mesh's last axis
    groups = getattr(mesh, "root", mesh).mesh.reshape(-1, ranks.numel()).tolist()
    mine, _ = dist.new_subgroups_by_enumeration(groups)
    return mine


def parallelize(model: nn.Module, topo: Topology, cfg: Config, mesh=None, rank: int = 0) -> Placement:
    """Apply the layout of ``topo`` for global ``rank`` to ``model`` (normally still on ``meta``). With ``mesh``
    (the process groups exist), also swap in the expert-parallel dispatcher and create the copy groups (a
    collective: every rank calls it); without, the model is laid out for accounting only."""
    coords = topo.coords(rank)
    layout = PipelineLayout.from_config(cfg.model, cfg.parallel.schedule, topo.pp, cfg.parallel.layout)
    split_model(model, layout.rank_modules(coords["pp"]))
    if topo.ep > 1:
        from hai.parallel.expert import EPDispatcher, shard_experts

        group = mesh["ep"].get_group() if mesh is not None else None
        meta_group = _ep_meta_group(mesh) if mesh is not None else None
        for moe in model.moe_layers():
            shard_experts(moe, coords["ep"], topo.ep)
            if group is not None:
                moe.dispatcher = EPDispatcher(group, cfg.model.n_routed_experts, gpus_per_node=topo.gpus_per_node,
                                              mode=cfg.parallel.dispatch, fp8=cfg.parallel.fp8_dispatch,
                                              meta_group=meta_group)
    if topo.tp > 1:
        from hai.parallel.tensor_parallel import TPGroup, shard_tensor_parallel

        tp_group = mesh["tp"].get_group() if mesh is not None else None
        shard_tensor_parallel(model, TPGroup(tp_group, topo.tp, coords["tp"], topo.sequence_parallel))
    if topo.cp > 1:
        from hai.parallel.context_parallel import CPGroup, shard_context_parallel

        cp_group = mesh["cp"].get_group() if mesh is not None else None
        shard_context_parallel(model, CPGroup(cp_group, topo.cp, coords["cp"]))
    holders = {n: layout.holders(n) for n, _ in model.named_parameters()}
    placement = Placement(layout, rank, coords, holders)
    if topo.tp > 1:
        from hai.parallel.tensor_parallel import tp_partial, tp_replicated

        names = [n for n, _ in model.named_parameters()]
        placement.tp_partial = {n for n in names if tp_partial(n, topo.sequence_parallel, cfg.train.recompute)}
        placement.tp_replicated = {n for n in names if tp_replicated(n)}
    if mesh is not None and topo.pp > 1:
        placement.copy_groups = _copy_groups(layout, topo, coords)
    return placement
