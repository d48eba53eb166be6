"""Context parallelism in the plan: what one CP rank keeps, computes and communicates (``parallel.cp > 1``).

Memory. A CP rank holds S/cp positions of every sequence, so every activation item of :mod:`hai.plan.memory` is
counted for S/cp positions (the usual items evaluated at seq_len/cp), plus what the code
keeps for the whole window: with ``train.recompute=none`` the attention keeps the gathered kv latents (+ rstd), the
normed c_kv, k and v of all S positions and the keys' RoPE tables; V3's recipe (``v3``) keeps only this rank's
latents (the region gathers them again in its backward) and ``full`` only the block inputs, so nothing more. MTP
runs padded over all S/cp positions (as under SP). Counted by ``hai.plan.memory`` (``_cp_stage_act_bytes``, so the
layout search and the fit check see it), measured by ``benchmarks/memory.py --only cp``.

Transient. One layer's attention backward needs k and v of the whole window and their gradients at once (fp32
accumulators): :func:`attention_working_set`, reported beside the kept bytes (the plan's totals, like every other
layout's, count kept bytes; the long-context layouts are chosen so both fit).

Communication (:mod:`hai.parallel.context_parallel`, tensor bytes per micro-batch and stage chunk, what the code
hands to the collectives): per attention layer an all-gather of [c_kv | k_pe] (B·S·(C+R)·a) and the reduce-scatter of
its gradient in the backward, again an all-gather in the backward under ``v3`` and ``full``; per MoE layer an
all-reduce of the balance loss's per-sequence sums (2·B·E·4 bytes; again in the backward under ``full``). A ring
moves (cp-1)/cp of an all-gather's or reduce-scatter's bytes and 2(cp-1)/cp of an all-reduce's per rank; over NVLink
when the CP group (with its TP ranks) fits in a node, else over IB. Not overlapped with compute in HAI.

Compute. GEMMs run on S/cp positions, except the key/value up-projection (``wkv_b``), which every rank runs on all S
positions of the gathered latents; the causal attention core is split evenly (zig-zag: every rank attends
(2cp+1)/(4cp²) of the S² / 2 query-key pairs, i.e. 1/cp of them).

:func:`cp_alternatives` compares, per layer and micro-batch, the latent all-gather with the K/V all-gather and the
ring of K/V (bytes) and with absorbed attention over the latents (FLOPs).
"""

from __future__ import annotations

from hai.config import Config
from hai.parallel.layout import PipelineLayout
from hai.plan.memory import act_bytes, is_moe_layer, local_config
from hai.plan.tp import add_bytes, ring_seconds

__all__ = ["cp_chunk_bytes", "cp_layer_bytes", "cp_chunk_seconds",
           "cp_chunk_compute", "cp_alternatives", "attention_working_set", "cp_link"]


def attention_working_set(cfg: Config) -> float:
    """Transient bytes of one layer's attention backward on one rank (an estimate, not in the totals): k and v of
    the whole window for the heads attended at once (under ``v3`` the recompute region's head ranges,
    ``hai.model.attention.head_chunks``; otherwise all of this rank's heads) with their fp32 gradients, the gathered
    latents and their gradient, q, o, dO and dq of this rank's positions, and with the reference core one query
    block of fp32 scores and probabilities (the fused kernels tile them)."""
    from hai.model.attention import _Q_BLOCK, head_chunks

    m, t, p = cfg.model, cfg.train, cfg.parallel
    a, H, B, L = act_bytes(m), m.num_heads // p.tp, t.micro_batch_size, t.seq_len
    qk, v, C, R = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank, m.qk_rope_head_dim
    per_head = B * L * (qk + v) * (a + 4)
    chunks = head_chunks(H, per_head) if t.recompute == "v3" else None
    h = H if chunks is None else chunks[0][1] - chunks[0][0]
    S_l = L // p.cp
    queries = B * S_l * H * (qk * (a + 4) + 2 * v * a)
    scores = 2 * B * h * _Q_BLOCK * L * 4 if m.attention == "reference" else 0
    return h * per_head + B * L * (C + R) * 2 * a + queries + scores


def cp_link(cfg: Config) -> str:
    """The link a CP group's traffic crosses: NVLink when cp x tp ranks fit in one node."""
    p, c = cfg.parallel, cfg.cluster
    return "nvlink" if p.cp * p.tp <= c.gpus_per_node else "ib"


def _spec(cfg: Config, stage: int):
    p = cfg.parallel
    return PipelineLayout.from_config(cfg.model, p.schedule, p.pp, p.layout).specs[stage]


def _attention_layers(cfg: Config, stage: int) -> tuple[int, int]:
    """(attention layers, MoE layers) of one chunk of ``stage`` (its blocks and MTP modules)."""
    m, sp = cfg.model, _spec(cfg, stage)
    moe = [is_moe_layer(m, i) for i in sp.layers] + ([m.is_moe] * m.mtp_depth if sp.mtp else [])
    return len(moe), sum(moe)


