"""The simulated step: per-chunk costs (:mod:`hai.plan.cost`) turned into ``pipeline.simulate`` costs, the schedule
simulated, and the step's time, throughput and communication (what ``hai plan`` reports and the layout search
compares)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

from hai.config import Config
from hai.pipeline.schedules import num_stages, param_copies
from hai.pipeline.simulate import Costs, SimResult, bubble_formula, simulate_schedule
from hai.plan.accounting import train_flops_per_token
from hai.plan.cost import chunk_comm, chunk_compute, chunk_flops, p2p_bytes_per_chunk, zero1_bytes
from hai.plan.cp import (attention_working_set, cp_alternatives, cp_chunk_bytes, cp_chunk_compute, cp_chunk_seconds,
                         cp_link)
from hai.plan.memory import GRAD_BYTES, early_grad_buckets, local_config, memory_report
from hai.plan.tp import tp_chunk_bytes, tp_chunk_seconds, tp_layer_bytes

__all__ = ["predict", "predict_step_time"]


def _stage_costs(c: dict, cf: float, cb: float, overlap: bool, p2p: float, tf: float = 0.0,
                 tb: float = 0.0) -> Costs:
    """One stage chunk: compute ``c`` (forward F, full backward B, its weight part W: hai.plan.cost.spec_compute)
    plus the EP comm of each direction; F&B overlaps the EP all-to-alls of one chunk with the other's compute
    (DualPipe) or runs them back to back. ``tf``/``tb``: the TP and CP collectives of the forward / backward, on the
    critical path (HAI does not overlap them)."""
    Fx, Bx = c["F"] + cf + tf, c["B"] + cb + tb
    FB = (max(c["F"] + c["B"], cf + cb) + tf + tb) if overlap else Fx + Bx
    return Costs(F=Fx, B=Bx, W=c["W"], FB=FB, p2p=p2p, F_comm=cf, B_comm=cb)


def _chunk_costs(cfg: Config, stage_cost: str = "per_stage") -> tuple[Costs, dict]:
    """Simulator costs (seconds) and the pieces they came from. ``per_stage`` (the plan): every stage its own costs
    (the uniform fields hold the slowest stage, for the report and the published formulas); ``max`` / ``mean``:
    every stage priced as the slowest / the mean stage (sensitivity checks)."""
    p, c = cfg.parallel, cfg.cluster
    n_st = num_stages(p.schedule, p.pp)
    stages = []
    for s in range(n_st):
        fl = chunk_flops(cfg, s)
        (tf, tb), (cf_cp, cb_cp) = tp_chunk_seconds(local_config(cfg), s), cp_chunk_seconds(cfg, s)
        compute = chunk_compute(cfg, s) if p.cp == 1 else cp_chunk_compute(cfg, s)  # CP: this rank's positions
        stages.append({"c": {k: v / p.tp for k, v in compute.items()},
                       "comm": chunk_comm(cfg, fl["moe_layers"]), "tp": (tf + cf_cp, tb + cb_cp)})
    overlap = p.schedule in ("dualpipe", "dualpipev")
    # neighbouring stages are a stage's dp x cp x tp ranks apart: other nodes once a stage fills one
    link = c.ib_gbps if p.dp * p.cp * p.tp >= c.gpus_per_node and c.nodes > 1 else c.nvlink_gbps
    p2p = p2p_bytes_per_chunk(cfg) / (link * 1e9)
    agg = (lambda xs: sum(xs) / len(xs)) if stage_cost == "mean" else max
    c = {k: agg([x["c"][k] for x in stages]) for k in ("F", "B", "W")}
    cf = agg([x["comm"]["fwd"]["seconds"] for x in stages])
    cb = agg([x["comm"]["bwd"]["seconds"] for x in stages])
    tf, tb = agg([x["tp"][0] for x in stages]), agg([x["tp"][1] for x in stages])
    costs = _stage_costs(c, cf, cb, overlap, p2p, tf, tb)
    per_stage = tuple(_stage_costs(x["c"], x["comm"]["fwd"]["seconds"], x["comm"]["bwd"]["seconds"], overlap, p2p,
                                   *x["tp"]) for x in stages)
    compute_only = Costs(F=c["F"], B=c["B"], W=c["W"], FB=c["F"] + c["B"],
                         stages=tuple(_stage_costs(x["c"], 0.0, 0.0, True, 0.0) for x in stages))
    if stage_cost == "per_stage":
        costs = dataclasses.replace(costs, stages=per_stage)
    else:
        compute_only = dataclasses.replace(compute_only, stages=())
    worst = max(range(n_st), key=lambda s: stages[s]["comm"]["fwd"]["seconds"])
    return costs, {"F_compute": c["F"], "comm_fwd": cf, "comm_bwd": cb, "overlap": overlap, "tp_fwd": tf,
                   "tp_bwd": tb, "stage_F_compute": [x["c"]["F"] for x in stages], "compute_only": compute_only,
                   "comm_worst_stage": stages[worst]["comm"]}


def _zero_seconds(cfg: Config, zero: dict) -> float:
    c, p = cfg.cluster, cfg.parallel
    bw = c.ib_gbps if c.nodes > 1 and (p.dp > c.gpus_per_node or p.pp > 1) else c.nvlink_gbps
    return sum(zero.values()) / (bw * 1e9)


def _hidden_reduce_scatter(cfg: Config, zero: dict, costs: Costs, rank: int) -> float:
    """Seconds of the gradient reduce-scatter hidden under the last micro-batch's backward without a pipeline
    (``train.overlap_grad_reduce``, ``hai.parallel.zero``): each bucket starts as the backward finishes its
    gradients, so all but the last bucket can hide, up to the backward's length. With a pipeline a stage's buckets
    start after its last gradient work, which on the rank that finishes last ends the schedule: nothing hides."""
    buckets = early_grad_buckets(cfg, rank) if cfg.parallel.pp == 1 and cfg.train.overlap_grad_reduce else []
    if not buckets:
        return 0.0
    rs = sum(GRAD_BYTES * n * (w - 1) / w for n, w in buckets)  # ring reduce-scatter of the fp32 gradients
    return min(_zero_seconds(cfg, {"rs": rs}) * (1 - 1 / len(buckets)), costs.B)


def _no_pipeline(n_micro: int, costs: Costs) -> SimResult:
    """pp=1: micro-batches run back to back (gradient accumulation), one micro-batch's activations live at a time."""
    busy = n_micro * (costs.F + costs.B)
    return SimResult(busy, [busy], [0.0], 0.0, [1], [])


