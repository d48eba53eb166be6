"""Per-GPU parameter, gradient, optimizer and activation memory of a layout (pure arithmetic over the config).

Placement follows the executor (``hai.pipeline.executor.split_model``): the model is cut into ``num_stages`` stages by
``stage_layer_split``; a rank holds ``rank_stages(schedule, pp, rank)`` (DualPipe: stages r and PP-1-r, hence 2x
parameters); the embedding lives on the rank(s) holding stage 0 and on those holding the last stage when MTP is on
(MTP re-embeds); the final norm, the head and the MTP modules live with the last stage. Routed-expert weights are
sharded 1/ep; everything else is replicated over dp. ZeRO-1 shards fp32 master weights and AdamW moments 1/dp (dense)
and 1/edp (experts).

Activation formula (elements per token per layer, stored for the backward, ``ACT_BYTES`` each unless noted;
D hidden, H heads, N/R/V nope/rope/value head dims, Q q_lora_rank, C kv_lora_rank, E experts, k top-k, F expert width,
Fs = n_shared x F, I dense width):

- attention, no recompute: D (norm input) + D (norm output) + 2Q (q latent, its norm) + (C+R) + C (kv latent, its norm)
  + 2H(N+R) (q, k after RoPE) + HV (v) + HV (attention output) + 2H (fp32 log-sum-exp);
- attention, V3 recompute (RMSNorm and MLA up-projections recomputed in the backward): D + Q + (C+R) + HV + 2H;
- MoE FFN: D (norm input) + [D (norm output), dropped by recompute] + 2E (fp32 router scores) + 3Fs (shared expert
  w1/w3 outputs and SwiGLU output) + k x (D dispatched row + 3F + D expert output kept for the gate gradient);
  routed rows are counted on average (balanced routing: a rank receives k rows per token it sends);
- dense FFN: D + [D] + 3I;
- last stage: bf16 logits V per token for the head and for each MTP depth (plus the MTP block and its 3D inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from hai.accounting import attention_params, dense_mlp_params
from hai.config import Config, ModelConfig
from hai.parallel.topology import stage_layer_split
from hai.pipeline.schedules import Kind, build_schedule, num_stages, param_copies, rank_stages

__all__ = ["ACT_BYTES", "GRAD_BYTES", "StageParams", "stage_params", "rank_params", "worst_rank_params",
           "layer_act_elems", "layer_act_parts", "stage_act_bytes", "peak_act_bytes", "memory_report", "GB"]

ACT_BYTES = 2  # stored activations in bf16 (V3 additionally cached some Linear inputs in FP8: not modelled)
GRAD_BYTES = 4  # gradients accumulated in fp32 over micro-batches (as V3)
GB = 1e9


@dataclass(frozen=True)
class StageParams:
    """Parameter elements of one rank: ``dense`` replicated over dp, ``expert`` = this rank's 1/ep share."""

    dense: int
    expert: int

    def __add__(self, o: "StageParams") -> "StageParams":
        return StageParams(self.dense + o.dense, self.expert + o.expert)

    @property
    def total(self) -> int:
        return self.dense + self.expert


