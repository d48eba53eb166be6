"""``parallel.layout=auto``: the planner's choice of pipeline stages.

A stage's cost is its forward compute per micro-batch under the roofline (``hai.plan.cost.spec_compute_s``: layers,
plus the head and its loss for L, the MTP modules for m); a rank's load is the sum over the stages it holds
(DualPipe: stages r and PP-1-r; DualPipeV: r and 2PP-1-r; 1F1B/ZB1P: stage r), which is what sets its share of the
step. The search:

1. structures: the embedding alone on stage 0 or with the first layers; the head (L) and MTP (m) on the last stage,
   or L closing the second-to-last stage and m alone on the last;
2. for each, the layer counts per stage by local search (one stage gives a layer to another, the boundaries between
   them shifting by one; kept when it lowers the busiest rank's load, ties broken by the spread, and the layout
   still fits memory), from the even split and from a load-proportional start;
3. every candidate that fits ``cluster.memory_gb`` (the plan's memory report) is simulated (the pipeline simulator
   with per-stage costs), and the fastest step wins.

The result is printed in the layout syntax (``hai.parallel.layout``) so it can be pinned with ``parallel.layout=``.
"""

from __future__ import annotations

import dataclasses

from hai.config import Config
from hai.parallel.layout import StageSpec, layout_text, num_stages, rank_stages
from hai.plan.cost import spec_compute_s

__all__ = ["choose_layout", "rank_loads", "resolve_auto"]


def _specs(counts: list[int], embed_alone: bool, split_tail: bool, mtp: bool) -> tuple[StageSpec, ...]:
    """Stage specs from per-stage layer counts; the structure flags place E, L and m."""
    S, out, start = len(counts), [], 0
    for s, n in enumerate(counts):
        head = s == (S - 2 if split_tail else S - 1)
        out.append(StageSpec(s == 0, range(start, start + n), head, mtp and s == S - 1))
        start += n
    return tuple(out)


def rank_loads(cfg: Config, specs: tuple[StageSpec, ...]) -> list[float]:
    """Forward compute per micro-batch pair of every pipeline rank (seconds): the sum over the stages it holds."""
    p = cfg.parallel
    cost = [spec_compute_s(cfg, sp) for sp in specs]
    return [sum(cost[s] for s in rank_stages(p.schedule, p.pp, r)) for r in range(p.pp)]


def _score(loads: list[float]) -> tuple[float, float]:
    mean = sum(loads) / len(loads)
    return max(loads), sum((x - mean) ** 2 for x in loads)


def _fits(cfg: Config, specs: tuple[StageSpec, ...]) -> bool:
    """Whether every rank's static bytes plus its activation peak fit ``cluster.memory_gb`` under this layout."""
    from hai.plan.memory import rank_act_peaks, static_bytes

    alt = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, layout=layout_text(specs)))
    peaks = rank_act_peaks(alt, alt.n_micro_batches)
    cap = cfg.cluster.memory_gb * 1e9
    return all(sum(static_bytes(alt, r).values()) + peaks[r] <= cap for r in range(cfg.parallel.pp))


def _search(cfg: Config, counts: list[int], fixed: set[int], minimum: list[int], build) -> list[int] | None:
    """Move one layer's worth of work from a stage to another (counts per stage; the layers stay in order, every
    boundary between the two shifts by one) while the (max load, spread) improves and the layout still fits memory.
    None when the start does not fit."""
    if not _fits(cfg, build(counts)):
        return None
    best = _score(rank_loads(cfg, build(counts)))
    improved = True
    while improved:
        improved = False
        for src in range(len(counts)):
            for dst in range(len(counts)):
                if src == dst or src in fixed or dst in fixed or counts[src] <= minimum[src]:
                    continue
                trial = list(counts)
                trial[src] -= 1
                trial[dst] += 1
                score = _score(rank_loads(cfg, build(trial)))
                if score < best and _fits(cfg, build(trial)):
                    counts, best, improved = trial, score, True
    return counts


def _starts(L: int, free: list[int], per_layer: list[float], stage_extra: list[float]) -> list[list[int]]:
    """Even split and a load-proportional split of L layers over the ``free`` stages."""
    n = len(free)
    even = [L // n + (1 if i < L % n else 0) for i in range(n)]
    total = sum(per_layer) + sum(stage_extra[s] for s in free)
    target, out, acc, s_i = total / n, [0] * n, 0.0, 0
    for c in per_layer:
        if s_i < n - 1 and acc + stage_extra[free[s_i]] + c / 2 > target * (s_i + 1):
            s_i += 1
        out[s_i] += 1
        acc += c
    for i in range(n):  # the proportional fill can leave the last stages empty: every free stage holds a layer
        if out[i] == 0:
            out[out.index(max(out))] -= 1
            out[i] = 1
    return [even, out]


def choose_layout(cfg: Config) -> dict:
    """The layout minimizing the simulated step among those that fit (module docstring). Returns {text, loads,
    busiest_over_mean, step_time_s, candidates}."""
    from hai.plan.memory import memory_report
    from hai.plan.step import predict_step_time

    m, p = cfg.model, cfg.parallel
    S = num_stages(p.schedule, p.pp)
    L = m.num_layers
    layer_cost = [spec_compute_s(cfg, StageSpec(False, range(i, i + 1), False, False)) for i in range(L)]
    results = []
    for embed_alone in (False, True):
        for split_tail in ([False, True] if m.mtp_depth else [False]):
            fixed = ({0} if embed_alone else set()) | ({S - 1} if split_tail else set())
            free = [s for s in range(S) if s not in fixed]
            if not free or len(free) > L:
                continue
            extra = [spec_compute_s(cfg, sp) for sp in _specs([0] * S, embed_alone, split_tail, m.mtp_depth > 0)]

            def build(counts, embed_alone=embed_alone, split_tail=split_tail):
                return _specs(counts, embed_alone, split_tail, m.mtp_depth > 0)

            minimum = [0 if s in fixed else 1 for s in range(S)]
            for start in _starts(L, free, layer_cost, extra):
                counts = [0] * S
                for s, n in zip(free, start):
                    counts[s] = n
                counts = _search(cfg, counts, fixed, minimum, build)
                if counts is None:
                    continue
                text = layout_text(build(counts))
                if any(r["text"] == text for r in results):
                    continue
                alt = dataclasses.replace(cfg, parallel=dataclasses.replace(p, layout=text))
                loads = rank_loads(cfg, build(counts))
                mem = memory_report(alt, alt.n_micro_batches)
                busiest = max(loads) / (sum(loads) / len(loads))
                results.append({"text": text, "loads": loads, "busiest_over_mean": busiest,
                                "fits": mem["fits"], "memory_gb": mem["total"] / 1e9,
                                "step_time_s": predict_step_time(alt)})
    if not results:
        from hai.config import ConfigError

        raise ConfigError(f"parallel.layout=auto found no layout of {m.num_layers} layers on {S} stages that fits "
                          f"cluster.memory_gb={cfg.cluster.memory_gb:g}: try train.recompute=v3, more parallel.pp, or "
                          f"train.bf16_moments=true")
    best = min(results, key=lambda r: (r["step_time_s"], r["busiest_over_mean"]))
    return {**best, "candidates": results}


def resolve_auto(cfg: Config) -> Config:
    """``parallel.layout=auto`` -> the chosen layout (explicit text); other configs unchanged."""
    if cfg.parallel.layout != "auto":
        return cfg
    if cfg.parallel.pp == 1:
        return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, layout=""))
    choice = choose_layout(cfg)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, layout=choice["text"]))

