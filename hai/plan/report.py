"""`hai plan`: validate a layout, then predict per-GPU memory, communication and step time, and compare with the
run DeepSeek published for V3. Pure arithmetic plus the pipeline simulator; the only process group is the fake
backend's, used to build the layout's device meshes in one process.

Memory lives in :mod:`hai.plan.memory`, the compute/communication cost model in :mod:`hai.plan.cost`, the text
rendering in :mod:`hai.plan.format`; this module
turns per-chunk costs into ``pipeline.simulate`` costs, runs the schedule, and writes the report, ``schedule.png`` and
``trace.json``. Kernel and link throughputs come from the calibration table (:mod:`hai.plan.calibration`, printed in
the report with its sources); the other assumptions are module constants. None is tuned to the published number.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hai.config import Config, ConfigError
from hai.parallel.topology import Topology
from hai.pipeline.trace import save_chrome_trace, save_gantt_png
from hai.plan.cost import B_OVER_F, calibration
from hai.plan.memory import GB, GRAD_BYTES
from hai.plan.step import predict, predict_step_time


def _layout(cfg: Config):
    from hai.parallel.layout import PipelineLayout

    p = cfg.parallel
    return PipelineLayout.from_config(cfg.model, p.schedule, p.pp, p.layout)


def describe_layout(cfg: Config) -> str:
    return _layout(cfg).describe()

__all__ = ["plan", "predict_step_time", "PUBLISHED", "ASSUMPTIONS", "build_fake_topology", "save_gantt"]

# DeepSeek-V3 technical report: 180K H800 GPU-hours per trillion tokens on 2048 GPUs; 250 GFLOPs/token at 4K.
PUBLISHED = {
    "gpu_hours_per_trillion_tokens": 180e3,
    "tokens_per_s_per_gpu": 1e12 / 180e3 / 3600,
    "tflops_per_gpu": 1e12 / 180e3 / 3600 * 250e9 / 1e12,
    "mfu_bf16": 1e12 / 180e3 / 3600 * 250e9 / 989.5e12,
}

ASSUMPTIONS = {
    "B_OVER_F": B_OVER_F,
    "GRAD_BYTES": GRAD_BYTES,
    "compute": "every GEMM's forward, input gradient (N and K swapped) and weight gradient at the calibration's "
               "TFLOP/s for its kind and nearest shape (measured at M = its gemm m; TP splits are priced at the "
               "unsplit shape), as shares of the table's nominal peak applied to the cluster's; attention core at "
               "the table's attention TFLOP/s, backward B_OVER_F x forward; under DualPipe with expert parallelism "
               "compute runs on the SMs the all-to-all kernels leave; non-GEMM ops (norms, RoPE, routing, permutes, "
               "quantization) cost nothing",
    "memory": "static bytes = what the construction path allocates (flat ZeRO-1 weight/gradient buffers padded per "
              "bucket, the optimizer shard), checked against the rank built on meta; activations itemized per "
              "kept tensor of the model code (hai/plan/memory.py act_items) under train.recompute and "
              "model.precision; the total uses the configured recompute mode; micro-batch of micro_batch_size x "
              "seq_len tokens; balanced routing; no allocator fragmentation, workspace or communication buffers",
    "comm": "EP all-to-all at the calibration's dispatch / combine GB/s for the EP size (as shares of its nominal "
            "links); P2P and ZeRO-1 at the cluster's nominal GB/s; DualPipe F&B hides EP all-to-all under compute "
            "(F&B = max(F+B compute, fwd+bwd comm)); 1F1B/ZB1P expose it; ZeRO-1 / copy-sync collectives exposed "
            "at the step end, except, without a pipeline and with train.overlap_grad_reduce, the reduce-scatter of "
            "all but the last gradient bucket, hidden under the last micro-batch's backward up to its length; "
            "pipeline costs per stage (an F&B pair splits each stage's F&B in proportion to F and B); non-GEMM "
            "ops (norms, RoPE, routing, permutes) cost nothing; routing perfectly balanced",
}


def build_fake_topology(topo: Topology) -> dict:
    """Build the layout's device meshes with the fake backend in this process (when no group exists yet)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    if topo.world_size == 1 or dist.is_initialized():
        return {"built": False, "world_size": topo.world_size}
    dist.init_process_group("fake", rank=0, world_size=topo.world_size, store=FakeStore())
    try:
        mesh = topo.build_meshes()
        shape = dict(zip(mesh.mesh_dim_names, mesh.shape))
    finally:
        dist.destroy_process_group()
    return {"built": True, "backend": "fake", "world_size": topo.world_size, "mesh": shape}


