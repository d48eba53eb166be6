"""Per-GPU memory of a layout: what the construction path allocates and what the model code keeps for the backward.

Static bytes. Placement follows :class:`hai.parallel.layout.PipelineLayout` (the executor's and the construction
path's): a rank holds the modules of its stages; routed-expert weights are its 1/ep share, the weights tensor
parallelism splits (heads, MLP columns, vocabulary rows) its 1/tp share. ZeRO-1
(:mod:`hai.parallel.zero`) packs a rank's parameters into buckets keyed by (routed expert or not, matrix or vector,
pipeline holders), splits each kind into gradient buckets of ``train.grad_bucket_elements`` and allocates per
bucket a flat weight buffer (the model's dtype) and a flat fp32 gradient buffer, both padded to ``shard * world``
(:func:`hai.parallel.zero.bucket_layout`; dense buckets over dp, experts over edp), plus the shard's fp32 master
weights and two AdamW moments (fp32, or bf16 with ``train.bf16_moments``).
:func:`static_bytes` computes that from the config alone (parameter counts per placement unit, written out
independently of the model code); ``hai plan`` also builds the rank on the meta device through the real
construction path (:mod:`hai.plan.construct`) and reports both, which agree exactly (tests).

Activations. :func:`act_items` lists, per token, every tensor the model code keeps for the backward of one block
under ``train.recompute`` (none | v3 | full, :mod:`hai.model.recompute`) and ``model.precision``, with its bytes:
``a`` = 2 (bf16/fp8 models) or 4 (fp32) per activation element, FP8 caches 1 byte per element (K padded to 128)
plus one fp32 scale per 128, int64 routing indices, fp32 router scores, log-sum-exps and RMSNorm rstds. Legend:
D hidden, H heads, N/R/V nope/rope/value head dims, Q q_lora_rank, C kv_lora_rank, E experts, k top-k, F expert
width, Fs shared width, I dense width, S sequence, B micro-batch. Routed rows are counted on average (balanced
routing: a GPU receives k rows per token it sends). ``full`` keeps each segment's inputs (torch.utils.checkpoint
holds them outside saved-tensor hooks). The last stage adds the final norm, the logits (bf16 under a bf16 recipe),
their log-sum-exp and targets, and the MTP modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from hai.config import Config, ModelConfig
from hai.parallel.layout import PipelineLayout
from hai.parallel.zero import bucket_layout, split_sizes
from hai.pipeline.schedules import Kind, build_schedule, num_stages, param_copies

__all__ = ["RECOMPUTE_MODES", "GRAD_BYTES", "GB", "StageParams", "UnitParams", "unit_params", "rank_units",
           "rank_params", "worst_rank_params", "rank_buckets", "early_grad_buckets", "static_bytes",
           "checkpoint_staging", "act_items", "layer_act_bytes",
           "stage_act_bytes", "local_config", "rank_act_peaks", "memory_report", "is_moe_layer", "fp8_bytes",
           "act_bytes", "check_fits"]

RECOMPUTE_MODES = ("none", "v3", "full")
GRAD_BYTES = 4  # gradients accumulated in fp32 over micro-batches (as V3)
GB = 1e9


def fp8_bytes(K: int) -> float:
    """Bytes per row of an FP8 1x128 cache of K elements: K padded to 128, 1 byte each + one fp32 scale per 128."""
    Kp = -(-K // 128) * 128
    return Kp * (1 + 4 / 128)


def act_bytes(m: ModelConfig) -> int:
    return 4 if m.precision == "fp32" else 2


def is_moe_layer(m: ModelConfig, layer: int) -> bool:
    return m.is_moe and layer >= m.first_k_dense_replace


# ---------------------------------------------------------------- parameters (written from the paper's shapes)


@dataclass(frozen=True)
class UnitParams:
    """Parameter elements of one placement unit: dense matrices, dense vectors (norm weights), routed-expert
    elements (already this rank's 1/ep share)."""

    matrix: int = 0
    vector: int = 0
    expert: int = 0

    def __add__(self, o: "UnitParams") -> "UnitParams":
        return UnitParams(self.matrix + o.matrix, self.vector + o.vector, self.expert + o.expert)


@dataclass(frozen=True)
class StageParams:
    """Parameter elements of one rank: ``dense`` replicated over dp, ``expert`` = this rank's 1/ep share."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def unit_params(m: ModelConfig, unit: str, ep: int) -> UnitParams:
    """Parameters of a placement unit (``layers.<i>``, ``embed``, ``norm``, ``head``, ``mtp``), summed from
    :func:`unit_tensors`: matrices, norm vectors, routed-expert elements (this rank's 1/ep)."""
    matrix = vector = expert = 0
    for name, n in unit_tensors(m, unit, ep):
        if ".experts." in name:
            expert += n
        elif name.endswith("norm.weight"):
            vector += n
        else:
            matrix += n
    return UnitParams(matrix, vector, expert)


def _layout(cfg: Config) -> PipelineLayout:
    return PipelineLayout.from_config(cfg.model, cfg.parallel.schedule, cfg.parallel.pp, cfg.parallel.layout)


def rank_units(cfg: Config, rank: int) -> list[str]:
    """Placement units of pipeline rank ``rank``, in the model's module order."""
    held = _layout(cfg).rank_modules(rank)
    order = ["embed"] + [f"layers.{i}" for i in range(cfg.model.num_layers)] + ["norm", "head", "mtp"]
    return [u for u in order if u in held and (u != "mtp" or cfg.model.mtp_depth)]


def rank_params(cfg: Config, rank: int) -> StageParams:
    """Parameter elements held by pipeline rank ``rank``."""
    total = UnitParams()
    for u in rank_units(cfg, rank):
        total = total + unit_params(cfg.model, u, cfg.parallel.ep)
    return StageParams(total.matrix + total.vector, total.expert)


def _block_tensors(m: ModelConfig, prefix: str, moe: bool, ep: int) -> list[tuple[str, int]]:
    """(parameter name, elements) of one block, from the paper's shapes (routed experts: this rank's 1/ep)."""
    H, N, R, V, C, D, Q = (m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank,
                           m.hidden_size, m.q_lora_rank)
    a = f"{prefix}attn."
    out = [(f"{prefix}attn_norm.weight", D)]
    out += [(f"{a}wq.weight", D * H * (N + R))] if Q is None else \
        [(f"{a}wq_a.weight", D * Q), (f"{a}q_norm.weight", Q), (f"{a}wq_b.weight", Q * H * (N + R))]
    out += [(f"{a}wkv_a.weight", D * (C + R)), (f"{a}kv_norm.weight", C), (f"{a}wkv_b.weight", C * H * (N + V)),
            (f"{a}wo.weight", H * V * D), (f"{prefix}ffn_norm.weight", D)]
    if not moe:
        return out + [(f"{prefix}ffn.w{i}.weight", D * m.intermediate_size) for i in (1, 2, 3)]
    F, Fs = m.moe_intermediate_size, m.n_shared_experts * m.moe_intermediate_size
    out += [(f"{prefix}ffn.router.weight", m.n_routed_experts * D)]
    out += [(f"{prefix}ffn.experts.w{i}", m.n_routed_experts // ep * D * F) for i in (1, 2, 3)]
    return out + ([(f"{prefix}ffn.shared.w{i}.weight", D * Fs) for i in (1, 2, 3)] if Fs else [])


def unit_tensors(m: ModelConfig, unit: str, ep: int) -> list[tuple[str, int]]:
    """(parameter name, elements) of a placement unit, whole (before tensor parallelism splits any)."""
    D = m.hidden_size
    if unit.startswith("layers."):
        return _block_tensors(m, f"{unit}.", is_moe_layer(m, int(unit.split(".")[1])), ep)
    if unit in ("embed", "head"):
        return [(f"{unit}.weight", m.vocab_size * D)]
    if unit == "norm":
        return [("norm.weight", D)]
    if unit == "mtp":
        out = []
        for d in range(m.mtp_depth):
            p = f"mtp.{d}."
            out += [(f"{p}hnorm.weight", D), (f"{p}enorm.weight", D), (f"{p}proj.weight", 2 * D * D)]
            out += _block_tensors(m, f"{p}block.", m.is_moe, ep) + [(f"{p}norm.weight", D)]
        return out
    raise ValueError(f"unknown placement unit {unit!r}")


def rank_buckets(cfg: Config, rank: int) -> dict[tuple, list[int]]:
    """ZeRO-1 parameter kinds of pipeline rank ``rank`` (``hai.parallel.zero``'s keys): (expert, matrix, holders,
    summed over tp, whole on every TP rank) -> elements of each of its parameters on this rank, in the model's
    order (TP-split weights: their 1/tp)."""
    from hai.parallel.tensor_parallel import tp_partial, tp_replicated, tp_split_dim

    lay, buckets, p = _layout(cfg), {}, cfg.parallel
    tp, sp = p.tp, p.tp > 1 and p.sequence_parallel
    for u in rank_units(cfg, rank):
        h = lay.holders(u)
        for name, n in unit_tensors(cfg.model, u, p.ep):
            expert, matrix = ".experts." in name, not name.endswith("norm.weight")
            split = tp > 1 and tp_split_dim(name) is not None
            partial = tp > 1 and tp_partial(name, sp, cfg.train.recompute)
            whole = tp > 1 and tp_replicated(name)
            key = (expert, matrix, h, partial, whole)
            buckets.setdefault(key, []).append(n // tp if split else n)
    return buckets


def static_bytes(cfg: Config, rank: int) -> dict[str, int]:
    """Bytes the construction path allocates on pipeline rank ``rank``: flat weight and gradient buffers (padded
    ZeRO-1 buckets) and the optimizer shard (master + moments)."""
    p, t = cfg.parallel, cfg.train
    wbytes = act_bytes(cfg.model)
    state = 4 + 2 * (2 if t.bf16_moments else 4)
    out = {"parameters": 0, "gradients": 0, "optimizer": 0}
    for (expert, *_), sizes in rank_buckets(cfg, rank).items():
        for part in split_sizes(sizes, t.grad_bucket_elements):  # gradient buckets, each padded
            n = sum(sizes[i] for i in part)
            shard, padded = bucket_layout(n, p.edp if expert else p.dp * p.cp)  # ZeRO-1 over edp / dp x cp
            out["parameters"] += padded * wbytes
            out["gradients"] += padded * GRAD_BYTES
            out["optimizer"] += shard * state
    return out


def early_grad_buckets(cfg: Config, rank: int) -> list[tuple[int, int]]:
    """(elements, ranks) of each ZeRO-1 gradient bucket of pipeline rank ``rank`` whose reduce-scatter may start
    before the step (``hai.parallel.zero``'s ``early``: summed over dp x cp or edp alone, more than one rank; not
    a pipeline copy, not summed over TP)."""
    p, out = cfg.parallel, []
    for (expert, _, holders, partial, _), sizes in rank_buckets(cfg, rank).items():
        world = p.edp if expert else p.dp * p.cp
        if world > 1 and not partial and len(holders) == 1:
            out += [(sum(sizes[i] for i in part), world)
                    for part in split_sizes(sizes, cfg.train.grad_bucket_elements)]
    return out


def worst_rank_params(cfg: Config) -> tuple[int, StageParams]:
    """(pipeline rank, its parameters) of the rank allocating the most static bytes."""
    r = max(range(cfg.parallel.pp), key=lambda x: sum(static_bytes(cfg, x).values()))
    return r, rank_params(cfg, r)


# ---------------------------------------------------------------- activations


def _attention_items(m: ModelConfig, recompute: str, B: int) -> list[tuple[str, float]]:
    H, N, R, V, C, D, Q = (m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank,
                           m.hidden_size, m.q_lora_rank)
    a, fp8 = act_bytes(m), m.precision == "fp8"
    q_in = H * (N + R) if Q is None else Q
    if recompute == "full":
        return [("block input (checkpointed)", D * a)]
    if recompute == "v3":
        return [("block input (norm input)", D * a), ("q latent" if Q else "q (no q compression)", q_in * a),
                ("kv latent + rope key", (C + R) * a), ("attention output (out-proj input, bf16)", H * V * a),
                ("log-sum-exp (fp32)", 4 * H)]
    items = [("block input + rstd", D * a + 4),
             ("norm output (q/kv down-proj input)", 2 * fp8_bytes(D) if fp8 else D * a)]
    if Q:
        items += [("q latent + rstd", Q * a + 4), ("q latent normed (q up-proj input)", fp8_bytes(Q) if fp8 else Q * a)]
    items += [("kv latent + rope key + rstd", (C + R) * a + 4),
              ("kv latent normed (kv up-proj input)", fp8_bytes(C) if fp8 else C * a),
              ("q, k after RoPE", 2 * H * (N + R) * a), ("v", H * V * a), ("attention output", H * V * a),
              ("log-sum-exp (fp32)", 4 * H), ("RoPE cos/sin tables (fp32)", 4 * R / B)]
    if fp8:
        items.append(("attention output FP8 (out-proj input)", fp8_bytes(H * V)))
    return items


def _router_items(m: ModelConfig, S: int) -> list[tuple[str, float]]:
    k, E = m.n_activated_experts, m.n_routed_experts
    items = [("router scores (fp32)", 4 * E), ("top-k ids, gates, denominator", 8 * k + 4 * k + 4)]
    if m.seq_aux_alpha > 0:
        items.append(("balance loss (fp32 sums, per-sequence f, P)", 4 + 8 * E / S))
    return items


def _ffn_items(m: ModelConfig, moe: bool, recompute: str, S: int) -> list[tuple[str, float]]:
    D, a, fp8 = m.hidden_size, act_bytes(m), m.precision == "fp8"
    swi = (lambda n: 2 * fp8_bytes(n)) if fp8 else (lambda n: 2 * n * a)
    if not moe:
        I = m.intermediate_size
        if recompute == "full":
            return [("ffn input (checkpointed)", D * a)]
        if recompute == "v3":
            return [("ffn norm input", D * a), ("SwiGLU inputs", swi(I))]
        return [("ffn norm input + rstd", D * a + 4), ("ffn norm output (w1/w3 input)", 2 * fp8_bytes(D) if fp8
                                                       else D * a),
                ("SwiGLU inputs", 2 * I * a), ("SwiGLU output (w2 input)", fp8_bytes(I) if fp8 else I * a)]
    k, F, Fs = m.n_activated_experts, m.moe_intermediate_size, m.n_shared_experts * m.moe_intermediate_size
    rows = [("routed-row indices (int64)", 16 * k)]
    if recompute == "full":
        return [("ffn input (checkpointed)", D * a),
                ("dispatched rows + gates (checkpointed)", k * (D * a + 4))] + rows
    router = _router_items(m, S)
    if recompute == "v3":
        items = [("ffn norm input", D * a)] + router
        items += [("shared SwiGLU inputs", swi(Fs))] if Fs else []
        return items + rows + [("dispatched rows (w1/w3 input)", k * (fp8_bytes(D) if fp8 else D * a)),
                               ("routed SwiGLU inputs", k * swi(F)), ("routed gates (fp32)", 4 * k)]
    items = [("ffn norm input + rstd", D * a + 4),
             ("ffn norm output (router/shared input)", D * a + (2 * fp8_bytes(D) if fp8 and Fs else 0))] + router
    if Fs:
        items += [("shared SwiGLU inputs", 2 * Fs * a), ("shared SwiGLU output", fp8_bytes(Fs) if fp8 else Fs * a)]
    return items + rows + [
        ("dispatched rows (w1/w3 input)", k * (2 * fp8_bytes(D) if fp8 else D * a)),
        ("routed SwiGLU inputs", k * 2 * F * a),
        ("routed SwiGLU output (w2 input)", k * (fp8_bytes(F) if fp8 else F * a)),
        ("expert output rows (gate gradient)", k * D * a), ("gates (for the gate product)", k * a)]


def act_items(m: ModelConfig, moe: bool, recompute: str, S: int, B: int) -> list[tuple[str, str, float]]:
    """(part, tensor, bytes per token) kept for the backward by one block under ``recompute`` and the model's
    precision (module docstring)."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"train.recompute={recompute!r} is not one of {list(RECOMPUTE_MODES)}")
    return ([("attention", n, b) for n, b in _attention_items(m, recompute, B)]
            + [("ffn", n, b) for n, b in _ffn_items(m, moe, recompute, S)])


def layer_act_bytes(m: ModelConfig, moe: bool, recompute: str, S: int, B: int) -> float:
    return sum(b for _, _, b in act_items(m, moe, recompute, S, B))


def _main_head_bytes(m: ModelConfig, recompute: str) -> float:
    """Per token, the L item: the final norm's input (+ rstd and its output, the head's input, unless recomputed),
    the logits (in the head's dtype), their fp32 log-sum-exp and the int64 targets."""
    D, V, a = m.hidden_size, m.vocab_size, act_bytes(m)
    return D * a + (0 if recompute == "v3" else 4 + D * a) + V * a + 4 + 8


def _mtp_bytes(m: ModelConfig, recompute: str, S: int, B: int, shares_h: bool) -> float:
    """Per token, the m item (depth k over S-k positions): its input state (the main model's, normed again under
    ``mtp_hidden=post_norm``; shared with L's when both sit on the stage), the embedding of the shifted tokens, the
    two norms and the projection's input unless recomputed, the MTP block, its final norm, head and loss."""
    D, V, a, fp8 = m.hidden_size, m.vocab_size, act_bytes(m), m.precision == "fp8"
    keep = recompute != "v3"
    total = 0.0
    for k in range(1, m.mtp_depth + 1):
        h_in = 0.0
        if k == 1 and m.mtp_hidden == "post_norm":
            h_in = 4 + D * a  # the extra final-norm pass: its rstd and output
        elif k == 1 and not shares_h:
            h_in = D * a
        x = h_in + D * a + (8 + (fp8_bytes(2 * D) if fp8 else 2 * D * a) if keep else 0)
        x += layer_act_bytes(m, m.is_moe, recompute, S, B) + D * a + (4 + D * a if keep else 0) + V * a + 4 + 8
        total += (S - k) / S * x
    return total


# items tensor parallelism splits by heads or columns (1/tp on every rank, with or without SP)
_TP_SPLIT_ITEMS = ("q, k after RoPE", "v", "attention output", "log-sum-exp", "SwiGLU inputs", "SwiGLU output",
                   "shared SwiGLU")
# items kept on the full sequence inside a TP region (the all-gathered region inputs under SP)
_TP_GATHERED_ITEMS = ("q latent", "kv latent", "ffn norm output (w1/w3 input)")


def _tp_layer_bytes(m: ModelConfig, moe: bool, recompute: str, S: int, B: int, tp: int, sp: bool) -> float:
    """Per token of the micro-batch, one block's kept bytes on one TP rank: the head- and column-split items 1/tp;
    the region inputs gathered to the full sequence whole (under v3 the dense MLP's region is entered on the
    residual, which it keeps); the rest 1/tp under SP (sequence shards), whole without; plus, for a MoE with shared
    experts, the gathered input their region keeps. Checked by ``benchmarks/memory.py --only tp``."""
    a = act_bytes(m)
    total = 0.0
    for _, name, b in act_items(m, moe, recompute, S, B):
        if any(name.startswith(k) for k in _TP_SPLIT_ITEMS):
            total += b / tp
        elif any(name.startswith(k) for k in _TP_GATHERED_ITEMS) or (not moe and recompute == "v3" and
                                                                     name == "ffn norm input"):
            total += b
        else:
            total += b / tp if sp else b
    if moe and sp and m.n_shared_experts and recompute != "full":
        total += m.hidden_size * a  # the shared experts' gathered input (v3: the gathered residual)
    return total


def stage_act_bytes(cfg: Config, stage: int, recompute: str | None = None) -> float:
    """Activation bytes of one micro-batch (micro_batch_size x seq_len tokens) through one stage chunk, as the
    layout gives it (embedding, layers, L, m). Under tensor parallelism, per TP rank (:func:`_tp_layer_bytes`; the
    logits 1/tp, the head's gathered input and loss state whole, the rest of L and m 1/tp under SP; measured by
    ``benchmarks/memory.py --only tp``: 0.99-1.03)."""
    m, t, par = cfg.model, cfg.train, cfg.parallel
    mode = recompute or t.recompute
    sp = _layout(cfg).specs[stage]
    S, B = t.seq_len, t.micro_batch_size
    if par.cp > 1:
        return _cp_stage_act_bytes(cfg, stage, mode)
    if par.tp > 1:
        return _tp_stage_act_bytes(cfg, sp, mode, S, B)
    per_token = sum(layer_act_bytes(m, is_moe_layer(m, i), mode, S, B) for i in sp.layers)
    if sp.embed or sp.mtp:
        per_token += 8 * (S + 1) / S  # token ids (int64) kept by the embedding (once per stage)
    if sp.head:
        per_token += _main_head_bytes(m, mode)
    if sp.mtp:
        per_token += _mtp_bytes(m, mode, S, B, shares_h=sp.head and m.mtp_hidden == "pre_norm")
    return per_token * B * S


def local_config(cfg: Config) -> Config:
    """The config of one CP rank's positions: seq_len/cp, no CP."""
    t, p = cfg.train, cfg.parallel
    return dataclasses.replace(cfg, train=dataclasses.replace(t, seq_len=t.seq_len // p.cp),
                               parallel=dataclasses.replace(p, cp=1))


def _cp_stage_act_bytes(cfg: Config, stage: int, recompute: str | None = None) -> float:
    """Activation bytes one CP rank keeps for one micro-batch through one stage chunk: the items of its S/cp
    positions, plus what the code keeps for the whole window (hai/plan/cp.py's docstring). Measured by
    ``benchmarks/memory.py --only cp``."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    mode = recompute or t.recompute
    S, B, cp = t.seq_len, t.micro_batch_size, p.cp
    S_l = S // cp
    local = local_config(cfg)
    total = stage_act_bytes(local, stage, mode)
    a, H = act_bytes(m), m.num_heads // p.tp
    C, R, N, V = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
    sp = _layout(cfg).specs[stage]
    layers = len(sp.layers) + (m.mtp_depth if sp.mtp else 0)
    if mode == "none":  # the whole window's keys: latents (+ rstd), normed c_kv, k, v; the keys' RoPE tables
        per_key = (C + R) * a + 4 + C * a + H * (N + R) * a + H * V * a
        total += layers * (per_key * B * (S - S_l) + 4 * R * S)
    if sp.mtp:  # MTP padded over all S/cp positions (the items count (S/cp - k) of them)
        x = _mtp_bytes(m, mode, S_l, B, shares_h=sp.head and m.mtp_hidden == "pre_norm") * S_l / (S_l - 1)
        total += sum(k for k in range(1, m.mtp_depth + 1)) / S_l * x / m.mtp_depth * B * S_l
    return total


def _tp_stage_act_bytes(cfg: Config, sp, mode: str, S: int, B: int) -> float:
    m, tp, seq = cfg.model, cfg.parallel.tp, cfg.parallel.sequence_parallel
    per_token = sum(_tp_layer_bytes(m, is_moe_layer(m, i), mode, S, B, tp, seq) for i in sp.layers)
    rest = 0.0
    if sp.embed or sp.mtp:
        rest += 8 * (S + 1) / S
    a = act_bytes(m)
    logits = m.vocab_size * a
    if sp.head:  # the head works on the gathered sequence: its input and the loss's per-token state whole
        gathered = m.hidden_size * a + 4 + 8 + (0 if mode == "v3" else 4)
        per_token += logits / tp + gathered
        rest += _main_head_bytes(m, mode) - logits - gathered
    if sp.mtp:
        rest += _mtp_bytes(m, mode, S, B, shares_h=sp.head and m.mtp_hidden == "pre_norm")
    per_token += rest / tp if seq else rest
    return per_token * B * S


@lru_cache(maxsize=8)
def _schedule(name: str, pp: int, n_micro: int) -> tuple[tuple, ...]:
    return tuple(tuple(a for a in acts if a.is_compute) for acts in build_schedule(name, pp, n_micro))


def rank_act_peaks(cfg: Config, n_micro: int, recompute: str | None = None) -> list[float]:
    """Peak activation bytes of every pipeline rank: the live-activation count in program order (an FB pair holds
    its new forward before its backward frees), weighted by each stage's bytes."""
    p = cfg.parallel
    n_st = num_stages(p.schedule, p.pp) if p.pp > 1 else 1
    w = [stage_act_bytes(cfg, s, recompute) for s in range(n_st)]
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


def memory_report(cfg: Config, n_micro: int, recompute: str | None = None) -> dict:
    """Per-GPU memory (bytes) under each recompute mode (``recompute``: the one the total uses; default
    ``train.recompute``). A mode's total is the largest over pipeline ranks of that rank's static bytes plus its own
    activation peak; each is reported with its rank and both parts."""
    m, p = cfg.model, cfg.parallel
    static_r = [static_bytes(cfg, r) for r in range(p.pp)]
    rank, prm = worst_rank_params(cfg)
    capacity = cfg.cluster.memory_gb * GB
    head = recompute or cfg.train.recompute

    def worst(peaks: list[float]) -> dict:
        total, r = max((sum(static_r[r].values()) + peaks[r], r) for r in range(p.pp))
        return {"total": total, "rank": r, "static": sum(static_r[r].values()), "static_items": static_r[r],
                "activations": peaks[r], "fits": total <= capacity}

    act = {}
    for mode in RECOMPUTE_MODES:
        peaks = rank_act_peaks(cfg, n_micro, mode)
        peak = max(peaks)
        act[mode] = {"peak": peak, "peak_rank": peaks.index(peak), **worst(peaks),
                     "moe_layer_bytes_per_token": layer_act_bytes(m, m.is_moe, mode, cfg.train.seq_len,
                                                                  cfg.train.micro_batch_size)}
    return {
        "worst_param_rank": rank,
        "param_copies": param_copies(p.schedule),
        "params_per_gpu": {"dense": prm.dense, "expert": prm.expert, "total": prm.total},
        "bytes": static_r[rank],
        "bytes_per_param": {"weights": act_bytes(m), "gradients": GRAD_BYTES,
                            "optimizer_master_and_moments": 4 + 2 * (2 if cfg.train.bf16_moments else 4)},
        "activations": act,
        "policy": head,
        "precision": m.precision,
        "total": act[head]["total"],
        "fits": act[head]["fits"],
        "capacity": capacity,
        "items_per_token": [{"part": part, "tensor": n, "bytes": b}
                            for part, n, b in act_items(m, m.is_moe, head, cfg.train.seq_len,
                                                        cfg.train.micro_batch_size) if b],
        "checkpoint_staging": checkpoint_staging(cfg, static_r[rank]),
    }


def checkpoint_staging(cfg: Config, static: dict[str, int]) -> dict:
    """Host memory ``train.async_save`` keeps per rank: a copy of what the rank checkpoints, its weights and its
    optimizer shard (pinned on CUDA; hai.checkpoint.async_save). A run measured 1.004x this on the tiny model (RNG
    states and buffers)."""
    t = cfg.train
    on = cfg.cluster.device == "cuda" if t.async_save is None else bool(t.async_save)
    return {"bytes": static["parameters"] + static["optimizer"], "async_save": on}


# ---------------------------------------------------------------- fit before launch


def _variants(cfg: Config) -> list[tuple[str, Config]]:
    """Configs that keep less per GPU: another recompute mode, bf16 moments, twice the pipeline stages."""
    import dataclasses

    out = [(f"train.recompute={mode}", dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, recompute=mode)))
           for mode in RECOMPUTE_MODES[1:] if mode != cfg.train.recompute]
    if not cfg.train.bf16_moments:
        out.append(("train.bf16_moments=true",
                    dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bf16_moments=True))))
    p = cfg.parallel
    if p.dp % 2 == 0 and (p.dp // 2) % p.ep == 0:
        pp = 2 * p.pp if p.pp > 1 else 2
        sched = p.schedule if p.pp > 1 else "1f1b"
        out.append((f"parallel.pp={pp} parallel.dp={p.dp // 2}" + ("" if p.pp > 1 else " parallel.schedule=1f1b"),
                    dataclasses.replace(cfg, parallel=dataclasses.replace(p, pp=pp, dp=p.dp // 2, schedule=sched))))
    return out


def check_fits(cfg: Config, n_micro: int) -> dict:
    """Refuse (ConfigError) a layout whose largest rank does not fit ``cluster.memory_gb``, naming the rank, its
    items and the changes that would make it fit. Returns the memory report when it fits."""
    from hai.config import ConfigError
    from hai.parallel.topology import Topology

    rep = memory_report(cfg, n_micro)
    if rep["fits"]:
        return rep
    big = rep["activations"][rep["policy"]]
    items = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in big["static_items"].items())
    fixes = []
    for name, alt in _variants(cfg):
        try:
            Topology.from_config(alt)
            t = memory_report(alt, alt.n_micro_batches)
        except (ConfigError, ValueError):
            continue
        fixes.append(f"{name} -> {t['total'] / GB:.2f} GB ({'fits' if t['fits'] else 'still too large'})")
    raise ConfigError(
        f"the layout does not fit cluster.memory_gb={cfg.cluster.memory_gb:g}: pipeline rank {big['rank']} needs "
        f"{big['total'] / GB:.2f} GB ({items}, activations {big['activations'] / GB:.2f} GB at train.recompute="
        f"{rep['policy']}, model.precision={cfg.model.precision}); "
        + ("try " + "; ".join(fixes) if fixes else "no single change here fits: add GPUs or shorten train.seq_len")
        + " (see `hai plan` with the same overrides)")