def _pipeline_section(name: str, pp: int, n_micro: int, costs: Costs, res) -> dict:
    """The same fields as ``pipeline.simulate.report`` (computed from one simulation)."""
    return {
        "schedule": name, "pp": pp, "micro_batches": n_micro, "stages": num_stages(name, pp),
        "costs": asdict(costs), "step_time": res.step_time, "bubble": res.bubble,
        "bubble_formula": bubble_formula(name, pp, costs) if pp > 1 else 0.0, "bubble_per_rank": res.bubble_per_rank,
        "busy_per_rank": res.busy, "peak_activations": res.peak,
        "peak_activations_per_rank": res.peak_activations, "param_copies": param_copies(name),
    }


def _throughput(cfg: Config, step_s: float) -> dict:
    t, c = cfg.train, cfg.cluster
    tokens_gpu = t.global_batch_size * t.seq_len / c.world_size
    tps = tokens_gpu / step_s
    flops_tok = train_flops_per_token(cfg.model, t.seq_len)
    tflops = tps * flops_tok / 1e12
    return {"tokens_per_step_per_gpu": tokens_gpu, "tokens_per_s_per_gpu": tps, "flops_per_token": flops_tok,
            "tflops_per_gpu": tflops, "mfu_bf16": tflops / c.peak_tflops_bf16,
            "gpu_hours_per_trillion_tokens": 1e12 / tps / 3600}


