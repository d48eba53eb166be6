"""Pipeline schedules as data: typed actions, one pure function per schedule, a text grid.

A schedule is ``list[list[Action]]``: one list per pipeline rank (the "pp" axis), run in order by that rank.

Stage indexing. ``Action.stage`` is the *global* model stage (chunk of layers) the action runs, counted along a
micro-batch's path: the activation of stage ``s`` feeds stage ``s + 1`` and its gradient flows back from ``s + 1`` to
``s``, for every schedule.

- ``1f1b``, ``zb1p``: ``pp`` stages, stage ``r`` on rank ``r``.
- ``dualpipe``: ``pp`` stages, rank ``r`` holds two chunks, chunk 0 = stage ``r`` and chunk 1 = stage ``pp-1-r``, so
  every stage exists twice (``param_copies == 2``). Micro-batches ``0 .. n/2-1`` enter at rank 0 and run stage ``s`` on
  rank ``s``; micro-batches ``n/2 .. n-1`` enter at rank ``pp-1`` and run stage ``s`` on rank ``pp-1-s``.
- ``dualpipev``: ``2*pp`` stages on ``pp`` ranks in a V: chunk 0 = stage ``r``, chunk 1 = stage ``2*pp-1-r``; every
  micro-batch goes down the ranks and back up (stage ``pp-1`` hands to stage ``pp`` on the last rank without P2P).

P2P actions are added by ``hai.pipeline.simulate.add_send_recv`` (placement needs the timing model).

``rank_stages(name, pp, rank)`` gives a rank's chunks in local order; an executor picks its module with
``rank_stages(...).index(action.stage)``.

Kinds. ``F`` forward; ``B`` input-gradient backward only (zero-bubble split, its weight gradient is a later ``W``);
``W`` weight gradient; ``BW`` full backward (input and weight gradients at once, as plain 1F1B and DualPipe's
non-split chunks do; nothing follows it); ``FB`` forward of (stage, micro_batch) overlapped with the *full* backward
(``BW``) of (b_stage, b_micro_batch), as DualPipe's overlapped chunk pair; ``SEND_F``/``RECV_F`` activation and
``SEND_B``/``RECV_B`` gradient P2P with ``peer``. A comm action carries the *local* stage: ``SEND_F`` the producing
stage ``s``, the matching ``RECV_F`` the consuming stage ``s+1``; ``SEND_B`` stage ``s+1``, ``RECV_B`` stage ``s``.

Text form (round-trips through ``Action.parse``): ``0F3``, ``2B5``, ``2W5``, ``1BW4``, ``0F3&7BW1`` (FB),
``0SEND_F3>1`` (to rank 1), ``1RECV_F3<0`` (from rank 0).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Callable, Iterable, Optional

from hai.parallel.layout import SCHEDULE_NAMES, check_schedule, num_stages, param_copies, rank_stages

__all__ = [
    "Kind",
    "Action",
    "ScheduleError",
    "SCHEDULE_NAMES",
    "schedule_1f1b",
    "schedule_zb1p",
    "schedule_dualpipe",
    "schedule_dualpipev",
    "build_schedule",
    "num_stages",
    "rank_stages",
    "param_copies",
    "compute_only",
    "format_grid",
    "to_text",
    "parse_text",
]


class Kind(str, Enum):
    F = "F"
    B = "B"  # input-gradient backward (B' in the zero-bubble papers); its W comes later
    W = "W"
    BW = "BW"  # full backward: input + weight gradients
    FB = "FB"  # forward of one micro-batch overlapped with the full backward of another
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMPUTE = frozenset({Kind.F, Kind.B, Kind.W, Kind.BW, Kind.FB})
SENDS = frozenset({Kind.SEND_F, Kind.SEND_B})
RECVS = frozenset({Kind.RECV_F, Kind.RECV_B})

_SIMPLE_RE = re.compile(r"^(\d+)(BW|F|B|W)(\d+)$")
_FB_RE = re.compile(r"^(\d+)F(\d+)&(\d+)BW(\d+)$")
_COMM_RE = re.compile(r"^(\d+)(SEND_F|SEND_B|RECV_F|RECV_B)(\d+)([<>])(\d+)$")


class ScheduleError(ValueError):
    """A schedule is inconsistent; the message shows the rank x step grid with the offending cell(s) marked."""


@dataclass(frozen=True)
class Action:
    """One step of one rank. ``stage``/``micro_batch``: what it runs (for FB: the forward half).

    ``peer``: the other rank of a SEND/RECV. ``b_stage``/``b_micro_batch``: the full-backward half of an FB.
    """

    kind: Kind
    stage: int
    micro_batch: int
    peer: Optional[int] = None
    b_stage: Optional[int] = None
    b_micro_batch: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.stage < 0 or self.micro_batch < 0:
            raise ValueError(f"Action stage={self.stage}, micro_batch={self.micro_batch} must be >= 0")
        if (self.peer is not None) != self.is_comm:
            raise ValueError(f"Action {self.kind.value}: peer is required for SEND/RECV and only for them")
        if ((self.b_stage is not None) and (self.b_micro_batch is not None)) != (self.kind is Kind.FB):
            raise ValueError(f"Action {self.kind.value}: b_stage and b_micro_batch are required for FB only")

    @cached_property
    def is_comm(self) -> bool:
        return self.kind in SENDS or self.kind in RECVS

    @cached_property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE

    @property
    def forward(self) -> "Action":
        """The forward half of an FB."""
        return Action(Kind.F, self.stage, self.micro_batch)

    @property
    def backward(self) -> "Action":
        """The full-backward half of an FB."""
        return Action(Kind.BW, self.b_stage, self.b_micro_batch)

    @cached_property
    def parts(self) -> tuple["Action", ...]:
        """Single compute actions this one runs: (F, BW) for FB, (self,) otherwise."""
        return (self.forward, self.backward) if self.kind is Kind.FB else (self,)

    def __str__(self) -> str:
        if self.kind is Kind.FB:
            return f"{self.stage}F{self.micro_batch}&{self.b_stage}BW{self.b_micro_batch}"
        if self.is_comm:
            arrow = ">" if self.kind in SENDS else "<"
            return f"{self.stage}{self.kind.value}{self.micro_batch}{arrow}{self.peer}"
        return f"{self.stage}{self.kind.value}{self.micro_batch}"

    @staticmethod
    def parse(text: str) -> "Action":
        """Inverse of ``str``: ``Action.parse(str(a)) == a``."""
        s = text.strip()
        if m := _SIMPLE_RE.match(s):
            return Action(Kind(m[2]), int(m[1]), int(m[3]))
        if m := _FB_RE.match(s):
            return Action(Kind.FB, int(m[1]), int(m[2]), b_stage=int(m[3]), b_micro_batch=int(m[4]))
        if (m := _COMM_RE.match(s)) and (m[4] == ">") == (Kind(m[2]) in SENDS):
            return Action(Kind(m[2]), int(m[1]), int(m[3]), peer=int(m[5]))
        raise ValueError(f"cannot parse action {text!r}: expected e.g. 0F3, 2B5, 2W5, 1BW4, 0F3&7BW1, "
                         f"0SEND_F3>1 or 1RECV_F3<0")


def _f(stage: int, mb: int) -> Action:
    return Action(Kind.F, stage, mb)


# ---------------------------------------------------------------- argument checks (rules in hai.parallel.layout)


def _check_common(name: str, pp: int, rank: int, n_micro: int) -> None:
    check_schedule(name, pp, n_micro, rank)


# ---------------------------------------------------------------- 1F1B and ZB1P


def schedule_1f1b(pp: int, rank: int, n_micro: int) -> list[Action]:
    """Classic 1F1B: ``pp-1-rank`` warm-up forwards, then one forward / one full backward, then the cool-down."""
    _check_common("1f1b", pp, rank, n_micro)
    warm = min(pp - 1 - rank, n_micro)
    acts = [_f(rank, m) for m in range(warm)]
    for m in range(warm, n_micro):
        acts += [_f(rank, m), Action(Kind.BW, rank, m - warm)]
    acts += [Action(Kind.BW, rank, m) for m in range(n_micro - warm, n_micro)]
    return acts


def schedule_zb1p(pp: int, rank: int, n_micro: int) -> list[Action]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B order with the backward split into B and W.

    Rank ``r`` keeps up to ``r`` weight-gradient steps deferred (oldest first); they fill the cool-down bubbles, and
    the gradient goes upstream right after B. Peak activations stay at ``pp`` as in 1F1B.
    """
    _check_common("zb1p", pp, rank, n_micro)
    warm = min(pp - 1 - rank, n_micro)
    acts = [_f(rank, m) for m in range(warm)]
    pending: deque[int] = deque()

    def backward(m: int) -> None:
        acts.append(Action(Kind.B, rank, m))
        pending.append(m)
        if len(pending) > rank:
            acts.append(Action(Kind.W, rank, pending.popleft()))

    for m in range(warm, n_micro):
        acts.append(_f(rank, m))
        backward(m - warm)
    for m in range(n_micro - warm, n_micro):
        backward(m)
    acts += [Action(Kind.W, rank, m) for m in pending]
    return acts


