"""Timelines of pipeline actions as a Chrome trace (chrome://tracing, Perfetto) and as a PNG Gantt chart.

A timeline is a list of ``Event(rank, start, end, action)``; the simulator produces one in cost units, an executor
can produce one in seconds (pass ``unit_us=1e6``). Only compute actions need to be in it; SEND/RECV events are drawn
too when present (as thin bars).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from hai.pipeline.schedules import Action, Kind

__all__ = ["Event", "to_chrome_trace", "save_chrome_trace", "save_gantt_png", "KIND_COLORS"]


class Event(NamedTuple):
    rank: int
    start: float
    end: float
    action: Action


KIND_COLORS = {
    Kind.F: "#4C72B0",  # blue
    Kind.B: "#55A868",  # green: input-gradient backward
    Kind.W: "#C9B037",  # yellow: weight gradient
    Kind.BW: "#2E7D32",  # dark green: full backward
    Kind.FB: "#8172B2",  # purple: overlapped forward & backward
}
_COMM_COLOR = "#999999"


def _args(a: Action) -> dict:
    out = {"kind": a.kind.value, "stage": a.stage, "micro_batch": a.micro_batch}
    if a.kind is Kind.FB:
        out.update(b_stage=a.b_stage, b_micro_batch=a.b_micro_batch)
    if a.peer is not None:
        out["peer"] = a.peer
    return out


def to_chrome_trace(timeline: Sequence[Event], unit_us: float = 1000.0,
                    marks: Sequence[tuple[int, float, str]] = (), rank_labels: Mapping[int, str] | None = None) -> dict:
    """Trace Event Format: one complete ("X") event per action, ``pid`` = rank; ``unit_us`` µs per timeline unit.
    ``marks`` (rank, time, name) become instant events on their own track (the overlapped F&B's seams);
    ``rank_labels`` name the rows (``PipelineLayout.rank_labels``: the stages each rank holds)."""
    labels = rank_labels or {}
    events: list[dict] = []
    for rank in sorted({e.rank for e in timeline}):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": labels.get(rank, f"rank {rank}")}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
    for e in timeline:
        events.append({
            "name": str(e.action), "cat": e.action.kind.value, "ph": "X", "pid": e.rank,
            "tid": 1 if e.action.is_comm else 0,
            "ts": e.start * unit_us, "dur": (e.end - e.start) * unit_us, "args": _args(e.action),
        })
    for rank in sorted({r for r, _, _ in marks}):
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 2, "args": {"name": "seams"}})
    for rank, t, name in marks:
        events.append({"name": name, "cat": "seam", "ph": "i", "s": "t", "pid": rank, "tid": 2, "ts": t * unit_us})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def save_chrome_trace(timeline: Sequence[Event], path: str | Path, unit_us: float = 1000.0,
                      marks: Sequence[tuple[int, float, str]] = (), rank_labels: Mapping[int, str] | None = None) -> Path:
    import json

    path = Path(path)
    path.write_text(json.dumps(to_chrome_trace(timeline, unit_us, marks, rank_labels)))
    return path


def _label(a: Action) -> str:
    if a.kind is Kind.FB:
        return f"{a.micro_batch}&{a.b_micro_batch}"
    return f"{a.micro_batch}"


def _draw_rank(ax, rank: int, events: list[Event], min_label: float) -> None:
    for e in events:
        dur = e.end - e.start
        if e.action.is_comm:
            ax.broken_barh([(e.start, max(dur, 1e-9))], (rank - 0.1, 0.2), color=_COMM_COLOR)
            continue
        ax.broken_barh([(e.start, dur)], (rank - 0.4, 0.8), facecolor=KIND_COLORS[e.action.kind],
                       edgecolor="white", linewidth=0.5)
        if dur >= min_label:
            ax.text(e.start + dur / 2, rank, _label(e.action), ha="center", va="center", fontsize=6, color="white")


def save_gantt_png(timeline: Sequence[Event], path: str | Path, title: str = "",
                   rank_labels: Mapping[int, str] | None = None) -> Path:
    """Gantt chart: one row per rank (rank 0 on top), bars coloured by kind and labelled with micro-batch ids;
    ``rank_labels`` name the rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ranks = sorted({e.rank for e in timeline})
    span = max((e.end for e in timeline), default=1.0) or 1.0
    fig = Figure(figsize=(max(8.0, min(40.0, span / 2.5)), 0.45 * len(ranks) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in ranks:
        _draw_rank(ax, r, [e for e in timeline if e.rank == r], min_label=span / 150)
    ax.set_yticks(ranks, [(rank_labels or {}).get(r, f"rank {r}") for r in ranks])
    ax.set_ylim(max(ranks, default=0) + 0.6, -0.6)
    ax.set_xlim(0, span)
    ax.set_xlabel("time")
    ax.set_title(title)
    used = [k for k in KIND_COLORS if any(e.action.kind is k for e in timeline)]
    ax.legend(handles=[Patch(color=KIND_COLORS[k], label=k.value) for k in used], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
