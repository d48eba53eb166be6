"""The pipeline engine: the cost model, data flow, an event-driven run of every rank's action list, and the
validator (structure, SEND/RECV matching and order, deadlock). ``hai.pipeline.simulate`` places P2P and times
schedules with it.

Timing model. Every rank runs its list in order from t=0. A compute action starts when the rank is free and its
inputs are there: the activation of (stage-1, mb) for F; for B/BW the forward of (stage, mb) and the gradient of
(stage+1, mb) (the loss, for the last stage); the B of (stage, mb) for W. A value made on another rank is there
``p2p`` after its producer ends (with SEND/RECV in the lists: ``p2p`` after its SEND is posted, and not before the
consumer's RECV is posted). Durations: F; B' = B - W for an input-gradient B; W; the full B for BW; F&B for FB;
SEND/RECV take no time of their own. Costs are per stage chunk (one rank's share of the layers of one stage).

P2P semantics. Consecutive SEND/RECV actions form one batch (one ``batch_isend_irecv``); a batch is posted when the
rank reaches it. By default (``wait_batches=False``) posting never blocks: a compute waits only for the values it
consumes (an executor that waits a RECV's handle right before its consumer and send handles at the end of the step).
With ``wait_batches=True`` the rank waits until every op of the batch is delivered (both ends posted, ``p2p`` after
the send), as DualPipe's ``_commit_and_wait_comm`` does and NCCL's grouped P2P amounts to. ``add_send_recv`` places
P2P so that both are deadlock-free and every rank pair sees its sends and receives in the same order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from hai.pipeline.schedules import RECVS, SENDS, Action, Kind, ScheduleError, compute_only, format_grid
from hai.pipeline.trace import Event

__all__ = ["Costs", "validate"]

_SENDS, _RECVS = SENDS, RECVS


@dataclass(frozen=True)
class Costs:
    """Per-chunk costs. ``B`` is the FULL backward; an input-gradient B action costs ``B - W``.

    ``FB`` is the overlapped pair "F&B" (forward + full backward run together); overlap pays when ``FB < F + B``.
    Defaults: F=1, B=2 (B'=1, W=1), FB=2.5, p2p=0.

    ``stages`` (optional): one ``Costs`` per stage, for pipelines whose stages differ (``hai plan``: embedding, dense
    layers, head and MTP). An action then costs what its stage's entry says; an FB pair of forward stage f and
    backward stage b costs ``FB_f * a_f + FB_b * (1 - a_b)`` with ``a = Fc / (Fc + Bc)`` the forward's share of a
    stage's compute (``Fc = F - F_comm``, ``Bc = B - B_comm``: ``F_comm`` / ``B_comm`` are the parts of F and B that
    are communication, which an F&B pair can hide). That is exact when each stage's F&B is its compute (``FB = Fc +
    Bc``, communication hidden) and an approximation otherwise. The uniform fields then only summarize (``hai plan``
    puts the slowest stage there) and feed the published bubble formulas.
    """

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float = 2.5
    p2p: float = 0.0
    F_comm: float = 0.0
    B_comm: float = 0.0
    stages: tuple = ()

    def __post_init__(self) -> None:
        for k in ("F", "B", "W", "FB", "p2p", "F_comm", "B_comm"):
            if getattr(self, k) < 0:
                raise ValueError(f"cost {k}={getattr(self, k)} must be >= 0")
        if self.W > self.B:
            raise ValueError(f"cost W={self.W} is part of the full backward B={self.B}: need W <= B")
        if self.F_comm > self.F or self.B_comm > self.B:
            raise ValueError(f"communication F_comm={self.F_comm}, B_comm={self.B_comm} is part of F={self.F}, "
                             f"B={self.B}: need F_comm <= F and B_comm <= B")
        # from JSON the stages arrive as a list of dicts
        object.__setattr__(self, "stages", tuple(c if isinstance(c, Costs) else Costs(**c) for c in self.stages))

    def _fwd_share(self) -> float:
        fc, bc = self.F - self.F_comm, self.B - self.B_comm
        return fc / (fc + bc) if fc + bc > 0 else 0.5

    def of(self, a: Action) -> float:
        if self.stages and a.is_compute:
            if a.kind is Kind.FB:
                f, b = self.stages[a.stage], self.stages[a.b_stage]
                return f.FB * f._fwd_share() + b.FB * (1.0 - b._fwd_share())
            return self.stages[a.stage].of(a)
        return {Kind.F: self.F, Kind.B: self.B - self.W, Kind.W: self.W, Kind.BW: self.B,
                Kind.FB: self.FB}.get(a.kind, 0.0)

    def with_floor(self, eps: float) -> "Costs":
        """These costs with zero durations raised to ``eps`` (so every action takes time in a timing run)."""
        W = self.W or eps
        return Costs(F=self.F or eps, B=max(self.B, W + eps), W=W, FB=self.FB or eps, p2p=self.p2p,
                     F_comm=self.F_comm, B_comm=self.B_comm, stages=tuple(c.with_floor(eps) for c in self.stages))


# ---------------------------------------------------------------- data flow


def _key(p: Action) -> tuple[str, int, int]:
    """What a compute part produces: ("F"|"B"|"W", stage, mb); "B" = the input gradient (B, BW or FB half)."""
    return ({Kind.F: "F", Kind.W: "W"}.get(p.kind, "B"), p.stage, p.micro_batch)


def _owners(schedules: list[list[Action]]) -> dict[tuple[str, int, int], int]:
    own: dict[tuple[str, int, int], int] = {}
    for rank, acts in enumerate(schedules):
        for a in acts:
            for p in a.parts if a.is_compute else ():
                own.setdefault(_key(p), rank)
    return own


def _last_stage(schedules: list[list[Action]]) -> int:
    return max((p.stage for acts in schedules for a in acts if a.is_compute for p in a.parts), default=0)


def _deps(p: Action, last: int) -> list[tuple[str, int, int]]:
    s, m = p.stage, p.micro_batch
    if p.kind is Kind.F:
        return [("F", s - 1, m)] if s > 0 else []
    if p.kind is Kind.W:
        return [("B", s, m)]
    return [("F", s, m)] + ([("B", s + 1, m)] if s < last else [])


def _comm_key(a: Action) -> tuple[str, int, int]:
    """The value a SEND/RECV moves, named by its producer: ("F"|"B", producing stage, mb)."""
    if a.kind is Kind.SEND_F:
        return ("F", a.stage, a.micro_batch)
    if a.kind is Kind.SEND_B:
        return ("B", a.stage, a.micro_batch)
    if a.kind is Kind.RECV_F:
        return ("F", a.stage - 1, a.micro_batch)
    return ("B", a.stage + 1, a.micro_batch)


def recv_for(key: tuple[str, int, int], src: int) -> Action:
    kind, s, m = key
    return Action(Kind.RECV_F, s + 1, m, peer=src) if kind == "F" else Action(Kind.RECV_B, s - 1, m, peer=src)


def send_for(key: tuple[str, int, int], dst: int) -> Action:
    return Action(Kind.SEND_F if key[0] == "F" else Kind.SEND_B, key[1], key[2], peer=dst)


def cross_edges(base: list[list[Action]]) -> list[tuple[tuple, int, int, int, int]]:
    """(value key, src rank, src step, dst rank, dst step) for every value consumed on another rank."""
    own, last = _owners(base), _last_stage(base)
    where = {_key(p): (r, i) for r, acts in enumerate(base) for i, a in enumerate(acts) for p in a.parts}
    edges = []
    for r, acts in enumerate(base):
        for i, a in enumerate(acts):
            for p in a.parts:
                for k in _deps(p, last):
                    if k[0] != "W" and own.get(k, r) != r and k in where:
                        edges.append((k, *where[k], r, i))
    return edges


# ---------------------------------------------------------------- the engine


class Engine:
    """Runs every rank's list in order; an action runs once what it waits for is done (times under ``costs``)."""

    def __init__(self, schedules: list[list[Action]], costs: Costs, wait_batches: bool = False) -> None:
        self.s, self.costs, self.wait = schedules, costs, wait_batches
        self.own, self.last = _owners(schedules), _last_stage(schedules)
        self.comm = any(a.is_comm for acts in schedules for a in acts)
        self.done: dict[tuple, float] = {}
        self.clock = [0.0] * len(schedules)
        self.pc = [0] * len(schedules)
        self.events: list[Event] = []

    def _input_time(self, key: tuple, rank: int) -> Optional[float]:
        if self.own.get(key, rank) == rank:
            return self.done.get(key)
        sent = self.done.get(("posted", "S") + key)
        if not self.comm:
            t = self.done.get(key)
            return None if t is None else t + self.costs.p2p
        posted = self.done.get(("posted", "R") + key)  # this rank's RECV must come first
        return None if sent is None or posted is None else max(posted, sent + self.costs.p2p)

    def _post_batch(self, rank: int) -> None:
        i = self.pc[rank]
        if i > 0 and self.s[rank][i - 1].is_comm:
            return
        while i < len(self.s[rank]) and self.s[rank][i].is_comm:
            a = self.s[rank][i]
            if a.kind in _SENDS and _comm_key(a) not in self.done:
                break  # a send cannot be posted before its producer ran (it never will: deadlock)
            self.done[("posted", "S" if a.kind in _SENDS else "R") + _comm_key(a)] = self.clock[rank]
            i += 1

    def _comm_end(self, a: Action, rank: int) -> Optional[float]:
        """Posting never blocks; with ``wait`` the rank waits until the value is delivered (both ends posted)."""
        mine, theirs = ("S", "R") if a.kind in _SENDS else ("R", "S")
        posted = self.done.get(("posted", mine) + _comm_key(a))
        if posted is None or not self.wait:
            return None if posted is None else self.clock[rank]
        other = self.done.get(("posted", theirs) + _comm_key(a))
        if other is None:
            return None
        sent = posted if mine == "S" else other
        return max(self.clock[rank], other, sent + self.costs.p2p)

    def _step(self, rank: int) -> bool:
        a = self.s[rank][self.pc[rank]]
        if a.is_comm:
            self._post_batch(rank)
            start, end = self.clock[rank], self._comm_end(a, rank)
        else:
            times = [self._input_time(k, rank) for p in a.parts for k in _deps(p, self.last)]
            if None in times:
                return False
            start = max([self.clock[rank], *times])
            end = start + self.costs.of(a)
            self.done.update({_key(p): end for p in a.parts})
        if end is None:
            return False
        self.events.append(Event(rank, start, end, a))
        self.clock[rank], self.pc[rank] = end, self.pc[rank] + 1
        return True

    def run(self) -> dict[int, int]:
        """Run to completion; returns {rank: step} of the ranks left blocked (empty when all finished)."""
        progress = True
        while progress:
            progress = False
            for r in range(len(self.s)):
                while self.pc[r] < len(self.s[r]) and self._step(r):
                    progress = True
        return {r: pc for r, pc in enumerate(self.pc) if pc < len(self.s[r])}


