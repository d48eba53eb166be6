"""Timelines of pipeline actions as a Chrome trace (chrome://tracing, Perfetto) and as a PNG Gantt chart.

A timeline is a list of ``Event(rank, start, end, action)``; the simulator produces one in cost units, an executor
can produce one in seconds (pass ``unit_us=1e6`` to the trace, ``unit_s=1.0`` to the Gantt chart). Only compute
actions need to be in it; SEND/RECV events are drawn too when present (as thin bars).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from hai.pipeline.schedules import Action, Kind

__all__ = ["Event", "to_chrome_trace", "save_chrome_trace", "save_gantt_png", "time_unit", "KIND_COLORS"]


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
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": labels.get(rank, f"rank {rank}")}})
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
                      marks: Sequence[tuple[int, float, str]] = (),
                      rank_labels: Mapping[int, str] | None = None) -> Path:
    import json

    path = Path(path)
    path.write_text(json.dumps(to_chrome_trace(timeline, unit_us, marks, rank_labels)))
    return path


def _label(a: Action) -> str:
    if a.kind is Kind.FB:
        return f"{a.micro_batch}&{a.b_micro_batch}"
    return f"{a.micro_batch}"


_TIME_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))
_MAX_LABELS = 2000  # micro-batch ids are drawn when a chart has at most this many compute bars (text is slow)


def time_unit(span_s: float) -> tuple[float, str]:
    """The largest of s / ms / µs / ns in which ``span_s`` seconds is at least 1 (``(1e-3, "ms")`` for 0.35 s)."""
    return next(((f, n) for f, n in _TIME_UNITS if span_s >= f), _TIME_UNITS[-1])


def _bars(timeline: Sequence[Event]) -> tuple[dict, dict]:
    """Compute bars grouped by (rank, kind) and communication bars by rank: one ``broken_barh`` per group keeps a
    chart of thousands of actions fast (one collection per action is quadratic in matplotlib)."""
    compute: dict = {}
    comm: dict = {}
    for e in timeline:
        if e.action.is_comm:
            comm.setdefault(e.rank, []).append((e.start, max(e.end - e.start, 1e-12)))
        else:
            compute.setdefault((e.rank, e.action.kind), []).append((e.start, e.end - e.start))
    return compute, comm


def _draw(ax, timeline: Sequence[Event], min_label: float) -> None:
    compute, comm = _bars(timeline)
    for (rank, kind), xs in compute.items():
        ax.broken_barh(xs, (rank - 0.4, 0.8), facecolor=KIND_COLORS[kind], edgecolor="white", linewidth=0.4)
    for rank, xs in comm.items():
        ax.broken_barh(xs, (rank - 0.1, 0.2), color=_COMM_COLOR)
    if sum(len(xs) for xs in compute.values()) > _MAX_LABELS:
        return
    for e in timeline:
        if e.action.is_compute and e.end - e.start >= min_label:
            ax.text((e.start + e.end) / 2, e.rank, _label(e.action), ha="center", va="center", fontsize=6,
                    color="white")


def _time_axis(ax, span: float, unit_s: float | None) -> None:
    """x axis in the timeline's units, or, for a timeline in seconds-per-unit ``unit_s``, in s/ms/µs/ns."""
    if unit_s is None:
        ax.set_xlabel("time (cost units)")
        return
    from matplotlib.ticker import FuncFormatter

    factor, name = time_unit(span * unit_s)
    scale = unit_s / factor
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x * scale:g}"))
    ax.set_xlabel(f"time ({name})")


def save_gantt_png(timeline: Sequence[Event], path: str | Path, title: str = "",
                   rank_labels: Mapping[int, str] | None = None, unit_s: float | None = None,
                   width: float | None = None, dpi: int = 120) -> Path:
    """Gantt chart: one row per rank (rank 0 on top), compute bars coloured by kind and labelled with micro-batch
    ids (up to a few hundred bars), communication as thin grey bars; ``rank_labels`` name the rows. ``unit_s``:
    seconds per timeline unit (1.0 for a timeline in seconds; the axis then reads in s, ms, µs or ns, whichever
    keeps the numbers readable); None for the simulator's cost units. ``width`` in inches (default: by span)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ranks = sorted({e.rank for e in timeline})
    span = max((e.end for e in timeline), default=1.0) or 1.0
    width = width or (16.0 if unit_s is not None else max(8.0, min(40.0, span / 2.5)))
    fig = Figure(figsize=(width, 0.45 * len(ranks) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw(ax, timeline, min_label=span / 150)
    ax.set_yticks(ranks, [(rank_labels or {}).get(r, f"rank {r}") for r in ranks])
    ax.set_ylim(max(ranks, default=0) + 0.6, -0.6)
    ax.set_xlim(0, span)
    _time_axis(ax, span, unit_s)
    ax.set_title(title)
    used = [k for k in KIND_COLORS if any(e.action.kind is k for e in timeline)]
    ax.legend(handles=[Patch(color=KIND_COLORS[k], label=k.value) for k in used], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
