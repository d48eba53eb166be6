"""Place P2P and simulate pipeline schedules (pure Python, no processes); the engine, cost model and validator live
in ``hai.pipeline.engine`` (timing model and P2P semantics are described there).

Bubble (``bubble`` everywhere here): for each rank, ``step_time - busy`` where step_time is when the last rank
finishes and busy is the sum of that rank's compute durations; ``bubble`` is the largest over ranks: the per-device
idle time DeepSeek-V3's Table 2 formulas give.

Activations (``peak_activations``): one unit = the stored activations of one stage chunk for one micro-batch, held
from the start of its forward (F, or FB's forward half) to the end of its W, or of its BW / FB backward half (full
backward). An input-gradient B frees nothing (W still needs the inputs). Counted in program order per rank, so it
does not depend on the costs; an FB counts both its micro-batches while it runs.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from typing import Optional

from hai.pipeline.engine import Costs, cross_edges, Engine, recv_for, send_for, validate
from hai.pipeline.schedules import Action, Kind, build_schedule, compute_only, num_stages, param_copies
from hai.pipeline.trace import Event

__all__ = [
    "Costs",
    "SimResult",
    "add_send_recv",
    "validate",
    "simulate",
    "simulate_schedule",
    "bubble_formula",
    "peak_activations",
    "report",
    "format_report",
]


@dataclass(frozen=True)
class SimResult:
    step_time: float
    busy: list[float]  # per rank: sum of compute durations
    bubble_per_rank: list[float]  # per rank: step_time - busy
    bubble: float  # max over ranks
    peak_activations: list[int]  # per rank, in stage-chunk micro-batch units
    timeline: list[Event] = field(repr=False)  # every action with its start and end, in the order they ran

    @property
    def peak(self) -> int:
        return max(self.peak_activations)


# ---------------------------------------------------------------- P2P placement


def add_send_recv(schedules: list[list[Action]], costs: Optional[Costs] = None) -> list[list[Action]]:
    """Insert SEND/RECV. Each SEND goes right after its producer. Each RECV goes into the first gap (between two
    computes) of the consumer's rank that the rank leaves no earlier than the value is sent, in the simulated timing
    under ``costs`` (zero durations count as tiny); that is never later than just before the consumer.

    Receives are thus posted in send order, which keeps every rank pair's sends and receives in the same FIFO order
    (NCCL matches P2P by order, not tag), and every wait points to a gap that the simulated timing leaves strictly
    earlier, so the result cannot deadlock even when a rank waits for each whole batch, sends included.
    """
    base = compute_only(schedules)
    c = costs or Costs()
    eps = 1e-6 * max(c.F, c.B, c.FB, *(max(x.F, x.B, x.FB) for x in c.stages), 1.0)
    timing = c.with_floor(eps)
    engine = Engine(base, timing)
    if engine.run():
        validate(base)  # raises with the grid
    starts: list[list[float]] = [[] for _ in base]
    ends: list[list[float]] = [[] for _ in base]
    for e in engine.events:  # each rank's events come in program order
        starts[e.rank].append(e.start)
        ends[e.rank].append(e.end)
    return _place(base, cross_edges(base), starts, ends)


def _place(base, edges, starts, ends) -> list[list[Action]]:
    """Gap g of a rank sits before its compute g; the rank leaves gap g when compute g starts."""
    sends: dict[tuple[int, int], list] = {}
    recvs: dict[tuple[int, int], list] = {}
    for key, src, i, dst, j in edges:
        sends.setdefault((src, i + 1), []).append((key, dst))
        sent = ends[src][i]
        gap = bisect_left(starts[dst], sent, hi=j)  # starts[dst][j] >= sent + p2p: the consumer waited for it
        recvs.setdefault((dst, gap), []).append((sent, src, i, key))
    out = []
    for r, acts in enumerate(base):
        new: list[Action] = []
        for g in range(len(acts) + 1):  # per producer: activation before gradient, on both ends
            new += [send_for(k, d) for k, d in sorted(sends.get((r, g), []), key=lambda x: (x[1], x[0][0] != "F"))]
            new += [recv_for(k, s) for _, s, _, k in sorted(recvs.get((r, g), []), key=_order)]
            if g < len(acts):
                new.append(acts[g])
        out.append(new)
    return out


def _order(item: tuple) -> tuple:
    sent, src, step, key = item
    return (sent, src, step, key[0] != "F")


# ---------------------------------------------------------------- simulation


def peak_activations(acts: list[Action]) -> int:
    """Peak live activation units on one rank (see the module docstring)."""
    live = peak = 0
    for a in acts:
        if not a.is_compute:
            continue
        live += sum(p.kind is Kind.F for p in a.parts)
        peak = max(peak, live)
        live -= sum(p.kind in (Kind.W, Kind.BW) for p in a.parts)
    return peak


def simulate(schedules: list[list[Action]], costs: Optional[Costs] = None,
             wait_batches: bool = False) -> SimResult:
    """Validate, then time the schedule under ``costs`` (default ``Costs()``); the timing model is described in
    ``hai.pipeline.engine``."""
    costs = costs or Costs()
    validate(schedules, wait_batches)
    engine = Engine(schedules, costs, wait_batches)
    engine.run()
    step = max((e.end for e in engine.events if e.action.is_compute), default=0.0)
    busy = [sum(costs.of(a) for a in acts) for acts in schedules]
    idle = [step - b for b in busy]
    return SimResult(step, busy, idle, max(idle), [peak_activations(a) for a in schedules], engine.events)


def simulate_schedule(name: str, pp: int, n_micro: int, costs: Optional[Costs] = None,
                      with_comm: bool = True, wait_batches: bool = False) -> SimResult:
    """Build a named schedule, add SEND/RECV (``with_comm``) and simulate it."""
    sched = build_schedule(name, pp, n_micro)
    return simulate(add_send_recv(sched, costs) if with_comm else sched, costs, wait_batches)


def bubble_formula(name: str, pp: int, costs: Optional[Costs] = None) -> float:
    """DeepSeek-V3 Table 2 (B = full backward): 1F1B (PP-1)(F+B); ZB1P (PP-1)(F+B-2W); DualPipe
    (PP/2-1)(F&B+B-3W); DualPipeV, whose pp devices hold 2*pp stages, the DualPipe bubble of PP=2*pp: (pp-1)(...)."""
    c = costs or Costs()
    num_stages(name, pp)  # checks the name
    return {
        "1f1b": (pp - 1) * (c.F + c.B),
        "zb1p": (pp - 1) * (c.F + c.B - 2 * c.W),
        "dualpipe": (pp // 2 - 1) * (c.FB + c.B - 3 * c.W),
        "dualpipev": (pp - 1) * (c.FB + c.B - 3 * c.W),
    }[name]


def report(schedule_name: str, pp: int, n_micro: int, costs: Optional[Costs] = None) -> dict:
    """JSON-ready summary for ``hai plan``: step time, bubble (max over ranks), the formula, peaks, param copies."""
    costs = costs or Costs()
    res = simulate_schedule(schedule_name, pp, n_micro, costs)
    return {
        "schedule": schedule_name,
        "pp": pp,
        "micro_batches": n_micro,
        "stages": num_stages(schedule_name, pp),
        "costs": asdict(costs),
        "step_time": res.step_time,
        "bubble": res.bubble,
        "bubble_formula": bubble_formula(schedule_name, pp, costs),
        "bubble_per_rank": res.bubble_per_rank,
        "busy_per_rank": res.busy,
        "peak_activations": res.peak,
        "peak_activations_per_rank": res.peak_activations,
        "param_copies": param_copies(schedule_name),
    }


def format_report(rep: dict) -> str:
    """Two-column text table of a ``report`` dict."""
    c = rep["costs"]
    rows = [
        ("schedule", f"{rep['schedule']} (pp={rep['pp']}, micro_batches={rep['micro_batches']}, "
                     f"stages={rep['stages']})"),
        ("costs (per stage chunk)", f"F={c['F']:g} B={c['B']:g} (B'={c['B'] - c['W']:g} W={c['W']:g}) "
                                    f"F&B={c['FB']:g} p2p={c['p2p']:g}"),
        ("step time", f"{rep['step_time']:g}"),
        ("bubble (max over ranks)", f"{rep['bubble']:g}"),
        ("bubble, published formula", f"{rep['bubble_formula']:g}"),
        ("bubble per rank", " ".join(f"{b:g}" for b in rep["bubble_per_rank"])),
        ("peak activations (micro-batches)",
         f"{rep['peak_activations']} (per rank: {' '.join(map(str, rep['peak_activations_per_rank']))})"),
        ("parameter copies", f"{rep['param_copies']}x"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
