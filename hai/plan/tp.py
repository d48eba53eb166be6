"""Tensor-parallel communication of a layout: the bytes of every TP collective one rank joins per micro-batch.

Counted as *tensor bytes* per collective, what :mod:`hai.parallel.tensor_parallel` hands to it: an all-gather's
output (the full-sequence tensor), a reduce-scatter's input, an all-reduce's tensor. On the wire a ring sends
``(tp-1)/tp`` of that per rank for an all-gather or a reduce-scatter and ``2 (tp-1)/tp`` for an all-reduce, over
NVLink (a TP group lives in one node). ``benchmarks/tp.py`` counts the same bytes in a real run.

Per micro-batch of T = micro_batch_size x seq_len tokens, ``a`` bytes per activation, L = the latents entering the
attention region (q_lora_rank + kv_lora_rank + rope dim; D + kv_lora_rank + rope dim without q compression):

=================  ======================================  ========================================================
piece              without SP                              with SP
=================  ======================================  ========================================================
attention          fwd AR T·D·a; bwd AR T·L·a              fwd AG T·L·a + RS T·D·a; bwd RS T·L·a + AG T·D·a
dense / shared MLP fwd AR T·D·a; bwd AR T·D·a              fwd AG + RS T·D·a each; bwd RS + AG T·D·a each
embedding          fwd AR T·D·a                            fwd RS T·D·a; bwd AG T·D·a
head (+ loss)      bwd AR T·D·a; fwd AR 3 x T x 4          fwd AG T·D·a; bwd RS T·D·a; fwd AR 3 x T x 4
MoE balance loss   fwd AR 2 x B·E·4 (when seq_aux_alpha > 0; SP only)
=================  ======================================  ========================================================

``train.recompute=full`` re-runs each block segment's forward in the backward up to its last saved tensor
(torch.utils.checkpoint's early stop): under SP the all-gathers entering the regions again, and the whole MoE front
when the balance loss (computed last, and keeping tensors) is on.
"""

from __future__ import annotations

from hai.config import Config
from hai.parallel.layout import PipelineLayout
from hai.plan.memory import act_bytes, is_moe_layer

__all__ = ["tp_chunk_bytes", "tp_chunk_seconds", "tp_layer_bytes", "add_bytes", "ring_seconds"]


def add_bytes(acc: dict, phase: str, kind: str, n: float) -> None:
    """``acc[phase][kind] += n`` (per-chunk collective bytes: phase fwd|bwd, kind all_gather|reduce_scatter|...)."""
    acc[phase][kind] = acc[phase].get(kind, 0.0) + n


def ring_seconds(by_phase: dict, size: int, bytes_per_s: float) -> tuple[float, float]:
    """(forward, backward) seconds of per-chunk collective bytes over a ring of ``size`` ranks on one link class
    (each rank moves (size-1)/size of an all-gather's or reduce-scatter's tensor, twice that of an all-reduce)."""
    if size == 1:
        return 0.0, 0.0
    ring = {"all_gather": (size - 1) / size, "reduce_scatter": (size - 1) / size, "all_reduce": 2 * (size - 1) / size}
    return tuple(sum(ring[k] * n for k, n in by_phase[ph].items()) / bytes_per_s for ph in ("fwd", "bwd"))