# ---------------------------------------------------------------- validation


def _fail(schedules: list[list[Action]], marks: list[tuple[int, int]], msg: str) -> None:
    raise ScheduleError(f"{msg}\n{format_grid(schedules, marks)}")


def _index(schedules: list[list[Action]]) -> dict[tuple[str, int, int], list[tuple[int, int, Kind]]]:
    idx: dict[tuple[str, int, int], list[tuple[int, int, Kind]]] = {}
    for r, acts in enumerate(schedules):
        for i, a in enumerate(acts):
            for p in a.parts if a.is_compute else ():
                idx.setdefault(_key(p), []).append((r, i, p.kind))
    return idx


def _check_unit(schedules, idx, s: int, m: int) -> None:
    """One (stage, micro-batch): one F, then one backward (BW, or B then W), all on the same rank, in order."""
    f, b, w = (idx.get((k, s, m), []) for k in ("F", "B", "W"))
    cells = [(r, i) for r, i, _ in f + b + w]
    what = f"stage {s}, micro-batch {m}"
    if len(f) != 1 or len(b) != 1:
        _fail(schedules, cells, f"{what}: needs exactly one forward and one backward, found {len(f)} and {len(b)}")
    need_w = int(b[0][2] is Kind.B)
    if len(w) != need_w:
        _fail(schedules, cells, f"{what}: a {b[0][2].value} backward needs {need_w} W, found {len(w)}")
    if len({r for r, _ in cells}) != 1:
        _fail(schedules, cells, f"{what}: its forward, backward and W must run on the same rank")
    steps = [i for _, i, _ in f + b + w]
    if steps != sorted(set(steps)):
        _fail(schedules, cells, f"{what}: must run F, then its backward, then W, each in a later step")


