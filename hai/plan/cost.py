"""Per-chunk compute and communication costs of a layout, in seconds and bytes per GPU, priced with a calibration
table (:mod:`hai.plan.calibration`; default: the published H800 table).

A *chunk* is one micro-batch (micro_batch_size x seq_len tokens) through one pipeline stage. Compute: every GEMM a
token runs (its shape N x K from the config) three times, forward (y = x·Wᵀ), input gradient (N and K swapped) and
weight gradient, each at the table's TFLOP/s for its kind and nearest shape: with model.precision=fp8 the block GEMMs
at DeepGEMM's dense / grouped (routed experts) / wgrad numbers, the head, router and every GEMM of another precision at
the table's BF16 efficiency; plus the causal attention core at the table's attention TFLOP/s (backward 2x forward).
While DualPipe overlaps the expert all-to-all with compute, compute runs on the SMs the communication kernels leave.

Expert-parallel traffic per token per MoE layer (bytes a GPU sends; receives are symmetric under balanced routing):
dispatch rows carry D FP8 values + D/128 fp32 scales (parallel.fp8_dispatch) or 2D (bf16); combine rows 2D (bf16);
the backward moves bf16 gradients the opposite way (2D + 2D). Hierarchical dispatch crosses IB once per destination
node other than the token's own: M x (n-1)/n nodes with node limit M (n nodes per EP group), or the expected number of
distinct nodes among k experts drawn uniformly without replacement when unlimited; then every routed copy is forwarded
over NVLink inside the destination node (k x (g-1)/g rows, g GPUs per node: an upper bound). Flat dispatch sends each
copy directly: k (n-1)/n rows over IB, k/n (g-1)/g over NVLink. IB and NVLink run concurrently: time = max of the two,
each link at the table's dispatch / combine GB/s for the EP size (DeepEP's; the backward's two transfers priced as a
combine and a dispatch).
"""

from __future__ import annotations

from math import comb

from hai.config import Config, ModelConfig
from hai.parallel.layout import PipelineLayout, StageSpec
from hai.plan.accounting import attention_params
from hai.plan.calibration import Calibration, load_calibration
from hai.plan.memory import StageParams, is_moe_layer, rank_params

__all__ = ["B_OVER_F", "RECOMPUTED", "calibration", "block_gemms", "expected_nodes", "ep_rows", "chunk_flops",
           "chunk_compute", "chunk_compute_s", "spec_flops", "spec_compute", "spec_compute_s", "chunk_comm",
           "zero1_bytes", "p2p_bytes_per_chunk"]

B_OVER_F = 2.0  # attention core: full backward = 2 x forward


def expected_nodes(n_nodes: int, experts: int, k: int) -> float:
    """Expected distinct nodes among k of ``experts`` experts (spread evenly over n_nodes) drawn without replacement."""
    per = experts // n_nodes
    return n_nodes * (1 - comb(experts - per, k) / comb(experts, k))


def ep_rows(cfg: Config) -> dict:
    """Rows per token per MoE layer a GPU sends over IB and over NVLink (see the module docstring)."""
    m, p, c = cfg.model, cfg.parallel, cfg.cluster
    k, g = m.n_activated_experts, c.gpus_per_node
    if not m.is_moe or p.ep == 1:
        return {"ib": 0.0, "nvlink": 0.0, "nodes_per_token": 0.0}
    if p.ep <= g:  # the EP group fits inside one node
        return {"ib": 0.0, "nvlink": k * (p.ep - 1) / p.ep, "nodes_per_token": 1.0}
    n = p.ep // g
    nodes = float(p.node_limit) if p.node_limit else expected_nodes(n, m.n_routed_experts, k)
    if p.dispatch == "hierarchical":
        return {"ib": nodes * (n - 1) / n, "nvlink": k * (g - 1) / g, "nodes_per_token": nodes}
    return {"ib": k * (n - 1) / n, "nvlink": k / n * (g - 1) / g, "nodes_per_token": nodes}


def calibration(cfg: Config) -> Calibration:
    """The table ``cfg.calibration`` names (default: the published H800 table)."""
    return load_calibration(getattr(cfg, "calibration", None))


def block_gemms(m: ModelConfig, moe: bool) -> list[tuple[str, str, int, int, int]]:
    """(name, kind, N, K, GEMMs per token) of one block: kind dense | grouped (routed experts) | bf16 (router)."""
    D, H, C, R = m.hidden_size, m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim
    qk = m.qk_nope_head_dim + R
    out = [("wq", "dense", H * qk, D, 1)] if m.q_lora_rank is None else [
        ("wq_a", "dense", m.q_lora_rank, D, 1), ("wq_b", "dense", H * qk, m.q_lora_rank, 1)]
    out += [("wkv_a", "dense", C + R, D, 1), ("wkv_b", "dense", H * (m.qk_nope_head_dim + m.v_head_dim), C, 1),
            ("wo", "dense", D, H * m.v_head_dim, 1)]
    if not moe:
        I = m.intermediate_size  # noqa: E741
        return out + [("mlp.w1|w3", "dense", I, D, 2), ("mlp.w2", "dense", D, I, 1)]
    F, S, k = m.moe_intermediate_size, m.n_shared_experts, m.n_activated_experts
    if S:
        out += [("shared.w1|w3", "dense", F, D, 2 * S), ("shared.w2", "dense", D, F, S)]
    return out + [("experts.w1|w3", "grouped", F, D, 2 * k), ("experts.w2", "grouped", D, F, k),
                  ("router", "bf16", m.n_routed_experts, D, 1)]