def cp_layer_bytes(cfg: Config, piece: str) -> dict:
    """{"fwd": {kind: bytes}, "bwd": {...}} of one attention layer or the balance loss of one MoE layer
    (``piece``: attention | moe), per micro-batch on one rank."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    out = {"fwd": {}, "bwd": {}}
    if p.cp == 1:
        return out
    B, mode = t.micro_batch_size, t.recompute
    if piece == "attention":
        n = B * t.seq_len * (m.kv_lora_rank + m.qk_rope_head_dim) * act_bytes(m)
        add_bytes(out, "fwd", "all_gather", n)
        add_bytes(out, "bwd", "reduce_scatter", n)
        if mode in ("v3", "full"):  # the region (v3) or the checkpointed segment (full) gathers again
            add_bytes(out, "bwd", "all_gather", n)
    elif piece == "moe":
        if m.seq_aux_alpha > 0:
            n = 2 * B * m.n_routed_experts * 4
            add_bytes(out, "fwd", "all_reduce", n)
            if mode == "full":
                add_bytes(out, "bwd", "all_reduce", n)
    else:
        raise ValueError(f"unknown piece {piece!r}")
    return out


def cp_chunk_bytes(cfg: Config, stage: int) -> dict:
    """CP tensor bytes of one micro-batch through pipeline stage ``stage`` (its blocks and MTP modules)."""
    layers, moe = _attention_layers(cfg, stage)
    out = {"fwd": {}, "bwd": {}}
    for piece, count in (("attention", layers), ("moe", moe)):
        for phase, kinds in cp_layer_bytes(cfg, piece).items():
            for kind, n in kinds.items():
                add_bytes(out, phase, kind, n * count)
    return out


def cp_chunk_seconds(cfg: Config, stage: int) -> tuple[float, float]:
    """(forward, backward) seconds of a chunk's CP collectives (ring, on the CP group's link; not overlapped)."""
    cp, c = cfg.parallel.cp, cfg.cluster
    if cp == 1:
        return 0.0, 0.0
    bw = (c.nvlink_gbps if cp_link(cfg) == "nvlink" else c.ib_gbps) * 1e9
    return ring_seconds(cp_chunk_bytes(cfg, stage), cp, bw)


def cp_chunk_compute(cfg: Config, stage: int) -> dict:
    """F, B, W seconds of one chunk on one CP rank: the chunk of its S/cp positions (hai.plan.cost), plus its 1/cp of
    the attention core beyond what S/cp positions attend among themselves, plus the key/value up-projection of the
    other ranks' positions (forward, input and weight gradient; recomputed under v3 and full)."""
    from hai.plan.cost import B_OVER_F, RECOMPUTED, _gemm_seconds, calibration, chunk_compute, spec_flops

    m, t, p = cfg.model, cfg.train, cfg.parallel
    local = local_config(cfg)
    out = dict(chunk_compute(local, stage))
    cal, sp = calibration(cfg), _spec(cfg, stage)
    attn = spec_flops(cfg, sp)["attention"] / p.cp - spec_flops(local, sp)["attention"]
    attn_s = attn / (cfg.cluster.peak_tflops_bf16 * 1e12 * cal.attention_efficiency())
    layers, _ = _attention_layers(cfg, stage)
    n, k = m.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank
    extra_tokens = t.micro_batch_size * (t.seq_len - t.seq_len // p.cp)
    f, d, w = _gemm_seconds(cfg, cal, "dense", n, k, 2.0 * n * k * layers * extra_tokens)
    again = f if t.recompute == "full" or "wkv_b" in RECOMPUTED.get(t.recompute, ()) else 0.0
    again += attn_s if t.recompute == "full" else 0.0
    out["F"] += attn_s + f
    out["B"] += B_OVER_F * attn_s + d + w + again
    out["W"] += w
    return out


def cp_alternatives(cfg: Config, seq_len: int | None = None) -> dict:
    """Per layer and micro-batch on one rank (bf16 bytes at the config's activation width), for the CP designs:
    the latent all-gather (HAI), an all-gather of the up-projected K and V, a ring passing K/V blocks (same bytes as
    the all-gather, cp-1 steps that can overlap compute), and absorbed attention over the latents (latent bytes, but
    the core's FLOPs in the latent space)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    S, B, cp, a = seq_len or t.seq_len, t.micro_batch_size, p.cp, act_bytes(m)
    H, C, R, N, V = m.num_heads // p.tp, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
    share = (cp - 1) / cp
    latent = B * S * (C + R) * a
    kv = B * S * H * (N + R + V) * a  # K carries the shared RoPE key per head, as Megatron's CP moves it
    pairs = B * S * S / 2 / cp  # causal query-key pairs per rank
    core = 2 * pairs * H * (N + R + V)  # QK^T and PV, forward
    absorbed = 2 * pairs * H * (C + R + C)  # scores over [c_kv | k_pe], output in the latent space
    upproj = 2 * B * S * C * H * (N + V)  # every rank up-projects every key (HAI) ...
    upproj_local = upproj / cp  # ... against its own keys only (K/V gather, ring)
    return {"seq_len": S, "cp": cp, "latent_allgather_bytes": latent, "latent_wire_bytes": latent * share,
            "kv_allgather_bytes": kv, "kv_wire_bytes": kv * share, "ring_wire_bytes": kv * share,
            "kv_over_latent": kv / latent, "attention_core_flops": core, "absorbed_core_flops": absorbed,
            "absorbed_over_core": absorbed / core, "upproj_flops_latent_gather": upproj,
            "upproj_flops_kv_gather": upproj_local,
            "extra_upproj_share_of_core": (upproj - upproj_local) / core}