def _block_params(m: ModelConfig, moe: bool, ep: int) -> StageParams:
    D = m.hidden_size
    dense = 2 * D + attention_params(m)
    if not moe:
        return StageParams(dense + dense_mlp_params(m), 0)
    F = m.moe_intermediate_size
    dense += m.n_routed_experts * D + m.n_shared_experts * 3 * D * F
    return StageParams(dense, m.n_routed_experts // ep * 3 * D * F)


def _is_moe(m: ModelConfig, layer: int) -> bool:
    return m.is_moe and layer >= m.first_k_dense_replace


def stage_layers(m: ModelConfig, n_stages: int) -> list[range]:
    out, start = [], 0
    for n in stage_layer_split(m.num_layers, n_stages):
        out.append(range(start, start + n))
        start += n
    return out


def stage_params(m: ModelConfig, n_stages: int, stage: int, ep: int) -> StageParams:
    """Layers of one stage (without embedding / head / MTP, which :func:`rank_params` places)."""
    total = StageParams(0, 0)
    for i in stage_layers(m, n_stages)[stage]:
        total = total + _block_params(m, _is_moe(m, i), ep)
    return total


def rank_params(cfg: Config, rank: int) -> StageParams:
    """Parameter elements held by pipeline rank ``rank`` (every stage it holds, embedding/head/MTP once)."""
    m, p = cfg.model, cfg.parallel
    n_st = num_stages(p.schedule, p.pp)
    stages = rank_stages(p.schedule, p.pp, rank)
    total = StageParams(0, 0)
    for s in stages:
        total = total + stage_params(m, n_st, s, p.ep)
    D, V = m.hidden_size, m.vocab_size
    has_first, has_last = 0 in stages, n_st - 1 in stages
    if has_first or (has_last and m.mtp_depth > 0):
        total = total + StageParams(V * D, 0)
    if has_last:
        total = total + StageParams(D + V * D, 0)  # final norm + head
        mtp = _block_params(m, m.is_moe, p.ep) + StageParams(3 * D + 2 * D * D, 0)
        for _ in range(m.mtp_depth):
            total = total + mtp
    return total


def worst_rank_params(cfg: Config) -> tuple[int, StageParams]:
    """(pipeline rank, its parameters) of the rank holding the most parameter bytes."""
    ranks = [(r, rank_params(cfg, r)) for r in range(cfg.parallel.pp)]
    return max(ranks, key=lambda x: x[1].total)


# ---------------------------------------------------------------- activations


def layer_act_parts(m: ModelConfig, moe: bool, recompute: bool) -> dict[str, float]:
    """Stored activation elements per token of one block, by part (see the module docstring for the formula)."""
    D, H = m.hidden_size, m.num_heads
    N, R, V, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    Q = m.q_lora_rank or 0
    if recompute:
        attn = D + Q + (C + R) + H * V + 2 * H
    else:
        attn = 2 * D + 2 * Q + (C + R) + C + 2 * H * (N + R) + 2 * H * V + 2 * H
    norm = D if recompute else 2 * D
    if not moe:
        return {"attention": attn, "ffn": norm + 3 * m.intermediate_size, "routed_rows": 0}
    F = m.moe_intermediate_size
    return {"attention": attn, "ffn": norm + 2 * m.n_routed_experts + 3 * m.n_shared_experts * F,
            "routed_rows": m.n_activated_experts * (2 * D + 3 * F)}


def layer_act_elems(m: ModelConfig, moe: bool, recompute: bool) -> float:
    """Stored activation elements per token of one block (the sum of :func:`layer_act_parts`)."""
    return sum(layer_act_parts(m, moe, recompute).values())


def stage_act_bytes(cfg: Config, stage: int, recompute: bool) -> float:
    """Activation bytes of one micro-batch (micro_batch_size x seq_len tokens) through one stage chunk."""
    m, p = cfg.model, cfg.parallel
    n_st = num_stages(p.schedule, p.pp)
    elems = sum(layer_act_elems(m, _is_moe(m, i), recompute) for i in stage_layers(m, n_st)[stage])
    if stage == n_st - 1:
        elems += m.vocab_size  # head logits
        elems += m.mtp_depth * (layer_act_elems(m, m.is_moe, recompute) + 3 * m.hidden_size + m.vocab_size)
    return elems * ACT_BYTES * cfg.train.micro_batch_size * cfg.train.seq_len


@lru_cache(maxsize=8)
def _schedule(name: str, pp: int, n_micro: int) -> tuple[tuple, ...]:
    return tuple(tuple(a for a in acts if a.is_compute) for acts in build_schedule(name, pp, n_micro))


def peak_act_bytes(cfg: Config, n_micro: int, recompute: bool) -> tuple[float, int]:
    """(peak bytes, rank): the simulator's live-activation count in program order, weighted by each stage's bytes."""
    p = cfg.parallel
    n_st = num_stages(p.schedule, p.pp)
    w = [stage_act_bytes(cfg, s, recompute) for s in range(n_st)]
    if p.pp == 1:
        return w[0], 0
    best = (0.0, 0)
    for rank, acts in enumerate(_schedule(p.schedule, p.pp, n_micro)):
        live = peak = 0.0
        for a in acts:
            live += sum(w[x.stage] for x in a.parts if x.kind is Kind.F)
            peak = max(peak, live)
            live -= sum(w[x.stage] for x in a.parts if x.kind in (Kind.W, Kind.BW))
        best = max(best, (peak, rank))
    return best


def memory_report(cfg: Config, n_micro: int) -> dict:
    """Per-GPU memory (bytes) of the worst pipeline rank, with and without V3's recompute."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    rank, prm = worst_rank_params(cfg)
    wbytes = 4 if m.precision == "fp32" else 2
    moment_bytes = 2 if t.bf16_moments else 4
    opt_per_elem = 4 + 2 * moment_bytes  # fp32 master + two moments
    edp = p.dp // p.ep
    optimizer = opt_per_elem * (prm.dense / p.dp + prm.expert / edp)
    static = {"parameters": prm.total * wbytes, "gradients": prm.total * GRAD_BYTES, "optimizer": optimizer}
    act = {}
    for name, rc in (("recompute", True), ("no_recompute", False)):
        peak, act_rank = peak_act_bytes(cfg, n_micro, rc)
        per_layer = {k: v * ACT_BYTES for k, v in layer_act_parts(m, m.is_moe, rc).items()}
        act[name] = {"bytes": peak, "rank": act_rank, "moe_layer_bytes_per_token": per_layer}
    static_total = sum(static.values())
    capacity = cfg.cluster.memory_gb * GB
    return {
        "worst_param_rank": rank,
        "param_copies": param_copies(p.schedule),
        "params_per_gpu": {"dense": prm.dense, "expert": prm.expert, "total": prm.total},
        "bytes": static,
        "bytes_per_param": {"weights": wbytes, "gradients": GRAD_BYTES, "optimizer_master_and_moments": opt_per_elem},
        "activations": act,
        "total_recompute": static_total + act["recompute"]["bytes"],
        "total_no_recompute": static_total + act["no_recompute"]["bytes"],
        "capacity": capacity,
        "fits_recompute": static_total + act["recompute"]["bytes"] <= capacity,
        "fits_no_recompute": static_total + act["no_recompute"]["bytes"] <= capacity,
    }
