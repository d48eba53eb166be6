"""The one topology object: degrees, rank layout, node map and named device meshes.

Rank order is pp outermost, then dp, then cp, then tp innermost (a TP group is ``tp`` consecutive ranks of one node,
a CP group ``cp`` runs of them, inside the node when cp x tp <= gpus_per_node)::

    rank = pp_idx * (dp * cp * tp) + f        f = (dp_idx * cp + cp_idx) * tp + tp_idx = edp_idx * ep + ep_idx

``f`` indexes the ``dp x cp x tp`` ranks of a pipeline stage. Dense parameters are sharded over tp and replicated
(ZeRO-1 sharded) over the ``dp x cp`` ranks with the same tp index ("dp_cp": the CP ranks hold other positions of the
same sequences, so their gradients are summed like the dp ranks'). The MoE layers see every one of the stage's
``dp x cp x tp`` ranks as a data-parallel rank of its own (with tp > 1 each holds a sequence shard of its tokens:
sequence parallelism; with cp > 1 its zig-zag chunks), so an EP group is a run of ``ep`` consecutive values of f
(whole consecutive nodes, a slice of one, or the TP/CP ranks of one node) and the expert-data-parallel group
("edp") the ranks with the same ep index, of size ``dp * cp * tp / ep`` (Megatron-Core's expert-parallel-over-dp x
cp x tp with expert TP = 1). With tp = cp = 1, f is the dp index and everything is as without them.

Why cp sits between dp and tp: the traffic of an axis is paid where its ranks are. TP communicates several times per
layer with hidden-sized tensors (innermost, NVLink); CP all-gathers the kv latents once per layer and
micro-batch and reduce-scatters their gradients (576 values per position for V3: less than TP, far more than dp,
which communicates once per step in ZeRO-1), so it takes the next NVLink ranks; dp and pp (P2P of one activation per
micro-batch) cross nodes. Everything is validated in :meth:`Topology.from_config` before any process group
exists; the meshes are built by :meth:`build_meshes` once the process group is initialized. Leaves receive only the
group they need (``mesh["dp"].get_group()`` etc.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hai.config import Config, ConfigError
from hai.parallel.layout import check_schedule, num_stages, stage_layer_split

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["Topology", "Meshes", "AXES"]

AXES = ("pp", "dp", "edp", "ep", "tp", "cp", "dp_cp")


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
    tp: int = 1
    sequence_parallel: bool = False
    cp: int = 1

    # ------------------------------------------------------------------ construction / validation
    @classmethod
    def from_config(cls, cfg: Config) -> "Topology":
        c, p, m = cfg.cluster, cfg.parallel, cfg.model
        world = c.nodes * c.gpus_per_node
        model_par = p.pp * p.cp * p.tp
        if world != p.pp * p.dp * p.cp * p.tp:
            dims = f"parallel.pp={p.pp} x parallel.dp={p.dp}" + (f" x parallel.cp={p.cp}" if p.cp > 1 else "") + \
                (f" x parallel.tp={p.tp}" if p.tp > 1 else "")
            model = "pp" + (" x cp" if p.cp > 1 else "") + (" x tp" if p.tp > 1 else "")
            _fail(f"world size {world} (cluster.nodes={c.nodes} x cluster.gpus_per_node={c.gpus_per_node}) != "
                  f"{dims} = {p.pp * p.dp * p.cp * p.tp}: set parallel.dp={world // model_par} or change the "
                  f"cluster" if world % model_par == 0 else
                  f"world size {world} (cluster.nodes={c.nodes} x cluster.gpus_per_node={c.gpus_per_node}) is not "
                  f"divisible by {model} = {model_par}: choose degrees whose product divides {world}")
        _check_tp(cfg)
        _check_cp(cfg)
        stage = p.dp * p.cp * p.tp  # the ranks of one pipeline stage (the MoE's data-parallel ranks)
        if stage % p.ep:
            _fail(f"parallel.ep={p.ep} does not divide parallel.dp={p.dp}" + (f" x parallel.cp={p.cp}" if p.cp > 1
                  else "") + (f" x parallel.tp={p.tp}" if p.tp > 1 else "") + f": experts are sharded over ep ranks "
                  f"out of the {stage} ranks of a stage; choose ep among the divisors of {stage}")
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
                   _resolve_backend(c.backend, c.device), p.tp, p.tp > 1 and p.sequence_parallel, p.cp)
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
        return self.pp * self.dp * self.cp * self.tp

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline stage: dp x cp x tp (the MoE's data-parallel ranks)."""
        return self.dp * self.cp * self.tp

    @property
    def edp(self) -> int:
        return self.stage_size // self.ep

    @property
    def ep_nodes(self) -> int:
        """Nodes spanned by one EP group."""
        return max(1, self.ep // self.gpus_per_node)

    def coords(self, rank: int) -> dict[str, int]:
        pp_idx, f = divmod(rank, self.stage_size)
        dpc, tp_idx = divmod(f, self.tp)
        dp_idx, cp_idx = divmod(dpc, self.cp)
        edp_idx, ep_idx = divmod(f, self.ep)
        return {"pp": pp_idx, "dp": dp_idx, "cp": cp_idx, "tp": tp_idx, "edp": edp_idx, "ep": ep_idx, "f": f}

    def rank_of(self, pp: int, edp: int, ep: int) -> int:
        return pp * self.stage_size + edp * self.ep + ep

    def rank_of_dp(self, pp: int, dp: int, tp: int = 0, cp: int = 0) -> int:
        return pp * self.stage_size + (dp * self.cp + cp) * self.tp + tp

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def local_seq_len(self, seq_len: int) -> int:
        """Positions of a window one rank's residual stream holds: S / cp, and / tp under sequence parallelism."""
        return seq_len // self.cp // (self.tp if self.sequence_parallel else 1)

    def group_ranks(self, axis: str, rank: int) -> list[int]:
        """The ranks of ``rank``'s group along ``axis`` (in group-rank order)."""
        c = self.coords(rank)
        if axis == "pp":
            return [self.rank_of_dp(s, c["dp"], c["tp"], c["cp"]) for s in range(self.pp)]
        if axis == "dp":
            return [self.rank_of_dp(c["pp"], d, c["tp"], c["cp"]) for d in range(self.dp)]
        if axis == "tp":
            return [self.rank_of_dp(c["pp"], c["dp"], t, c["cp"]) for t in range(self.tp)]
        if axis == "cp":
            return [self.rank_of_dp(c["pp"], c["dp"], c["tp"], x) for x in range(self.cp)]
        if axis == "dp_cp":
            return [self.rank_of_dp(c["pp"], d, c["tp"], x) for d in range(self.dp) for x in range(self.cp)]
        if axis == "ep":
            return [self.rank_of(c["pp"], c["edp"], e) for e in range(self.ep)]
        if axis == "edp":
            return [self.rank_of(c["pp"], e, c["ep"]) for e in range(self.edp)]
        raise ValueError(f"axis {axis!r} is not one of {AXES}")

    # ------------------------------------------------------------------ process groups
    def build_meshes(self) -> "Meshes":
        """The 3-D mesh ("pp", "edp", "ep") plus the flattened "dp" axis (tp = cp = 1); with tp or cp > 1 also the
        dense mesh ("pp", "dp", "cp", "tp") and its flattened "dp_cp" axis. Call after init_process_group (a
        collective: every rank builds the same meshes)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device, (self.pp, self.edp, self.ep), mesh_dim_names=("pp", "edp", "ep"))
        if self.tp == 1 and self.cp == 1:
            return Meshes(mesh, mesh["edp", "ep"]._flatten("dp"))
        dense = init_device_mesh(self.device, (self.pp, self.dp, self.cp, self.tp),
                                 mesh_dim_names=("pp", "dp", "cp", "tp"))
        dp_cp = dense["dp", "cp"]._flatten("dp_cp") if self.cp > 1 else None
        return Meshes(mesh, dense["dp"], dense, dp_cp)


class Meshes:
    """``meshes[axis]`` for any of pp, dp, edp, ep (and tp, cp, dp_cp): "edp"/"ep" from the expert mesh (pp, edp,
    ep), "dp", "cp", "tp" (and "pp" with tp or cp > 1) from the dense one; "dp_cp" the dp x cp ranks of a tp index
    (the dp axis when cp = 1); other attributes are the expert mesh's. (The flattened "dp" mesh of tp = cp = 1 and
    "dp_cp" are kept here: torch deprecates slicing a flattened dim back out of the root mesh.)"""

    def __init__(self, root: "DeviceMesh", dp: "DeviceMesh", dense: "DeviceMesh | None" = None,
                 dp_cp: "DeviceMesh | None" = None):
        self.root, self.dp, self.dense, self.dp_cp = root, dp, dense, dp_cp

    def __getitem__(self, axis):
        if axis == "dp":
            return self.dp
        if axis == "dp_cp":
            return self.dp if self.dp_cp is None else self.dp_cp
        if self.dense is not None and axis in ("tp", "cp", "pp"):
            return self.dense[axis]
        if axis in ("tp", "cp"):
            raise KeyError(f"{axis}: this layout has no {'tensor' if axis == 'tp' else 'context'} parallelism "
                           f"(parallel.{axis}=1)")
        return self.root[axis]

    def __getattr__(self, name):
        if name in ("root", "dp", "dense", "dp_cp"):  # not set yet (copy, unpickle): no recursion through self.root
            raise AttributeError(name)
        return getattr(self.root, name)


def _resolve_backend(backend: str, device: str) -> str:
    if backend != "auto":
        return backend
    import torch

    return "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"


def _check_tp(cfg: Config) -> None:
    """Tensor parallelism's arithmetic, and what it does not compose with yet (each refusal names the fix)."""
    c, p, m, t = cfg.cluster, cfg.parallel, cfg.model, cfg.train
    tp = p.tp
    if tp == 1:
        return
    if c.gpus_per_node % tp:
        _fail(f"parallel.tp={tp} does not divide cluster.gpus_per_node={c.gpus_per_node}: a TP group lives inside "
              f"one node (NVLink); choose tp among the divisors of {c.gpus_per_node}")
    for key, value, what in (("model.num_heads", m.num_heads, "attention heads"),
                             ("model.vocab_size", m.vocab_size, "vocabulary rows of the embedding and the head"),
                             ("model.intermediate_size", m.intermediate_size, "dense MLP columns")):
        if value % tp:
            _fail(f"parallel.tp={tp} does not divide {key}={value} (the {what} are split over tp): choose tp among "
                  f"the divisors of {value}")
    shared = m.n_shared_experts * m.moe_intermediate_size
    if m.is_moe and shared % tp:
        _fail(f"parallel.tp={tp} does not divide the shared experts' width model.n_shared_experts x "
              f"model.moe_intermediate_size = {shared}: choose tp among its divisors")
    if m.is_moe and not p.sequence_parallel:
        _fail(f"parallel.tp={tp} with a mixture-of-experts model needs parallel.sequence_parallel=true (each TP rank "
              f"routes its own sequence shard; Megatron-Core has the same rule): add parallel.sequence_parallel=true")
    if p.sequence_parallel and t.seq_len % tp:
        _fail(f"parallel.sequence_parallel shards train.seq_len={t.seq_len} over parallel.tp={tp}: choose a seq_len "
              f"divisible by {tp}")
    if m.precision == "fp8":  # runs, but its match to one device is not established (see the TP tests' note)
        _fail(f"parallel.tp={tp} with model.precision=fp8 is not verified yet (the row-split GEMMs quantize their K "
              f"slices in their own 1x128 tiles and the tiny-model check was 2x looser than FP8-vs-bf16): set "
              f"model.precision=bf16")


def _check_cp(cfg: Config) -> None:
    """Context parallelism's arithmetic (each refusal names the value and the fix)."""
    c, p, t, m = cfg.cluster, cfg.parallel, cfg.train, cfg.model
    cp = p.cp
    if cp == 1:
        return
    if t.seq_len % (2 * cp):
        _fail(f"parallel.cp={cp} splits train.seq_len={t.seq_len} into 2 x cp = {2 * cp} zig-zag chunks (rank i holds "
              f"chunks i and {2 * cp - 1}-i): choose a seq_len divisible by {2 * cp} or a cp with 2 x cp dividing "
              f"{t.seq_len}")
    if p.tp > 1 and p.sequence_parallel and (t.seq_len // cp) % p.tp:
        _fail(f"parallel.sequence_parallel shards each CP rank's train.seq_len/cp = {t.seq_len // cp} positions over "
              f"parallel.tp={p.tp}: choose a seq_len divisible by cp x tp = {cp * p.tp}")
    if t.seq_len > m.max_seq_len:
        _fail(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}: raise model.max_seq_len (with "
              f"YaRN for a context extension: model.rope_factor) or shorten the sequence")


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