# ---------------------------------------------------------------- DualPipe and DualPipeV


class _DualBuilder:
    """Emits one rank's actions for the two chunks of a bidirectional schedule.

    ``chunks[c] = (stage, micro-batches in order)``; DualPipe's code addresses chunks by *phase*, which is the
    chunk index XOR ``flip`` (ranks in DualPipe's second half see the directions swapped).
    """

    def __init__(self, chunks: tuple[tuple[int, range], tuple[int, range]], flip: int) -> None:
        self.chunks, self.flip = chunks, flip
        self.next_f, self.next_b = [0, 0], [0, 0]
        self.weights: deque[tuple[int, int]] = deque()
        self.acts: list[Action] = []

    def _take(self, counters: list[int], phase: int) -> tuple[int, int]:
        c = phase ^ self.flip
        stage, mbs = self.chunks[c]
        mb = mbs[counters[c]]
        counters[c] += 1
        return stage, mb

    def f(self, phase: int) -> None:
        self.acts.append(_f(*self._take(self.next_f, phase)))

    def b(self, phase: int, zero_bubble: bool = False) -> None:
        stage, mb = self._take(self.next_b, phase)
        if zero_bubble:
            self.acts.append(Action(Kind.B, stage, mb))
            self.weights.append((stage, mb))
        else:
            self.acts.append(Action(Kind.BW, stage, mb))

    def w(self) -> None:
        if self.weights:
            self.acts.append(Action(Kind.W, *self.weights.popleft()))

    def fb(self, f_phase: int, b_phase: int) -> None:
        fs, fm = self._take(self.next_f, f_phase)
        bs, bm = self._take(self.next_b, b_phase)
        self.acts.append(Action(Kind.FB, fs, fm, b_stage=bs, b_micro_batch=bm))