def predict(cfg: Config, with_timeline: bool = False, with_comm: bool = True, stage_cost: str = "per_stage",
             recompute: str | None = None) -> dict:
    """``with_comm=False`` (the comparison variants) skips placing SEND/RECV; p2p latency is still charged."""
    p = cfg.parallel
    n_micro = cfg.n_micro_batches
    costs, parts = _chunk_costs(cfg, stage_cost)
    res = (simulate_schedule(p.schedule, p.pp, n_micro, costs, with_comm=with_comm) if p.pp > 1
           else _no_pipeline(n_micro, costs))
    mem = memory_report(cfg, n_micro, recompute)
    zero = zero1_bytes(cfg, mem["worst_param_rank"])
    zero_hidden = _hidden_reduce_scatter(cfg, zero, costs, mem["worst_param_rank"])
    zero_s = _zero_seconds(cfg, zero) - zero_hidden
    step = res.step_time + zero_s
    # the busiest rank's busy time, and how much of it is compute (the rest: EP comm that overlap did not hide)
    co = parts["compute_only"]
    if p.pp > 1:
        compute_r = [0.0] * p.pp
        for e in res.timeline:
            if e.action.is_compute:
                compute_r[e.rank] += co.of(e.action)
    else:
        compute_r = [n_micro * (co.F + co.B)]
    r_busy = max(range(len(res.busy)), key=lambda r: res.busy[r])
    busy, compute = res.busy[r_busy], compute_r[r_busy]
    mean_compute = sum(compute_r) / len(compute_r)
    out = {
        "pipeline": _pipeline_section(p.schedule, p.pp, n_micro, costs, res),
        "memory": mem,
        "step": {"step_time_s": step, "pipeline_s": res.step_time, "compute_s": compute,
                 "exposed_comm_s": busy - compute, "bubble_s": res.step_time - busy, "zero1_s": zero_s,
                 "zero1_hidden_s": zero_hidden,
                 "busiest_rank": r_busy, "rank_compute_s": compute_r, "rank_busy_s": list(res.busy),
                 "busiest_over_mean_compute": max(compute_r) / mean_compute if mean_compute else 1.0,
                 "chunk_F_compute_s": parts["F_compute"], "stage_F_compute_s": parts["stage_F_compute"],
                 "chunk_comm_fwd_s": parts["comm_fwd"],
                 "chunk_comm_bwd_s": parts["comm_bwd"], "fb_overlap": parts["overlap"]},
        "throughput": _throughput(cfg, step),
        "communication": _comm_section(cfg, n_micro, parts, zero),
    }
    if with_timeline:
        out["_timeline"] = res.timeline
    return out


def predict_step_time(cfg: Config) -> float:
    """The simulated step time (seconds) of a layout (no P2P placement: the comparison variants' model)."""
    return predict(cfg, with_comm=False)["step"]["step_time_s"]


def _comm_section(cfg: Config, n_micro: int, parts: dict, zero: dict) -> dict:
    """Per-step bytes a GPU sends (EP at the busiest stage; each rank runs n_micro chunks per step)."""
    w = parts["comm_worst_stage"]
    ep = {f"{d}_{link}": n_micro * w[d][f"{link}_bytes"] for d in ("fwd", "bwd") for link in ("ib", "nvlink")}
    p2p = 2 * n_micro * p2p_bytes_per_chunk(cfg) if cfg.parallel.pp > 1 else 0.0
    out = {"ep_per_step": ep, "ep_per_token_per_layer": w["per_token_per_layer"],
           "pipeline_p2p_per_step": p2p, "zero1_per_step": zero}
    if cfg.parallel.cp > 1:
        out["cp_per_chunk"] = _cp_section(cfg)
    if cfg.parallel.tp > 1:  # per micro-batch: the busiest stage's TP collectives, and each piece's
        cfg, m = local_config(cfg), cfg.model  # under CP: this rank's positions
        stages = range(num_stages(cfg.parallel.schedule, cfg.parallel.pp))
        worst = max(stages, key=lambda st: sum(tp_chunk_seconds(cfg, st)))
        pieces = ["attention", "moe" if m.is_moe else "mlp", "embed", "head"]
        if m.is_moe and m.first_k_dense_replace:
            pieces.insert(1, "mlp")
        out["tp_per_chunk"] = {"stage": worst, "bytes": tp_chunk_bytes(cfg, worst),
                               "fwd_s": tp_chunk_seconds(cfg, worst)[0], "bwd_s": tp_chunk_seconds(cfg, worst)[1],
                               "per_piece": {pc: tp_layer_bytes(cfg, pc) for pc in pieces}}
    return out


def _cp_section(cfg: Config) -> dict:
    """Per micro-batch: the busiest stage's CP collectives and their time, the link, the attention working set, and
    the latent all-gather against the K/V all-gather, the ring and absorbed attention (hai.plan.cp)."""
    stages = range(num_stages(cfg.parallel.schedule, cfg.parallel.pp))
    worst = max(stages, key=lambda st: sum(cp_chunk_seconds(cfg, st)))
    fwd, bwd = cp_chunk_seconds(cfg, worst)
    return {"stage": worst, "bytes": cp_chunk_bytes(cfg, worst), "fwd_s": fwd, "bwd_s": bwd, "link": cp_link(cfg),
            "attention_working_set": attention_working_set(cfg), "per_layer": cp_alternatives(cfg)}
