"""Text rendering of a `hai plan` report (see :func:`hai.plan.plan` for the dict)."""

from __future__ import annotations

__all__ = ["format_plan"]

GB = 1e9


def _t(seconds: float) -> str:
    """A duration with 4 significant digits, in s, ms or µs."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale or unit == "µs":
            return f"{seconds / scale:.4g} {unit}"
    raise AssertionError


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"== {title}"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def _gb(x: float) -> str:
    return f"{x / GB:,.2f} GB"


def _layout(r: dict) -> str:
    lay, topo = r["layout"], r["topology"]
    mesh = f"fake-backend meshes built: {topo.get('mesh')}" if topo.get("built") else "no process group built"
    return _table("layout", [
        ("model / cluster", f"{lay['model']} on {lay['cluster']} ({lay['nodes']} x {lay['gpus_per_node']} "
                            f"{lay['gpu']} = {lay['world_size']} GPUs)"),
        ("parallelism", f"pp={lay['pp']} dp={lay['dp']} "
                        + (f"cp={lay['cp']} " if lay.get("cp", 1) > 1 else "")
                        + (f"tp={lay['tp']}{' (SP)' if lay.get('sequence_parallel') else ''} " if lay.get("tp", 1) > 1
                           else "")
                        + f"ep={lay['ep']} edp={lay['edp']} schedule={lay['schedule']} "
                        f"node_limit={lay['node_limit'] or 'unlimited'} dispatch={lay['dispatch']} "
                        f"fp8_dispatch={lay['fp8_dispatch']} precision={lay['precision']}"),
        ("stages (parallel.layout)", lay["stages"]),
        ("batch", f"global {lay['global_batch_size']} x seq {lay['seq_len']}; micro-batch {lay['micro_batch_size']} "
                  f"seq; {lay['micro_batches']} micro-batches per pipeline per step"),
        ("topology", mesh),
    ])


_MODE_NAMES = {"none": "recompute=none", "v3": "recompute=v3 (V3's recipe)", "full": "recompute=full"}


def _static(m: dict) -> list[tuple[str, str]]:
    f, c = m["formula"], m.get("constructed")
    rows = []
    for key, name in (("parameters", "weights (flat ZeRO-1 buffers)"), ("gradients", "gradients (fp32 flat buffers)"),
                      ("optimizer", "ZeRO-1 optimizer shard")):
        built = "" if c is None else f"; built on meta: {_gb(c[key])} ({'equal' if c[key] == f[key] else 'DIFFERENT'})"
        rows.append((name, f"{_gb(f[key])} by formula{built}"))
    return rows


def _memory(m: dict) -> str:
    pr, a, cap, head = m["params_per_gpu"], m["activations"], m["capacity"], m["policy"]

    def total(x: dict) -> str:
        return (f"{_gb(x['total'])} of {_gb(cap)} on rank {x['rank']} (weights/gradients/optimizer "
                f"{_gb(x['static'])} + activations {_gb(x['activations'])}): {'FITS' if x['fits'] else 'DOES NOT FIT'}")

    rows = [("parameters held", f"{pr['total']:,} on rank {m['worst_param_rank']}, the most static bytes of any rank "
                                f"(dense {pr['dense']:,} replicated over dp, routed experts {pr['expert']:,} = its "
                                f"1/ep share)"), *_static(m)]
    for mode, name in _MODE_NAMES.items():
        rows.append((f"activations, {name}", f"peak {_gb(a[mode]['peak'])} on rank {a[mode]['peak_rank']}; MoE layer "
                                             f"{a[mode]['moe_layer_bytes_per_token']:,.0f} B/token"))
    for mode, name in _MODE_NAMES.items():
        rows.append((f"total, {name}", total(a[mode]) + ("  <- the plan's total" if mode == head else "")))
    big = a[head]
    rows.append((f"largest rank {big['rank']}", ", ".join(f"{k} {_gb(v)}" for k, v in big["static_items"].items())
                 + f", activations {_gb(big['activations'])}"))
    rows.append((f"kept per token ({_MODE_NAMES[head]}, {m['precision']})", "; ".join(
        f"{i['tensor']} {i['bytes']:,.0f} B" for i in m["items_per_token"])))
    stage = m.get("checkpoint_staging")
    if stage:
        rows.append(("checkpoint staging (host)", f"{_gb(stage['bytes'])} per rank: a copy of its weights and "
                     f"optimizer shard for train.async_save ({'on' if stage['async_save'] else 'off in this config'})"))
    return _table(f"memory per GPU ({m['param_copies']}x parameter copies; a total is the largest over pipeline "
                  f"ranks of that rank's weights, gradients, optimizer shard and own activation peak)", rows)


def _comm(c: dict) -> str:
    ep, tok, z = c["ep_per_step"], c["ep_per_token_per_layer"], c["zero1_per_step"]
    return _table("communication per GPU per step (bytes sent)", [
        ("EP rows per token per MoE layer", f"IB {tok['ib']:.3f} (nodes/token {tok['nodes_per_token']:.3f}), "
                                            f"NVLink {tok['nvlink']:.3f}; dispatch row {tok['dispatch_row_bytes']} B, "
                                            f"combine row {tok['combine_row_bytes']} B"),
        ("EP forward (dispatch+combine)", f"IB {_gb(ep['fwd_ib'])}, NVLink {_gb(ep['fwd_nvlink'])}"),
        ("EP backward (bf16 grads)", f"IB {_gb(ep['bwd_ib'])}, NVLink {_gb(ep['bwd_nvlink'])}"),
        ("pipeline P2P (act + grad)", _gb(c["pipeline_p2p_per_step"])),
        ("ZeRO-1 reduce-scatter (fp32)", _gb(z["reduce_scatter"])),
        ("ZeRO-1 all-gather (params)", _gb(z["all_gather"])),
        ("DualPipe copy gradient sync", _gb(z["copy_grad_sync"])),
        *_tp_rows(c),
        *_cp_rows(c),
    ])


def _tp_rows(c: dict) -> list[tuple[str, str]]:
    """Tensor-parallel collectives per micro-batch (tensor bytes; hai.plan.tp) and their NVLink time."""
    t = c.get("tp_per_chunk")
    if not t:
        return []

    def kinds(d):
        return ", ".join(f"{k.replace('_', '-')} {v / 1e6:,.1f} MB" for k, v in d.items()) or "-"

    rows = [(f"TP per micro-batch (stage {t['stage']})", f"fwd {kinds(t['bytes']['fwd'])}; bwd "
                                                        f"{kinds(t['bytes']['bwd'])}; NVLink {t['fwd_s'] * 1e3:.2f} + "
                                                        f"{t['bwd_s'] * 1e3:.2f} ms (not overlapped)")]
    for piece, b in t["per_piece"].items():
        rows.append((f"  TP {piece} layer", f"fwd {kinds(b['fwd'])}; bwd {kinds(b['bwd'])}"))
    return rows


def _cp_rows(c: dict) -> list[tuple[str, str]]:
    """Context-parallel collectives per micro-batch (tensor bytes; hai.plan.cp), and per layer the latent
    all-gather against the K/V all-gather / ring and absorbed attention."""
    t = c.get("cp_per_chunk")
    if not t:
        return []
    x = t["per_layer"]

    def kinds(d):
        return ", ".join(f"{k.replace('_', '-')} " + (f"{v / 1e6:,.1f} MB" if v >= 1e5 else f"{v / 1e3:,.1f} kB")
                         for k, v in d.items()) or "-"

    return [
        (f"CP per micro-batch (stage {t['stage']})", f"fwd {kinds(t['bytes']['fwd'])}; bwd {kinds(t['bytes']['bwd'])}; "
                                                    f"{t['link']} {t['fwd_s'] * 1e3:.2f} + {t['bwd_s'] * 1e3:.2f} ms "
                                                    f"(not overlapped)"),
        ("  CP per attention layer (fwd)", f"latent all-gather {x['latent_allgather_bytes'] / 1e6:,.1f} MB "
                                           f"({x['latent_wire_bytes'] / 1e6:,.1f} MB on the wire) vs K/V all-gather or "
                                           f"ring {x['kv_allgather_bytes'] / 1e6:,.1f} MB "
                                           f"({x['kv_wire_bytes'] / 1e6:,.1f} MB on the wire): "
                                           f"{x['kv_over_latent']:.0f}x"),
        ("  CP compute per attention layer", f"core {x['attention_core_flops'] / 1e12:,.2f} TFLOP; every key's "
                                             f"up-projection +{100 * x['extra_upproj_share_of_core']:.1f}% of it "
                                             f"(the price of gathering latents); absorbed attention would be "
                                             f"{x['absorbed_over_core']:.1f}x the core"),
        ("  attention working set (transient)", f"{_gb(t['attention_working_set'])}: one layer's backward (the "
                                                f"window's k, v and fp32 gradients, not in the totals above)"),
    ]


def _step(r: dict) -> str:
    s, t, p = r["step"], r["throughput"], r["pipeline"]
    c = p["costs"]
    return _table("step time (roofline -> pipeline simulator)", [
        ("chunk costs", f"F={_t(c['F'])} B={_t(c['B'])} W={_t(c['W'])} F&B={_t(c['FB'])} p2p={_t(c['p2p'])} "
                        f"(compute F {_t(s['chunk_F_compute_s'])}; EP comm fwd {_t(s['chunk_comm_fwd_s'])} "
                        f"bwd {_t(s['chunk_comm_bwd_s'])}; F&B overlap {s['fb_overlap']})"),
        ("pipeline", f"{p['schedule']} pp={p['pp']} micro_batches={p['micro_batches']}: step {_t(p['step_time'])}, "
                     f"bubble {_t(p['bubble'])} (the largest over ranks; formula {_t(p['bubble_formula'])}), "
                     f"peak activations "
                     f"{p['peak_activations']} micro-batches"),
        ("stage forward compute", " ".join(_t(x) for x in s["stage_F_compute_s"])),
        ("rank compute per step", " ".join(_t(x) for x in s["rank_compute_s"])
         + f"  (busiest / mean {s['busiest_over_mean_compute']:.3f})"),
        (f"step on busiest rank {s['busiest_rank']}",
         f"compute {_t(s['compute_s'])} + exposed EP comm {_t(s['exposed_comm_s'])} + "
         f"idle {_t(s['bubble_s'])} + ZeRO-1/copy sync {_t(s['zero1_s'])}"
         + (f" (+ {_t(s['zero1_hidden_s'])} of reduce-scatter under the last backward)"
            if s.get("zero1_hidden_s") else "")),
        ("predicted step time", _t(s['step_time_s'])),
        ("tokens/s per GPU", f"{t['tokens_per_s_per_gpu']:,.0f}"),
        ("TFLOP/s per GPU", f"{t['tflops_per_gpu']:,.1f}  ({t['flops_per_token'] / 1e9:.1f} GFLOPs/token)"),
        ("MFU (bf16 peak)", f"{100 * t['mfu_bf16']:.1f}%"),
        ("GPU-hours per 1T tokens", f"{t['gpu_hours_per_trillion_tokens']:,.0f}"),
    ])


def _comparisons(rows: list[dict]) -> str:
    w = max([44, *(len(x["variant"]) for x in rows)])
    out = ["== comparisons", f"  {'variant':<{w}} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>7} {'mem GB':>8}  fits"]
    for x in rows:
        out.append(f"  {x['variant']:<{w}} {x['step_time_s']:>8.3f} {x['tokens_per_s_per_gpu']:>10,.0f} "
                   f"{100 * x['mfu_bf16']:>6.1f}% {x['memory_gb']:>8.1f}  {x['fits']}")
    return "\n".join(out)


def _published(pc: dict) -> str:
    pub, ratio = pc["published"], pc["ratio_plan_over_published"]
    imp = pc["implied_compute_scale"]
    return _table("check against DeepSeek-V3's published run (2048 H800)", [
        ("GPU-hours per 1T tokens", f"published {pub['gpu_hours_per_trillion_tokens']:,.0f}; plan/published "
                                    f"{ratio['gpu_hours_per_trillion_tokens']:.2f}"),
        ("tokens/s per GPU", f"published {pub['tokens_per_s_per_gpu']:,.0f}; plan/published "
                             f"{ratio['tokens_per_s_per_gpu']:.2f}"),
        ("TFLOP/s per GPU", f"published {pub['tflops_per_gpu']:,.0f}; plan/published {ratio['tflops_per_gpu']:.2f}"),
        ("MFU (bf16)", f"published {100 * pub['mfu_bf16']:.1f}%; plan/published {ratio['mfu_bf16']:.2f}"),
        ("published step time", f"{pc['published_step_time_s']:.3f} s; compute is "
                                f"{100 * pc['compute_share_of_step']:.0f}% of the predicted step"),
        ("balanced-stage sensitivity", f"{pc['balanced_stages_tokens_per_s_per_gpu']:,.0f} tokens/s/GPU "
                                       f"({pc['balanced_stages_ratio']:.2f}x published) if every stage cost the mean"),
        ("implied compute scale", "n/a" if imp is None else f"{imp:.3f}x the calibrated kernel throughputs would "
                                                            f"reproduce the published step (all else equal; not "
                                                            f"applied)"),
        ("driver", pc["driver"]),
    ])


def _calibration(cal: dict) -> str:
    """The table the compute and all-to-all costs came from, and its sources."""
    a2a = cal["all_to_all_gbps"]
    link = lambda rows: ", ".join(f"EP{e:g} {d:g}/{c:g}" for e, d, c in rows)  # noqa: E731
    shapes = lambda rows: ", ".join(f"{n:g}x{k:g} {t:g}" for n, k, t in rows)  # noqa: E731
    return _table(f"calibration {cal['name']} ({cal['gpu']}; {cal['path']})", [
        ("FP8 dense GEMM TFLOP/s", f"N x K: {shapes(cal['gemm_fp8_tflops_dense'])}"),
        ("FP8 grouped GEMM TFLOP/s", f"N x K: {shapes(cal['gemm_fp8_tflops_grouped'])}; wgrad "
                                     f"{cal['wgrad_tflops']:g}"),
        ("BF16 GEMMs / attention", f"{cal['gemm_bf16_efficiency']:g} of BF16 peak / "
                                   f"{cal['attention_tflops_bf16']:g} TFLOP/s"),
        ("all-to-all dispatch/combine GB/s", f"NVLink {link(a2a['intranode'])}; RDMA {link(a2a['internode'])}"),
        ("SMs", cal["sms"]),
        *((f"source: {k}", v) for k, v in cal["sources"].items()),
    ])


def format_plan(r: dict) -> str:
    a = r["assumptions"]
    assumptions = _table("assumptions (module constants, hai/plan/cost.py, hai/plan/memory.py)",
                         [(k, str(v)) for k, v in a.items()])
    parts = [_layout(r), _memory(r["memory"]), _comm(r["communication"]), _step(r), _comparisons(r["comparisons"]),
             _calibration(r["calibration"]), assumptions]
    if r.get("published_check"):
        parts.insert(-1, _published(r["published_check"]))
    if r.get("files"):
        parts.append(_table("files", [(k, v) for k, v in r["files"].items()]))
    return "\n\n".join(parts)