def tp_layer_bytes(cfg: Config, piece: str) -> dict:
    """{"fwd": {kind: bytes}, "bwd": {...}} of one piece (attention | mlp | moe | embed | head) per micro-batch."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    out = {"fwd": {}, "bwd": {}}
    if p.tp == 1:
        return out
    sp = p.sequence_parallel
    T, a, D = t.micro_batch_size * t.seq_len, act_bytes(m), m.hidden_size
    TD = T * D * a
    if piece == "attention":
        lat = (m.q_lora_rank if m.q_lora_rank else D) + m.kv_lora_rank + m.qk_rope_head_dim
        TL = T * lat * a
        if sp:
            add_bytes(out, "fwd", "all_gather", TL), add_bytes(out, "fwd", "reduce_scatter", TD)
            add_bytes(out, "bwd", "reduce_scatter", TL), add_bytes(out, "bwd", "all_gather", TD)
        else:
            add_bytes(out, "fwd", "all_reduce", TD), add_bytes(out, "bwd", "all_reduce", TL)
    elif piece in ("mlp", "moe"):
        if piece == "mlp" or m.n_shared_experts:
            if sp:
                for phase in ("fwd", "bwd"):
                    add_bytes(out, phase, "all_gather", TD), add_bytes(out, phase, "reduce_scatter", TD)
            else:
                add_bytes(out, "fwd", "all_reduce", TD), add_bytes(out, "bwd", "all_reduce", TD)
        if piece == "moe" and m.seq_aux_alpha > 0 and sp:
            add_bytes(out, "fwd", "all_reduce", 2 * t.micro_batch_size * m.n_routed_experts * 4)
    elif piece == "embed":
        if sp:
            add_bytes(out, "fwd", "reduce_scatter", TD), add_bytes(out, "bwd", "all_gather", TD)
        else:
            add_bytes(out, "fwd", "all_reduce", TD)
    elif piece == "head":
        if sp:
            add_bytes(out, "fwd", "all_gather", TD), add_bytes(out, "bwd", "reduce_scatter", TD)
        else:
            add_bytes(out, "bwd", "all_reduce", TD)
        add_bytes(out, "fwd", "all_reduce", 3 * T * 4)
    else:
        raise ValueError(f"unknown piece {piece!r}")
    if cfg.train.recompute == "full" and piece in ("attention", "mlp", "moe") and sp:
        # the backward re-runs a segment's forward only up to its last saved tensor (torch.utils.checkpoint stops
        # early): the region's all-gathers again, not the reduce-scatter that ends it
        # (in the MoE front the balance loss comes last and keeps tensors: there everything re-runs)
        everything = piece == "moe" and m.seq_aux_alpha > 0
        for kind, n in list(out["fwd"].items()):
            if kind == "all_gather" or everything:
                add_bytes(out, "bwd", kind, n)
    return out


def tp_chunk_bytes(cfg: Config, stage: int) -> dict:
    """TP tensor bytes of one micro-batch through pipeline stage ``stage`` (what the layout gives it)."""
    m, p = cfg.model, cfg.parallel
    sp = PipelineLayout.from_config(m, p.schedule, p.pp, p.layout).specs[stage]
    pieces = []  # (piece, fraction of the micro-batch's positions it runs on)
    for i in sp.layers:
        pieces += [("attention", 1.0), ("moe" if is_moe_layer(m, i) else "mlp", 1.0)]
    if sp.embed:
        pieces.append(("embed", 1.0))
    if sp.head:
        pieces.append(("head", 1.0))
    if sp.mtp:  # depth k runs on S-k positions (with SP on all S, the shifted inputs padded)
        S = cfg.train.seq_len
        for k in range(1, m.mtp_depth + 1):
            f = 1.0 if p.sequence_parallel else (S - k) / S
            pieces += [(x, f) for x in ("embed", "attention", "moe" if m.is_moe else "mlp", "head")]
    out = {"fwd": {}, "bwd": {}}
    for piece, frac in pieces:
        for phase, kinds in tp_layer_bytes(cfg, piece).items():
            for kind, n in kinds.items():
                add_bytes(out, phase, kind, n * frac)
    return out


def tp_chunk_seconds(cfg: Config, stage: int) -> tuple[float, float]:
    """(forward, backward) seconds of a chunk's TP collectives over NVLink (ring; not overlapped in HAI)."""
    if cfg.parallel.tp == 1:
        return 0.0, 0.0
    return ring_seconds(tp_chunk_bytes(cfg, stage), cfg.parallel.tp, cfg.cluster.nvlink_gbps * 1e9)
