"""Per-GPU parameter, gradient, optimizer and activation memory of a layout (pure arithmetic over the config).

Placement follows the executor (``hai.pipeline.executor.split_model``): the model is cut into ``num_stages`` stages by
``stage_layer_split``; a rank holds ``rank_stages(schedule, pp, rank)`` (DualPipe: stages r and PP-1-r, hence 2x
parameters); the embedding lives on the rank(s) holding stage 0 and on those holding the last stage when MTP is on
(MTP re-embeds); the final norm, the head and the MTP modules live with the last stage. Routed-expert weights are
sharded 1/ep; everything else is replicated over dp. ZeRO-1 shards fp32 master weights and AdamW moments 1/dp (dense)
and 1/edp (experts).

Activations are itemized per token and layer: every tensor kept for the backward, its elements and its storage
bytes (:func:`act_items`; D hidden, H heads, N/R/V nope/rope/value head dims, Q q_lora_rank, C kv_lora_rank, E
experts, k top-k, F expert width, Fs = n_shared x F, I dense width). Three storage policies:

- ``bf16``: every kept tensor in bf16 (fp32 for fp32 models), nothing recomputed;
- ``bf16_recompute``: + V3's recompute of every RMSNorm and the MLA up-projections in the backward (only the block
  inputs, the q / kv latents, the attention output and the log-sum-exp are kept in attention);
- ``v3`` (DeepSeek-V3 sec. 3.3.2-3.3.3, the plan's total for ``model.precision=fp8``; ``bf16`` otherwise, which is
  what HAI's eager path keeps): + Linear inputs cached in FP8 with
  fine-grained scales (1 + 4/128 B), the attention output (the input of the output projection) in E5M6 (1.5 B), the
  SwiGLU inputs cached in FP8 with the SwiGLU output recomputed in the backward.

Routed rows are counted on average (balanced routing: a GPU receives k rows per token it sends). One assumption V3
did not publish matters: whether each routed expert's output row is kept for the gradient of its gate (D bf16
elements per row, ``expert output (gate grad)``). It is kept here; the report prints how much it weighs.
The last stage adds the logits (V per token, bf16) for the head and each MTP depth, and the MTP blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from hai.plan.accounting import attention_params, dense_mlp_params
from hai.config import Config, ModelConfig
from hai.parallel.layout import stage_layers
from hai.pipeline.schedules import Kind, build_schedule, num_stages, param_copies, rank_stages

__all__ = ["ACT_BYTES", "ACT_POLICIES", "GRAD_BYTES", "StageParams", "stage_params", "rank_params",
           "worst_rank_params", "act_items", "layer_act_bytes", "layer_act_parts", "stage_act_bytes", "peak_act_bytes",
           "headline_policy", "memory_report", "GB"]

ACT_BYTES = 2  # stored activations in bf16 unless a policy says otherwise (fp32 models: 4)
FP8_BYTES = 1 + 4 / 128  # e4m3 + one fp32 scale per 128 elements
E5M6_BYTES = 1.5  # V3's format for the attention output
ACT_POLICIES = ("bf16", "bf16_recompute", "v3")
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


def is_moe_layer(m: ModelConfig, layer: int) -> bool:
    return m.is_moe and layer >= m.first_k_dense_replace


def stage_params(m: ModelConfig, n_stages: int, stage: int, ep: int) -> StageParams:
    """Layers of one stage (without embedding / head / MTP, which :func:`rank_params` places)."""
    total = StageParams(0, 0)
    for i in stage_layers(m.num_layers, n_stages)[stage]:
        total = total + _block_params(m, is_moe_layer(m, i), ep)
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


def act_items(m: ModelConfig, moe: bool, policy: str, gate_rows: bool = True) -> list[tuple[str, str, float, float]]:
    """(part, tensor, elements per token, bytes per element) kept for the backward by one block under ``policy``
    (``gate_rows=False``: expert output rows not kept, i.e. recomputed for the gate gradient)."""
    if policy not in ACT_POLICIES:
        raise ValueError(f"activation policy {policy!r} is not one of {ACT_POLICIES}")
    D, H = m.hidden_size, m.num_heads
    N, R, V, C, Q = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank, m.q_lora_rank or 0
    a = 4.0 if m.precision == "fp32" else float(ACT_BYTES)
    rc, v3 = policy != "bf16", policy == "v3"
    lin = FP8_BYTES if v3 else a  # a Linear's input
    swi = FP8_BYTES if v3 else a  # SwiGLU inputs
    items = [("attention", "block input (norm input)", D, a),
             ("attention", "norm output (q/kv down-proj input)", 0 if rc else D, lin),
             ("attention", "q latent", Q, a),
             ("attention", "q latent normed (q up-proj input)", 0 if rc or not Q else Q, lin),
             ("attention", "kv latent + rope key", C + R, a),
             ("attention", "kv latent normed (kv up-proj input)", 0 if rc else C, lin),
             ("attention", "q, k after RoPE", 0 if rc else 2 * H * (N + R), a),
             ("attention", "v", 0 if rc else H * V, a),
             ("attention", "attention output (out-proj input)", H * V, E5M6_BYTES if v3 else lin),
             ("attention", "log-sum-exp (fp32)", H, 4.0),
             ("ffn", "ffn norm input", D, a),
             ("ffn", "ffn norm output (router/expert input)", 0 if rc else D, lin)]
    if not moe:
        I = m.intermediate_size
        return items + [("ffn", "SwiGLU inputs", 2 * I, swi), ("ffn", "SwiGLU output (down-proj input)",
                                                                0 if v3 else I, lin)]
    F, Fs, k = m.moe_intermediate_size, m.n_shared_experts * m.moe_intermediate_size, m.n_activated_experts
    return items + [("ffn", "router scores (fp32)", m.n_routed_experts, 4.0),
                    ("ffn", "shared SwiGLU inputs", 2 * Fs, swi),
                    ("ffn", "shared SwiGLU output (down-proj input)", 0 if v3 else Fs, lin),
                    ("routed_rows", "dispatched rows (w1/w3 input)", k * D, lin),
                    ("routed_rows", "SwiGLU inputs", k * 2 * F, swi),
                    ("routed_rows", "SwiGLU output (w2 input)", 0 if v3 else k * F, lin),
                    ("routed_rows", "expert output (gate grad)", k * D if gate_rows else 0, a)]


def layer_act_parts(m: ModelConfig, moe: bool, policy: str) -> dict[str, float]:
    """Stored activation bytes per token of one block, by part (attention, ffn, routed_rows)."""
    out = {"attention": 0.0, "ffn": 0.0, "routed_rows": 0.0}
    for part, _, n, b in act_items(m, moe, policy):
        out[part] += n * b
    return out


def layer_act_bytes(m: ModelConfig, moe: bool, policy: str, gate_rows: bool = True) -> float:
    """Stored activation bytes per token of one block."""
    return sum(n * b for _, _, n, b in act_items(m, moe, policy, gate_rows))


def stage_act_bytes(cfg: Config, stage: int, policy: str, gate_rows: bool = True) -> float:
    """Activation bytes of one micro-batch (micro_batch_size x seq_len tokens) through one stage chunk."""
    m, p = cfg.model, cfg.parallel
    n_st = num_stages(p.schedule, p.pp)
    per_token = sum(layer_act_bytes(m, is_moe_layer(m, i), policy, gate_rows) for i in stage_layers(m.num_layers, n_st)[stage])
    if stage == n_st - 1:
        a = 4 if m.precision == "fp32" else ACT_BYTES
        logits = m.vocab_size * a
        mtp_block = layer_act_bytes(m, m.is_moe, policy, gate_rows)
        per_token += logits + m.mtp_depth * (mtp_block + 3 * m.hidden_size * a + logits)
    return per_token * cfg.train.micro_batch_size * cfg.train.seq_len


@lru_cache(maxsize=8)
def _schedule(name: str, pp: int, n_micro: int) -> tuple[tuple, ...]:
    return tuple(tuple(a for a in acts if a.is_compute) for acts in build_schedule(name, pp, n_micro))


def rank_act_peaks(cfg: Config, n_micro: int, policy: str, gate_rows: bool = True) -> list[float]:
    """Peak activation bytes of every pipeline rank: the live-activation count in program order (an FB pair holds
    its new forward before its backward frees), weighted by each stage's bytes."""
    p = cfg.parallel
    n_st = num_stages(p.schedule, p.pp)
    w = [stage_act_bytes(cfg, s, policy, gate_rows) for s in range(n_st)]
    if p.pp == 1:
        return [w[0]]
    peaks = []
    for acts in _schedule(p.schedule, p.pp, n_micro):
        live = peak = 0.0
        for a in acts:
            live += sum(w[x.stage] for x in a.parts if x.kind is Kind.F)
            peak = max(peak, live)
            live -= sum(w[x.stage] for x in a.parts if x.kind in (Kind.W, Kind.BW))
        peaks.append(peak)
    return peaks