# GEMMs whose forward the backward runs again (train.recompute; hai.model.recompute): V3's recipe recomputes the
# MLA up-projections (and norms, RoPE, SwiGLU: non-GEMM ops, not priced); full recomputes every forward
RECOMPUTED = {"none": frozenset(), "v3": frozenset({"wq", "wq_b", "wkv_b"})}


def _active_block(m: ModelConfig, moe: bool) -> tuple[int, int]:
    """(GEMM parameters a token touches in one block, of which router/bf16-only)."""
    D = m.hidden_size
    if not moe:
        return attention_params(m) + 3 * D * m.intermediate_size, 0
    F = m.moe_intermediate_size
    ffn = (m.n_activated_experts + m.n_shared_experts) * 3 * D * F
    return attention_params(m) + ffn + m.n_routed_experts * D, m.n_routed_experts * D


def chunk_flops(cfg: Config, stage: int) -> dict:
    """Forward FLOPs of one chunk (what the layout gives the stage), split into FP8-eligible GEMMs, BF16 GEMMs and
    the attention core."""
    p = cfg.parallel
    return spec_flops(cfg, PipelineLayout.from_config(cfg.model, p.schedule, p.pp, p.layout).specs[stage])


def spec_flops(cfg: Config, sp: StageSpec) -> dict:
    """Forward FLOPs of one micro-batch through what ``sp`` holds."""
    m, t = cfg.model, cfg.train
    S, T = t.seq_len, t.micro_batch_size * t.seq_len
    blocks = [is_moe_layer(m, i) for i in sp.layers]
    gemm = bf16 = 0.0
    if sp.head:
        bf16 += m.vocab_size * m.hidden_size  # head, kept in bf16
    if sp.mtp:
        blocks += [m.is_moe] * m.mtp_depth
        bf16 += m.mtp_depth * m.vocab_size * m.hidden_size  # the MTP heads (shared weights)
        gemm += m.mtp_depth * 2 * m.hidden_size ** 2  # MTP projection
    for moe in blocks:
        a, router = _active_block(m, moe)
        gemm += a - router
        bf16 += router
    attn = len(blocks) * 2 * (S / 2) * m.num_heads * (m.qk_head_dim + m.v_head_dim)
    return {"gemm": 2 * gemm * T, "gemm_bf16": 2 * bf16 * T, "attention": attn * T, "moe_layers": sum(blocks)}


def chunk_compute_s(cfg: Config, stage: int) -> float:
    """Forward seconds of one chunk."""
    return chunk_compute(cfg, stage)["F"]


def _stage_gemms(cfg: Config, sp: StageSpec) -> list[tuple[str, str, int, int, int]]:
    """(name, kind, N, K, GEMMs per token) of everything ``sp`` holds: its blocks, MTP's projection, the head(s)."""
    m = cfg.model
    blocks = [is_moe_layer(m, i) for i in sp.layers] + ([m.is_moe] * m.mtp_depth if sp.mtp else [])
    counts: dict[tuple, int] = {}  # the same GEMM in every block of the stage: one entry, summed counts
    for moe in set(blocks):
        for name, kind, n, k, c in block_gemms(m, moe):
            counts[name, kind, n, k] = counts.get((name, kind, n, k), 0) + c * blocks.count(moe)
    out = [(*key, c) for key, c in counts.items()]
    heads = int(sp.head) + (m.mtp_depth if sp.mtp else 0)
    if sp.mtp:
        out.append(("mtp.proj", "dense", m.hidden_size, 2 * m.hidden_size, m.mtp_depth))
    return out + ([("head", "bf16", m.vocab_size, m.hidden_size, heads)] if heads else [])


def _gemm_seconds(cfg: Config, cal: Calibration, kind: str, n: int, k: int, flops: float) -> tuple[float, ...]:
    """Seconds of one GEMM's forward, input gradient and weight gradient (flops each)."""
    c = cfg.cluster
    if kind == "bf16" or cfg.model.precision != "fp8":
        t = flops / (c.peak_tflops_bf16 * 1e12 * cal.gemm_bf16_efficiency)
        return t, t, t
    peak = c.peak_tflops_fp8 * 1e12
    return tuple(flops / (peak * cal.fp8_gemm_efficiency(kd, a, b))
                 for kd, a, b in ((kind, n, k), (kind, k, n), ("wgrad", n, k)))


def _overlap_share(cfg: Config, cal: Calibration) -> float:
    """Share of the SMs compute keeps: the calibration's while DualPipe overlaps the expert all-to-all, else 1."""
    p = cfg.parallel
    overlapped = cfg.model.is_moe and p.ep > 1 and p.schedule in ("dualpipe", "dualpipev")
    return cal.compute_share if overlapped else 1.0