def _check_structure(schedules: list[list[Action]]) -> None:
    idx = _index(schedules)
    if not idx:
        raise ScheduleError("the schedule has no compute actions")
    for s in range(1 + max(k[1] for k in idx)):
        for m in range(1 + max(k[2] for k in idx)):
            _check_unit(schedules, idx, s, m)


def _check_comm_sets(schedules: list[list[Action]]) -> None:
    """SEND/RECV are exactly those the cross-rank data flow needs (right peers, none missing, extra or doubled)."""
    want: dict[int, set[Action]] = {r: set() for r in range(len(schedules))}
    for key, src, _, dst, _ in cross_edges(compute_only(schedules)):
        want[src].add(send_for(key, dst))
        want[dst].add(recv_for(key, src))
    for r, acts in enumerate(schedules):
        have = Counter(a for a in acts if a.is_comm)
        bad = [i for i, a in enumerate(acts) if a.is_comm and (a not in want[r] or have[a] > 1)]
        missing = sorted(map(str, want[r] - set(have)))
        if bad or missing:
            _fail(schedules, [(r, i) for i in bad],
                  f"rank {r}: SEND/RECV do not match the data flow: missing {missing}, unexpected or doubled at "
                  f"steps {bad}")


def _check_comm_order(schedules: list[list[Action]]) -> None:
    """Per (src, dst) pair, receives come in the order of the sends (P2P matches by order)."""
    seqs: dict[tuple[str, int, int], list[tuple[tuple, int]]] = {}
    for r, acts in enumerate(schedules):
        for i, a in enumerate(acts):
            if a.is_comm:
                seq = ("S", r, a.peer) if a.kind in _SENDS else ("R", a.peer, r)
                seqs.setdefault(seq, []).append((_comm_key(a), i))
    for (tag, src, dst), out in seqs.items():
        if tag != "S":
            continue
        for (ks, i), (kr, j) in zip(out, seqs.get(("R", src, dst), [])):
            if ks != kr:
                _fail(schedules, [(src, i), (dst, j)],
                      f"rank {src} -> rank {dst}: send {schedules[src][i]} would be matched by receive "
                      f"{schedules[dst][j]} (P2P matches in order): order the receives like the sends")


