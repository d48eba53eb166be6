"""Per-chunk compute (roofline) and communication costs of a layout, in seconds and bytes per GPU.

A *chunk* is one micro-batch (micro_batch_size x seq_len tokens) through one pipeline stage. Compute: forward FLOPs
from the stage's activated parameters (2 per parameter per token) plus the causal attention core, run at an assumed
achieved fraction of the cluster's peak (FP8 peak for the block GEMMs when model.precision=fp8; BF16 peak for the
head, router and attention core); backward B = 2F (input grad F + weight grad W = F).

Expert-parallel traffic per token per MoE layer (bytes a GPU sends; receives are symmetric under balanced routing):
dispatch rows carry D FP8 values + D/128 fp32 scales (parallel.fp8_dispatch) or 2D (bf16); combine rows 2D (bf16);
the backward moves bf16 gradients the opposite way (2D + 2D). Hierarchical dispatch crosses IB once per destination
node other than the token's own: M x (n-1)/n nodes with node limit M (n nodes per EP group), or the expected number of
distinct nodes among k experts drawn uniformly without replacement when unlimited; then every routed copy is forwarded
over NVLink inside the destination node (k x (g-1)/g rows, g GPUs per node: an upper bound). Flat dispatch sends each
copy directly: k (n-1)/n rows over IB, k/n (g-1)/g over NVLink. IB and NVLink run concurrently: time = max of the two.
"""

from __future__ import annotations

from math import comb

from hai.plan.accounting import attention_params
from hai.config import Config, ModelConfig
from hai.parallel.layout import PipelineLayout, StageSpec
from hai.plan.memory import StageParams, is_moe_layer, rank_params

__all__ = ["GEMM_EFFICIENCY", "ATTENTION_EFFICIENCY", "B_OVER_F", "W_OVER_F", "expected_nodes", "ep_rows",
           "chunk_flops", "chunk_compute_s", "spec_flops", "spec_compute_s", "chunk_comm", "zero1_bytes", "p2p_bytes_per_chunk"]

GEMM_EFFICIENCY = 0.6  # achieved fraction of peak for GEMMs (DeepGEMM best ~0.78 of FP8 peak; in-model shapes lower)
ATTENTION_EFFICIENCY = 0.4  # achieved fraction of BF16 peak for the attention core (FlashAttention-class kernels)
B_OVER_F = 2.0  # full backward = 2 x forward
W_OVER_F = 1.0  # weight-gradient part of the backward = 1 x forward


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
    """Forward seconds of one chunk under the roofline assumptions."""
    p = cfg.parallel
    return spec_compute_s(cfg, PipelineLayout.from_config(cfg.model, p.schedule, p.pp, p.layout).specs[stage])


def spec_compute_s(cfg: Config, sp: StageSpec) -> float:
    """Forward seconds of one micro-batch through what ``sp`` holds (roofline)."""
    c, fl = cfg.cluster, spec_flops(cfg, sp)
    gemm_peak = c.peak_tflops_fp8 if cfg.model.precision == "fp8" else c.peak_tflops_bf16
    t = fl["gemm"] / (gemm_peak * 1e12 * GEMM_EFFICIENCY)
    t += fl["gemm_bf16"] / (c.peak_tflops_bf16 * 1e12 * GEMM_EFFICIENCY)
    return t + fl["attention"] / (c.peak_tflops_bf16 * 1e12 * ATTENTION_EFFICIENCY)


def chunk_comm(cfg: Config, moe_layers: int) -> dict:
    """EP bytes and seconds of one chunk (forward: dispatch + combine; backward: their bf16 gradients)."""
    m, p, c = cfg.model, cfg.parallel, cfg.cluster
    D, T = m.hidden_size, cfg.train.micro_batch_size * cfg.train.seq_len // p.tp  # TP: each rank routes S/tp
    rows = ep_rows(cfg)
    Dp = -(-D // 128) * 128  # the FP8 payload is padded to whole 1x128 tiles
    disp = Dp + Dp // 128 * 4 if p.fp8_dispatch else 2 * D
    fwd_row, bwd_row = disp + 2 * D, 4 * D
    out = {}
    for name, row in (("fwd", fwd_row), ("bwd", bwd_row)):
        ib, nvl = (T * moe_layers * rows[x] * row for x in ("ib", "nvlink"))
        out[name] = {"ib_bytes": ib, "nvlink_bytes": nvl,
                     "seconds": max(ib / (c.ib_gbps * 1e9), nvl / (c.nvlink_gbps * 1e9))}
    out["per_token_per_layer"] = {"dispatch_row_bytes": disp, "combine_row_bytes": 2 * D, **rows}
    return out


def p2p_bytes_per_chunk(cfg: Config) -> float:
    """Activation (or gradient) bytes one chunk hands to the next stage: T x D in bf16."""
    sp = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1  # SP: a sequence shard per TP rank
    return cfg.train.micro_batch_size * cfg.train.seq_len // sp * cfg.model.hidden_size * 2


def zero1_bytes(cfg: Config, rank: int) -> dict:
    """End-of-step bytes a GPU sends: gradient reduce-scatter (fp32) and bf16 parameter all-gather, ring algorithm
    ((n-1)/n of the buffer) over dp (dense) and edp (experts); DualPipe's two copies also sum their gradients
    (one fp32 exchange of the rank's gradients with its copy partner)."""
    p = cfg.parallel
    prm: StageParams = rank_params(cfg, rank)
    edp = p.dp // p.ep
    ring = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731
    wbytes = 4 if cfg.model.precision == "fp32" else 2
    rs = 4 * (prm.dense * ring(p.dp) + prm.expert * ring(edp))
    ag = wbytes * (prm.dense * ring(p.dp) + prm.expert * ring(edp))
    copies = 4 * prm.total if p.schedule == "dualpipe" and p.pp > 1 else 0.0
    return {"reduce_scatter": rs, "all_gather": ag, "copy_grad_sync": copies}