def peak_act_bytes(cfg: Config, n_micro: int, policy: str, gate_rows: bool = True) -> tuple[float, int]:
    """(peak bytes, rank) over the pipeline ranks."""
    peaks = rank_act_peaks(cfg, n_micro, policy, gate_rows)
    return max((b, r) for r, b in enumerate(peaks))


def headline_policy(m: ModelConfig) -> str:
    """The storage policy the plan's total uses: V3's for FP8 models (the published run); otherwise what HAI's eager
    path keeps (no recompute, activations in the model's dtype)."""
    return "v3" if m.precision == "fp8" else "bf16"


def static_bytes(cfg: Config, prm: StageParams) -> dict[str, float]:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    wbytes = 4 if m.precision == "fp32" else 2
    opt_per_elem = 4 + 2 * (2 if t.bf16_moments else 4)  # fp32 master + two moments
    return {"parameters": prm.total * wbytes, "gradients": prm.total * GRAD_BYTES,
            "optimizer": opt_per_elem * (prm.dense / p.dp + prm.expert / (p.dp // p.ep))}


def memory_report(cfg: Config, n_micro: int, policy: str | None = None) -> dict:
    """Per-GPU memory (bytes) under each activation storage policy (``policy``: the one the total uses; default
    :func:`headline_policy`). A policy's total is the largest over pipeline ranks of that rank's parameters, gradients
    and optimizer shard plus its own activation peak; each is reported with its rank and both parts."""
    m, p = cfg.model, cfg.parallel
    static_r = [sum(static_bytes(cfg, rank_params(cfg, r)).values()) for r in range(p.pp)]
    rank, prm = worst_rank_params(cfg)
    static = static_bytes(cfg, prm)
    capacity = cfg.cluster.memory_gb * GB
    head = policy or headline_policy(m)

    def worst(peaks: list[float]) -> dict:
        total, r = max((static_r[r] + peaks[r], r) for r in range(p.pp))
        return {"total": total, "rank": r, "static": static_r[r], "activations": peaks[r], "fits": total <= capacity}

    act = {}
    for name in ACT_POLICIES:
        peaks = rank_act_peaks(cfg, n_micro, name)
        peak = max(peaks)
        act[name] = {"peak": peak, "peak_rank": peaks.index(peak), **worst(peaks),
                     "moe_layer_bytes_per_token": layer_act_parts(m, m.is_moe, name)}
    without = worst(rank_act_peaks(cfg, n_micro, head, gate_rows=False))  # the unpublished assumption
    return {
        "worst_param_rank": rank,
        "param_copies": param_copies(p.schedule),
        "params_per_gpu": {"dense": prm.dense, "expert": prm.expert, "total": prm.total},
        "bytes": static,
        "bytes_per_param": {"weights": static["parameters"] / max(prm.total, 1), "gradients": GRAD_BYTES,
                            "optimizer_master_and_moments": 4 + 2 * (2 if cfg.train.bf16_moments else 4)},
        "activations": act,
        "policy": head,
        "total": act[head]["total"],
        "fits": act[head]["fits"],
        "capacity": capacity,
        "without_gate_grad_rows": without,
        "items_per_token": [{"part": part, "tensor": n, "elements": e, "bytes_per_element": b}
                            for part, n, e, b in act_items(m, m.is_moe, head) if e],
    }