def _check_deadlock(schedules: list[list[Action]], wait_batches: bool) -> None:
    stuck = Engine(schedules, Costs(), wait_batches).run()
    if stuck:
        lines = [f"rank {r} step {i} ({schedules[r][i]})" for r, i in sorted(stuck.items())]
        how = " (each rank waits for its whole SEND/RECV batch)" if wait_batches else ""
        _fail(schedules, sorted(stuck.items()),
              f"deadlock{how}: these steps wait for data or partners that never come:\n  " + "\n  ".join(lines))


def validate(schedules: list[list[Action]], wait_batches: bool = True) -> None:
    """Raise ``ScheduleError`` (with the rank x step grid, bad cells marked ``[*..*]``) unless the schedule is sound.

    Every (stage, micro-batch) has one F and one backward (BW or FB half, or B then W) on one rank in that order; the
    cross-stage order (F of s before F of s+1, backward of s+1 before backward of s) can be met without deadlock
    (receives block). When the lists carry SEND/RECV: they are exactly the needed ones with the right peers, matched
    in order per rank pair, each RECV before its consumer and SEND after its producer, and no deadlock even when a
    rank waits for its whole batch (``wait_batches``, on by default; False: sends never block).
    """
    _check_structure(schedules)
    if any(a.is_comm for acts in schedules for a in acts):
        _check_comm_sets(schedules)
        _check_comm_order(schedules)
    _check_deadlock(schedules, wait_batches)