def spec_compute(cfg: Config, sp: StageSpec) -> dict:
    """Seconds of one micro-batch through what ``sp`` holds: forward F, full backward B (input + weight gradients)
    and its weight-gradient part W."""
    cal, T, mode = calibration(cfg), cfg.train.micro_batch_size * cfg.train.seq_len, cfg.train.recompute
    fwd = dgrad = wgrad = again = 0.0
    for name, kind, n, k, count in _stage_gemms(cfg, sp):
        f, d, w = _gemm_seconds(cfg, cal, kind, n, k, 2.0 * n * k * count * T)
        fwd, dgrad, wgrad = fwd + f, dgrad + d, wgrad + w
        again += f if mode == "full" or name in RECOMPUTED.get(mode, ()) else 0.0
    attn = spec_flops(cfg, sp)["attention"] / (cfg.cluster.peak_tflops_bf16 * 1e12 * cal.attention_efficiency())
    again += attn if mode == "full" else 0.0
    scale = 1.0 / _overlap_share(cfg, cal)
    return {"F": (fwd + attn) * scale, "B": (again + dgrad + wgrad + B_OVER_F * attn) * scale, "W": wgrad * scale}


def spec_compute_s(cfg: Config, sp: StageSpec) -> float:
    """Forward seconds of one micro-batch through what ``sp`` holds."""
    return spec_compute(cfg, sp)["F"]


def chunk_compute(cfg: Config, stage: int) -> dict:
    """F, B, W seconds of one chunk of ``stage`` (see :func:`spec_compute`)."""
    p = cfg.parallel
    return spec_compute(cfg, PipelineLayout.from_config(cfg.model, p.schedule, p.pp, p.layout).specs[stage])


def chunk_comm(cfg: Config, moe_layers: int) -> dict:
    """EP bytes and seconds of one chunk (forward: dispatch + combine; backward: their bf16 gradients)."""
    m, p = cfg.model, cfg.parallel
    # TP (SP): each rank routes S/tp; CP: its S/cp positions
    D, T = m.hidden_size, cfg.train.micro_batch_size * cfg.train.seq_len // (p.tp * p.cp)
    rows = ep_rows(cfg)
    Dp = -(-D // 128) * 128  # the FP8 payload is padded to whole 1x128 tiles
    disp = Dp + Dp // 128 * 4 if p.fp8_dispatch else 2 * D
    gbps = _all_to_all_gbps(cfg)
    out = {}
    for name, (first, second) in (("fwd", (disp, 2 * D)), ("bwd", (2 * D, 2 * D))):  # dispatch-, combine-like
        per = {x: T * moe_layers * rows[x] for x in ("ib", "nvlink")}
        secs = {x: per[x] * (first / gbps[x][0] + second / gbps[x][1]) / 1e9 for x in per}
        out[name] = {"ib_bytes": per["ib"] * (first + second), "nvlink_bytes": per["nvlink"] * (first + second),
                     "seconds": max(secs.values())}
    out["per_token_per_layer"] = {"dispatch_row_bytes": disp, "combine_row_bytes": 2 * D, **rows}
    return out


def _all_to_all_gbps(cfg: Config) -> dict:
    """(dispatch, combine) GB/s per link: the calibration's shares of the cluster's nominal IB and NVLink."""
    c, cal, ep = cfg.cluster, calibration(cfg), cfg.parallel.ep
    return {link: tuple(f * nominal for f in cal.all_to_all_fraction(link, ep))
            for link, nominal in (("ib", c.ib_gbps), ("nvlink", c.nvlink_gbps))}


def p2p_bytes_per_chunk(cfg: Config) -> float:
    """Activation (or gradient) bytes one chunk hands to the next stage: T x D in bf16."""
    sp = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1  # SP: a sequence shard per TP rank
    cp = cfg.parallel.cp  # CP: this rank's positions
    return cfg.train.micro_batch_size * cfg.train.seq_len // (sp * cp) * cfg.model.hidden_size * 2


def zero1_bytes(cfg: Config, rank: int) -> dict:
    """End-of-step bytes a GPU sends: gradient reduce-scatter (fp32) and bf16 parameter all-gather, ring algorithm
    ((n-1)/n of the buffer) over dp x cp (dense) and edp (experts); DualPipe's two copies also sum their gradients
    (one fp32 exchange of the rank's gradients with its copy partner)."""
    p = cfg.parallel
    prm: StageParams = rank_params(cfg, rank)
    edp, dense = p.edp, p.dp * p.cp
    ring = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731
    wbytes = 4 if cfg.model.precision == "fp32" else 2
    rs = 4 * (prm.dense * ring(dense) + prm.expert * ring(edp))
    ag = wbytes * (prm.dense * ring(dense) + prm.expert * ring(edp))
    copies = 4 * prm.total if p.schedule == "dualpipe" and p.pp > 1 else 0.0
    return {"reduce_scatter": rs, "all_gather": ag, "copy_grad_sync": copies}