def _dual_warmup(b: _DualBuilder, half: int, h: int) -> None:
    """Steps 1-3: forwards of chunk 0, interleaved forwards of both chunks, then B1 W1 F1 (zero bubble)."""
    for _ in range((half - h - 1) * 2):
        b.f(0)
    for _ in range(h + 1):
        b.f(0)
        b.f(1)
    for _ in range(half - h - 1):
        b.b(1, zero_bubble=True)
        b.w()
        b.f(1)


def _dual_main(b: _DualBuilder, half: int, h: int, per_dir: int, middle: bool) -> None:
    """Steps 4-5: overlapped F&B pairs (the middle ranks run their very first pair unoverlapped)."""
    for i in range(per_dir - 2 * half + h + 1):
        if i == 0 and middle:
            b.f(0)
            b.b(1)
        else:
            b.fb(0, 1)
        b.fb(1, 0)
    for _ in range(half - h - 1):
        b.b(1)
        b.fb(1, 0)


def _dual_cooldown(b: _DualBuilder, half: int, h: int) -> None:
    """Steps 6-8: backwards of both chunks (the second half split into B and W), then the deferred Ws."""
    zb = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        b.b(1, zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        b.b(0, zb)
    for _ in range(half - h - 1):
        b.w()
        b.b(0, zero_bubble=True)
    for _ in range(h + 1):
        b.w()
    assert not b.weights, "internal: DualPipe left weight-gradient steps unscheduled"


def _dual_steps(b: _DualBuilder, half: int, h: int, per_dir: int, middle: bool) -> list[Action]:
    """DeepSeek's eight DualPipe steps for one rank (``half`` ranks per direction, ``h`` this rank's depth)."""
    _dual_warmup(b, half, h)
    _dual_main(b, half, h, per_dir, middle)
    _dual_cooldown(b, half, h)
    return b.acts


def schedule_dualpipe(pp: int, rank: int, n_micro: int) -> list[Action]:
    """DualPipe (DeepSeek-V3): rank r holds stages r and pp-1-r; micro-batches enter from both ends."""
    _check_common("dualpipe", pp, rank, n_micro)
    half, per_dir = pp // 2, n_micro // 2
    second = int(rank >= half)
    chunks = ((rank, range(0, per_dir)), (pp - 1 - rank, range(per_dir, n_micro)))
    builder = _DualBuilder(chunks, flip=second)
    h = min(rank, pp - 1 - rank)
    return _dual_steps(builder, half, h, per_dir, middle=(h == half - 1))


def schedule_dualpipev(pp: int, rank: int, n_micro: int) -> list[Action]:
    """DualPipeV ("cut-in-half" DualPipe): 2*pp stages on pp ranks in a V; rank r holds stages r and 2*pp-1-r."""
    _check_common("dualpipev", pp, rank, n_micro)
    chunks = ((rank, range(n_micro)), (2 * pp - 1 - rank, range(n_micro)))
    return _dual_steps(_DualBuilder(chunks, flip=0), pp, rank, n_micro, middle=(rank == pp - 1))


_SCHEDULES: dict[str, Callable[[int, int, int], list[Action]]] = {
    "1f1b": schedule_1f1b,
    "zb1p": schedule_zb1p,
    "dualpipe": schedule_dualpipe,
    "dualpipev": schedule_dualpipev,
}


def _schedule_fn(name: str) -> Callable[[int, int, int], list[Action]]:
    if name not in _SCHEDULES:
        raise ValueError(f"parallel.schedule={name!r} is not one of {list(SCHEDULE_NAMES)}: pick one of them")
    return _SCHEDULES[name]


def build_schedule(name: str, pp: int, n_micro: int) -> list[list[Action]]:
    """Compute actions of every rank: ``[schedule_<name>(pp, r, n_micro) for r in range(pp)]``."""
    fn = _schedule_fn(name)
    return [fn(pp, r, n_micro) for r in range(pp)]


# ---------------------------------------------------------------- helpers


def compute_only(schedules: list[list[Action]]) -> list[list[Action]]:
    """Drop SEND/RECV actions."""
    return [[a for a in acts if a.is_compute] for acts in schedules]


# ---------------------------------------------------------------- text grid


def _cell(schedules: list[list[Action]], marks: set, r: int, s: int) -> str:
    if s >= len(schedules[r]):
        return ""
    return f"[*{schedules[r][s]}*]" if (r, s) in marks else str(schedules[r][s])


def format_grid(schedules: list[list[Action]], marks: Iterable[tuple[int, int]] = (), window: int = 12) -> str:
    """Rank x step grid; cells in ``marks`` ((rank, step) pairs) print as ``[*1F3*]``.

    With marks, only the steps within ``window`` of a marked cell are shown (elided steps print as ``...``).
    """
    marks = set(marks)
    n_steps = max((len(a) for a in schedules), default=0)
    lo, hi = 0, n_steps
    if marks:
        lo = max(0, min(s for _, s in marks) - window)
        hi = min(n_steps, max(s for _, s in marks) + window + 1)
    cols = range(lo, hi)
    width = max([len(_cell(schedules, marks, r, s)) for r in range(len(schedules)) for s in cols] + [len(str(hi))])
    pre, post = ("... " if lo > 0 else ""), (" ..." if hi < n_steps else "")
    lines = [" " * 9 + " " * len(pre) + " ".join(f"{s:>{width}}" for s in cols)]
    for r in range(len(schedules)):
        row = " ".join(f"{_cell(schedules, marks, r, s):>{width}}" for s in cols)
        lines.append(f"rank {r:>2}: {pre}{row}{post}".rstrip())
    return "\n".join(lines)


def to_text(schedules: list[list[Action]], header: str = "") -> str:
    """Golden-file text: optional ``#`` header lines, then ``rank R: a a a`` per rank (columns aligned)."""
    width = max((len(str(a)) for acts in schedules for a in acts), default=1)
    lines = [f"# {h}" for h in header.splitlines()]
    lines += [f"rank {r}: " + " ".join(f"{str(a):<{width}}" for a in acts).rstrip()
              for r, acts in enumerate(schedules)]
    return "\n".join(lines) + "\n"


def parse_text(text: str) -> list[list[Action]]:
    """Inverse of ``to_text``."""
    out: dict[int, list[Action]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, body = line.partition(":")
        rank = int(head.split()[-1])
        out[rank] = [Action.parse(tok) for tok in body.split()]
    if sorted(out) != list(range(len(out))):
        raise ValueError(f"schedule text has ranks {sorted(out)}: expected 0..{len(out) - 1}")
    return [out[r] for r in range(len(out))]