# ---------------------------------------------------------------- step time


def save_gantt(timeline, path: str | Path, title: str = "", rank_labels: dict[int, str] | None = None) -> Path:
    """The plan's Gantt chart: ``pipeline.trace.save_gantt_png`` of a timeline in seconds (axis in s/ms/µs)."""
    return save_gantt_png(timeline, path, title, rank_labels, unit_s=1.0, width=16.0, dpi=100)


# ---------------------------------------------------------------- the plan


def _variant(cfg: Config, parallel: dict | None = None, model: dict | None = None) -> dict:
    """The plan of a changed config, its memory under the base config's recompute mode (like for like)."""
    return predict(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **(parallel or {})),
                                        model=dataclasses.replace(cfg.model, **(model or {}))), with_comm=False,
                    recompute=cfg.train.recompute)


def _row(name: str, pred: dict) -> dict:
    th, mem = pred["throughput"], pred["memory"]
    return {"variant": name, "step_time_s": pred["step"]["step_time_s"], "tokens_per_s_per_gpu": th[
        "tokens_per_s_per_gpu"], "mfu_bf16": th["mfu_bf16"], "memory_gb": mem["total"] / GB, "fits": mem["fits"]}


def _comparisons(cfg: Config, base: dict) -> list[dict]:
    rows = [_row(f"as configured ({cfg.parallel.schedule}, M={cfg.parallel.node_limit or 'unlimited'}, "
                 f"{cfg.model.precision})", base)]
    p, m = cfg.parallel, cfg.model
    alt = "1f1b" if p.schedule != "1f1b" else "dualpipe"
    if p.pp > 1:
        rows.append(_row(f"schedule={alt}", _variant(cfg, {"schedule": alt})))
    if m.is_moe and p.ep > cfg.cluster.gpus_per_node:
        lim = 0 if p.node_limit else min(4, p.ep // cfg.cluster.gpus_per_node)
        rows.append(_row(f"node_limit={lim or 'unlimited'}", _variant(cfg, {"node_limit": lim})))
    prec = "bf16" if m.precision == "fp8" else "fp8"
    rows.append(_row(f"GEMMs in {prec}", _variant(cfg, model={"precision": prec})))
    if p.pp > 1:  # the other side of parallel.layout: the planner's balanced stages, or the even split
        if p.layout:
            rows.append(_row("parallel.layout= (even split)", _variant(cfg, {"layout": ""})))
        else:
            from hai.plan.layout import choose_layout

            try:
                text = choose_layout(cfg)["text"]
            except ConfigError:
                text = None
            if text is not None:
                rows.append(_row(f"parallel.layout=auto ({text})", _variant(cfg, {"layout": text})))
    return rows + _cp_variants(cfg)


def _cp_variants(cfg: Config) -> list[dict]:
    """Context parallelism at half and twice the degree, dp x cp kept (the layouts the schedule and the sequence
    allow): the memory / step-time trade-off of the CP degree."""
    p, rows = cfg.parallel, []
    if p.cp == 1:
        return rows
    for cp in (p.cp // 2, p.cp * 2):
        if cp < 1 or (p.dp * p.cp) % cp:
            continue
        alt = dataclasses.replace(cfg, parallel=dataclasses.replace(p, cp=cp, dp=p.dp * p.cp // cp))
        try:
            Topology.from_config(alt)
        except ConfigError:
            continue
        rows.append(_row(f"parallel.cp={cp} parallel.dp={alt.parallel.dp}", _variant(alt)))
    return rows


def _published(cfg: Config, pred: dict) -> dict:
    th, st = pred["throughput"], pred["step"]
    ratio = {k: th[k] / v for k, v in PUBLISHED.items() if k in th}
    pub_step = th["tokens_per_step_per_gpu"] / PUBLISHED["tokens_per_s_per_gpu"]
    other = st["step_time_s"] - st["compute_s"]
    implied = st["compute_s"] / (pub_step - other) if pub_step > other else None  # compute throughput factor
    balanced = predict(cfg, with_comm=False, stage_cost="mean")["throughput"]["tokens_per_s_per_gpu"]
    stage_f = st["stage_F_compute_s"]
    return {"published": PUBLISHED, "ratio_plan_over_published": ratio, "published_step_time_s": pub_step,
            "compute_share_of_step": st["compute_s"] / st["step_time_s"],
            "implied_compute_scale": implied,
            "balanced_stages_tokens_per_s_per_gpu": balanced,
            "balanced_stages_ratio": balanced / PUBLISHED["tokens_per_s_per_gpu"],
            "driver": f"compute dominates the predicted step ({st['compute_s'] / st['step_time_s']:.0%}); every "
                      f"stage is priced on its own (forward {min(stage_f) * 1e3:.1f}-{max(stage_f) * 1e3:.1f} ms"
                      + (f": the last stage also runs the bf16 head and MTP, and DualPipe puts it with the first "
                         f"stage's embedding and dense layers on ranks 0 and PP-1), so the busiest ranks set the pace "
                         f"and the rest shows up as bubble (parallel.layout=auto balances them)"
                         if st["busiest_over_mean_compute"] > 1.1 else
                         f"; parallel.layout {describe_layout(cfg)} keeps the busiest rank within "
                         f"{st['busiest_over_mean_compute']:.3f}x the mean)")
                      + f"; with every stage "
                      f"at the mean the plan would give {balanced / PUBLISHED['tokens_per_s_per_gpu']:.2f}x the "
                      f"published throughput. What moves it most is the calibrated compute throughput (step ~ "
                      f"1/throughput while compute-bound; "
                      + (f"{implied:.2f}x the table's kernel throughputs would reproduce the published step" if implied
                         else "no compute throughput would")
                      + "); the roofline also omits non-GEMM ops (norms, RoPE, routing, permutes), routing "
                      "imbalance and kernel launch overheads, all of which make the real run slower"}


def _constructed(cfg: Config, topo: Topology, pp_rank: int, build: bool) -> dict | None:
    """Bytes the real construction path allocates on the worst rank (built on meta under the fake backend)."""
    import torch.distributed as dist

    if not build or dist.is_initialized():
        return None
    from hai.plan.construct import constructed_bytes

    return constructed_bytes(cfg, topo.rank_of(pp_rank, 0, 0))


def plan(cfg: Config, out_dir: str | None = None, build_topology: bool = True) -> dict:
    """Validate the layout and return the full plan (JSON-ready); writes schedule.png / trace.json to ``out_dir``."""
    topo = Topology.from_config(cfg)
    topo_info = build_fake_topology(topo) if build_topology else {"built": False}
    pred = predict(cfg, with_timeline=out_dir is not None)
    timeline = pred.pop("_timeline", None)
    pred["memory"]["formula"] = dict(pred["memory"]["bytes"])
    pred["memory"]["constructed"] = _constructed(cfg, topo, pred["memory"]["worst_param_rank"], build_topology)
    files = {}
    if out_dir is not None and timeline:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        labels = _layout(cfg).rank_labels()
        files["trace"] = str(save_chrome_trace(timeline, d / "trace.json", unit_us=1e6, rank_labels=labels))
        files["gantt"] = str(save_gantt(timeline, d / "schedule.png", title=f"{cfg.parallel.schedule} "
                                        f"pp={cfg.parallel.pp} micro_batches={cfg.n_micro_batches} (simulated step)\n"
                                        f"layout {describe_layout(cfg)}", rank_labels=labels))
    p, c = cfg.parallel, cfg.cluster
    return {
        "layout": {"model": cfg.model.name, "cluster": c.name, "gpu": c.gpu_name, "nodes": c.nodes,
                   "gpus_per_node": c.gpus_per_node, "world_size": topo.world_size, "pp": p.pp, "dp": p.dp,
                   "ep": p.ep, "edp": topo.edp, "tp": p.tp, "cp": p.cp, "sequence_parallel": topo.sequence_parallel,
                   "schedule": p.schedule, "node_limit": p.node_limit,
                   "dispatch": p.dispatch, "fp8_dispatch": p.fp8_dispatch, "precision": cfg.model.precision,
                   "stages": describe_layout(cfg),
                   "seq_len": cfg.train.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
                   "global_batch_size": cfg.train.global_batch_size, "micro_batches": cfg.n_micro_batches},
        "topology": topo_info,
        **pred,
        "comparisons": _comparisons(cfg, pred),
        # the published run is V3's 4K pre-training (the context-extension phases publish no throughput)
        "published_check": _published(cfg, pred) if cfg.model.name == "deepseek_v3_671b" and cfg.train.seq_len == 4096
        else None,
        "assumptions": ASSUMPTIONS,
        "calibration": calibration(cfg).summary(),
        "files": files,
    }

