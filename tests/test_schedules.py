"""Pipeline schedules as data: text form, validator, simulator vs the published bubble formulas, traces.

No processes: everything here is pure Python over ``hai.pipeline``. Regenerate the golden file with
``python tests/test_schedules.py --regen-golden``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from hai.pipeline import (
    Action,
    Costs,
    Kind,
    ScheduleError,
    add_send_recv,
    build_schedule,
    bubble_formula,
    compute_only,
    format_report,
    num_stages,
    param_copies,
    parse_text,
    rank_stages,
    report,
    save_gantt_png,
    simulate,
    simulate_schedule,
    to_chrome_trace,
    to_text,
    validate,
)
from hai.pipeline.trace import save_chrome_trace, time_unit

NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
GOLDEN = Path(__file__).resolve().parents[1] / "pipeline" / "golden" / "dualpipe_pp8_mb20.txt"
GOLDEN_HEADER = ("DualPipe, pp=8, 20 micro-batches: compute actions of each rank, as build_schedule returns them.\n"
                 "Regenerate: python tests/test_schedules.py --regen-golden")

# Costs in the regime the published formulas are drawn for (DeepSeek-V3 Table 2, the zero-bubble paper): a forward
# chunk costs as much as an input-gradient backward (F = B' = B - W), W <= F, and max(F, B) <= F&B <= F + B.
# Integers or halves, so every sum is exact in floating point. F&B < F + B in all three: the overlap pays.
FORMULA_COSTS = [
    Costs(F=1, B=2, W=1, FB=2.5),  # the defaults
    Costs(F=2, B=3, W=1, FB=4),
    Costs(F=3, B=5, W=2, FB=6),
]


def _micro_batches(name: str, pp: int) -> list[int]:
    lo = 2 * pp
    return [lo, lo + 2, 4 * pp] if name != "1f1b" or pp > 2 else [1, lo, 4 * pp]


# ---------------------------------------------------------------- actions and their text form


@pytest.mark.parametrize("text", ["0F3", "2B5", "2W5", "1BW4", "0F3&7BW1", "0SEND_F3>1", "1RECV_F3<0",
                                  "4SEND_B12>3", "3RECV_B12<4"])
def test_action_text_round_trips(text):
    a = Action.parse(text)
    assert str(a) == text and Action.parse(str(a)) == a


def test_action_fields():
    fb = Action.parse("0F3&7BW1")
    assert (fb.kind, fb.stage, fb.micro_batch, fb.b_stage, fb.b_micro_batch) == (Kind.FB, 0, 3, 7, 1)
    assert fb.parts == (Action(Kind.F, 0, 3), Action(Kind.BW, 7, 1))
    send = Action.parse("0SEND_F3>1")
    assert (send.kind, send.stage, send.micro_batch, send.peer, send.is_comm) == (Kind.SEND_F, 0, 3, 1, True)
    with pytest.raises(ValueError, match="peer"):
        Action(Kind.F, 0, 0, peer=1)
    with pytest.raises(ValueError, match="b_stage"):
        Action(Kind.FB, 0, 0)
    for bad in ["F3", "0X3", "0SEND_F3<1", "0F3&7B1", ""]:
        with pytest.raises(ValueError, match="cannot parse"):
            Action.parse(bad)


@pytest.mark.parametrize("name", NAMES)
def test_every_action_of_every_schedule_round_trips(name):
    sched = add_send_recv(build_schedule(name, 4, 10))
    assert parse_text(to_text(sched)) == sched


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize("name,pp,n,match", [
    ("dualpipe", 5, 10, r"even parallel.pp.*pp=5.*pp=6 or pp=4"),
    ("dualpipe", 4, 9, r"even parallel.micro_batches.*micro_batches=9.*use 10"),
    ("dualpipe", 4, 6, r"micro_batches >= 2\*pp = 8, got micro_batches=6: set parallel.micro_batches=8"),
    ("dualpipev", 4, 7, r"micro_batches >= 2\*pp = 8, got micro_batches=7"),
    ("1f1b", 1, 4, r"parallel.pp >= 2, got pp=1"),
    ("dualpipe", 1, 4, r"parallel.pp >= 2, got pp=1"),
    ("zb1p", 4, 0, r"micro_batches=0 must be >= 1"),
    ("gpipe", 4, 8, r"parallel.schedule='gpipe' is not one of \['1f1b', 'zb1p', 'dualpipe', 'dualpipev'\]"),
])
def test_bad_settings_raise_named_errors(name, pp, n, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(name, pp, n)


def test_rank_out_of_range():
    from hai.pipeline import schedule_1f1b

    with pytest.raises(ValueError, match="rank=4 is outside the pipeline of pp=4"):
        schedule_1f1b(4, 4, 8)


# ---------------------------------------------------------------- structure and validation over a grid


@pytest.mark.parametrize("name,pp", [(n, pp) for n in NAMES for pp in (2, 3, 4, 6, 8)
                                     if not (n == "dualpipe" and pp % 2)])
def test_schedules_validate_over_a_grid(name, pp):
    for n in _micro_batches(name, pp):
        if name == "dualpipe" and n % 2:
            continue
        sched = build_schedule(name, pp, n)
        validate(sched)
        validate(add_send_recv(sched), wait_batches=True)


@pytest.mark.parametrize("name", NAMES)
def test_pp16_with_p2p_validates(name):
    validate(add_send_recv(build_schedule(name, 16, 34)), wait_batches=True)


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_runs_its_own_stages(name):
    pp, n = 4, 12
    sched = build_schedule(name, pp, n)
    for rank, acts in enumerate(sched):
        stages = rank_stages(name, pp, rank)
        parts = [p for a in acts for p in a.parts]
        assert {p.stage for p in parts} == set(stages)
        fwd = [p for p in parts if p.kind is Kind.F]
        assert len(fwd) == n * len(stages) // (2 if name == "dualpipe" else 1)
    all_units = {(p.stage, p.micro_batch) for acts in sched for a in acts for p in a.parts}
    assert all_units == {(s, m) for s in range(num_stages(name, pp)) for m in range(n)}


def test_dualpipe_micro_batches_enter_from_both_ends():
    pp, n = 8, 20
    sched = build_schedule("dualpipe", pp, n)
    first = [p for p in sched[0][0].parts] + [p for p in sched[pp - 1][0].parts]
    assert [str(p) for p in first] == ["0F0", "0F10"]  # stage 0 of the first half on rank 0, second half on rank 7
    for rank, acts in enumerate(sched):
        for p in (p for a in acts for p in a.parts):
            expected_rank = p.stage if p.micro_batch < n // 2 else pp - 1 - p.stage
            assert rank == expected_rank, f"{p} on rank {rank}"
    kinds = {a.kind for acts in sched for a in acts}
    assert kinds == {Kind.F, Kind.B, Kind.W, Kind.BW, Kind.FB}


def test_golden_dualpipe_pp8_mb20():
    sched = build_schedule("dualpipe", 8, 20)
    assert to_text(sched, GOLDEN_HEADER) == GOLDEN.read_text()
    assert parse_text(GOLDEN.read_text()) == sched


def _deadlocked_1f1b() -> list[list[Action]]:
    # rank 1 wants micro-batch 1 first; rank 0 sends it only after micro-batch 0's backward, which needs rank 1
    return [[Action.parse(t) for t in "0F0 0BW0 0F1 0BW1".split()],
            [Action.parse(t) for t in "1F1 1F0 1BW0 1BW1".split()]]


def test_validator_reports_deadlock_with_marked_grid():
    with pytest.raises(ScheduleError) as err:
        validate(_deadlocked_1f1b())
    msg = str(err.value)
    assert "deadlock" in msg and "[*0BW0*]" in msg and "[*1F1*]" in msg
    assert "rank  0:" in msg and "rank  1:" in msg


def test_validator_reports_missing_w():
    sched = build_schedule("zb1p", 4, 8)
    w = next(i for i, a in enumerate(sched[2]) if a.kind is Kind.W)
    removed = sched[2].pop(w)
    with pytest.raises(ScheduleError, match=f"stage 2, micro-batch {removed.micro_batch}: a B backward needs 1 W"):
        validate(sched)


def test_validator_reports_wrong_order():
    sched = build_schedule("1f1b", 2, 4)
    sched[1] = [a for a in sched[1] if str(a) != "1F0"] + [Action.parse("1F0")]
    with pytest.raises(ScheduleError, match=r"stage 1, micro-batch 0: must run F, then its backward") as err:
        validate(sched)
    assert "[*1F0*]" in str(err.value) and "[*1BW0*]" in str(err.value)


def test_validator_checks_sends_against_receives():
    sched = add_send_recv(build_schedule("1f1b", 4, 8))
    recvs = [i for i, a in enumerate(sched[1]) if a.kind is Kind.RECV_F]
    i, j = recvs[2], recvs[3]
    swapped = [list(a) for a in sched]
    swapped[1][i], swapped[1][j] = swapped[1][j], swapped[1][i]
    with pytest.raises(ScheduleError, match=r"rank 0 -> rank 1: send 0SEND_F2>1 would be matched by receive "
                                            r"1RECV_F3<0") as err:
        validate(swapped)
    assert "[*1RECV_F3<0*]" in str(err.value)
    missing = [list(a) for a in sched]
    del missing[1][i]
    with pytest.raises(ScheduleError, match=r"rank 1: SEND/RECV do not match the data flow: missing \['1RECV_F2<0'\]"):
        validate(missing)
    wrong_peer = [list(a) for a in sched]
    wrong_peer[1][i] = Action(Kind.RECV_F, 1, 2, peer=2)
    with pytest.raises(ScheduleError, match="unexpected or doubled"):
        validate(wrong_peer)


def _receive_just_in_time(sched: list[list[Action]]) -> list[list[Action]]:
    """Move every RECV to just before its consumer (the naive placement)."""
    out = []
    for acts in sched:
        pending = [a for a in acts if a.kind in (Kind.RECV_F, Kind.RECV_B)]
        new = []
        for a in (a for a in acts if a.kind not in (Kind.RECV_F, Kind.RECV_B)):
            if a.is_compute:
                want = {(Kind.RECV_F, p.stage) if p.kind is Kind.F else (Kind.RECV_B, p.stage) for p in a.parts}
                mine = [r for r in pending if (r.kind, r.stage) in want and r.micro_batch in
                        {p.micro_batch for p in a.parts if (r.kind is Kind.RECV_F) == (p.kind is Kind.F)}]
                new += mine
                pending = [r for r in pending if r not in mine]
            new.append(a)
        out.append(new)
    return out


def test_placement_survives_waiting_for_whole_batches():
    """Head-on sends between DualPipe neighbours deadlock an executor that waits for its whole batch unless the
    receive is posted in the same batch; ``add_send_recv`` does that, the naive placement does not."""
    placed = add_send_recv(build_schedule("dualpipe", 4, 8))
    validate(placed, wait_batches=True)
    naive = _receive_just_in_time(placed)
    validate(naive, wait_batches=False)  # fine if sends never block
    with pytest.raises(ScheduleError, match=r"deadlock \(each rank waits for its whole SEND/RECV batch\)"):
        validate(naive, wait_batches=True)


def test_placement_is_deadlock_free_for_any_costs():
    rng = random.Random(0)
    for _ in range(24):
        name = rng.choice(NAMES)
        pp = rng.choice([2, 4, 6]) if name == "dualpipe" else rng.choice([2, 3, 5])
        n = rng.randint(2 * pp, 3 * pp) // 2 * 2
        f, w, b_in = (rng.choice([0, 0.5, 1, 3]) for _ in range(3))
        costs = Costs(F=f, B=b_in + w, W=w, FB=rng.choice([0, 1, 2, 5]), p2p=rng.choice([0, 0.1, 2]))
        placed = add_send_recv(build_schedule(name, pp, n), costs)
        validate(placed, wait_batches=True)
        free, waited = simulate(placed, costs), simulate(placed, costs, wait_batches=True)
        assert free.bubble == simulate(build_schedule(name, pp, n), costs).bubble
        assert waited.step_time >= free.step_time


# ---------------------------------------------------------------- simulator vs the published formulas


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pp", [4, 8, 16])
def test_bubble_equals_published_formula(name, pp):
    devices = pp // 2 if name == "dualpipev" else pp  # DualPipeV: the same bubble on PP/2 devices
    for n in [2 * pp, 3 * pp, 4 * pp]:
        sched = build_schedule(name, devices, n)
        for costs in FORMULA_COSTS:
            res = simulate(sched, costs)
            assert res.bubble == bubble_formula(name, devices, costs), (name, pp, n, costs)
    if name == "dualpipev":
        for costs in FORMULA_COSTS:
            assert bubble_formula("dualpipev", pp // 2, costs) == bubble_formula("dualpipe", pp, costs)


@pytest.mark.parametrize("name", NAMES)
def test_bubble_with_p2p_actions_and_whole_batch_waits(name):
    pp, n = 8, 20
    for costs in FORMULA_COSTS[:2]:
        placed = add_send_recv(build_schedule(name, pp, n), costs)
        plain = simulate(build_schedule(name, pp, n), costs)
        with_p2p = simulate(placed, costs)
        assert with_p2p.bubble == plain.bubble == bubble_formula(name, pp, costs)
        waited = simulate(placed, costs, wait_batches=True)
        if name == "zb1p" and costs.W != costs.F:
            assert waited.bubble > with_p2p.bubble  # ZB1P's ranks are not in lock-step: rendezvous costs time
        else:
            assert waited.bubble == with_p2p.bubble


def test_1f1b_formula_holds_for_any_costs():
    for costs in [Costs(F=1, B=3, W=1, FB=4), Costs(F=3, B=2, W=1, FB=5), Costs(F=2, B=7, W=3, FB=9)]:
        for pp in (4, 8):
            assert simulate(build_schedule("1f1b", pp, 3 * pp), costs).bubble == bubble_formula("1f1b", pp, costs)


def test_formulas_are_only_exact_in_their_regime():
    """Outside F = B - W (and W <= F), the simulated bubble of the same schedules departs from the formulas."""
    heavy_forward = Costs(F=2, B=2, W=1, FB=3)  # F > B' = 1
    sim = simulate(build_schedule("dualpipe", 8, 32), heavy_forward)
    assert sim.bubble == 9 and bubble_formula("dualpipe", 8, heavy_forward) == 6
    heavy_w = Costs(F=2, B=3, W=2, FB=4)  # W > B' = 1: the deferred Ws cannot fill the bubbles
    sim = simulate(build_schedule("zb1p", 8, 32), heavy_w)
    assert sim.bubble == 14 and bubble_formula("zb1p", 8, heavy_w) == 7


def test_overlapped_fb_shortens_dualpipe():
    sched = build_schedule("dualpipe", 8, 20)
    n_fb = [sum(a.kind is Kind.FB for a in acts) for acts in sched]
    sequential = simulate(sched, Costs(F=1, B=2, W=1, FB=3))  # F&B = F + B: overlap buys nothing
    overlapped = simulate(sched, Costs(F=1, B=2, W=1, FB=2.5))
    assert overlapped.busy == [b - 0.5 * k for b, k in zip(sequential.busy, n_fb)]
    assert overlapped.step_time < sequential.step_time
    assert overlapped.bubble < sequential.bubble  # (PP/2-1)(F&B+B-3W): 4.5 < 6
    assert (overlapped.bubble, sequential.bubble) == (4.5, 6.0)


def test_activation_peaks_and_parameter_copies():
    for pp in (4, 8, 16):
        n = 2 * pp + 4
        f1b = simulate(build_schedule("1f1b", pp, n))
        assert f1b.peak_activations == [pp - r for r in range(pp)]  # PP on rank 0
        assert simulate(build_schedule("zb1p", pp, n)).peak == pp
        dual = simulate(build_schedule("dualpipe", pp, n))
        assert dual.peak_activations == [pp + 1] * pp  # PP + 1 on every rank
        dualv = simulate(build_schedule("dualpipev", pp // 2, n))
        assert dualv.peak_activations == [pp + 1] * (pp // 2)  # PP = 2 * devices chunks, half the size each
    assert [param_copies(n) for n in NAMES] == [1, 1, 2, 1]
    assert [num_stages(n, 8) for n in NAMES] == [8, 8, 8, 16]


def test_timeline_respects_dependencies():
    costs = Costs(F=1, B=2, W=1, FB=2.5, p2p=0.25)
    res = simulate_schedule("dualpipe", 4, 8, costs)
    done: dict[tuple[str, int, int], float] = {}
    where: dict[tuple[str, int, int], int] = {}
    last_end = {}
    for e in res.timeline:
        assert e.start >= last_end.get(e.rank, 0.0) and e.end >= e.start
        last_end[e.rank] = e.end
        for p in e.action.parts if e.action.is_compute else ():
            key = ("F" if p.kind is Kind.F else "W" if p.kind is Kind.W else "B", p.stage, p.micro_batch)
            done[key], where[key] = e.end, e.rank
            if p.kind is Kind.F and p.stage > 0:
                dep = ("F", p.stage - 1, p.micro_batch)
                assert e.start >= done[dep] + (costs.p2p if where[dep] != e.rank else 0)
            if p.kind in (Kind.B, Kind.BW) and p.stage < 3:
                dep = ("B", p.stage + 1, p.micro_batch)
                assert e.start >= done[dep] + (costs.p2p if where[dep] != e.rank else 0)
    busy = [sum(e.end - e.start for e in res.timeline if e.rank == r and e.action.is_compute) for r in range(4)]
    assert busy == res.busy and res.step_time == max(last_end.values())


# ---------------------------------------------------------------- report and pictures


def test_report_for_hai_plan():
    rep = report("dualpipe", 8, 20)
    json.dumps(rep)
    assert rep["step_time"] == 59 and rep["bubble"] == rep["bubble_formula"] == 4.5
    assert rep["peak_activations"] == 9 and rep["param_copies"] == 2
    assert rep["bubble"] == max(rep["bubble_per_rank"])
    assert rep["bubble_per_rank"] == [rep["step_time"] - b for b in rep["busy_per_rank"]]
    text = format_report(rep)
    assert "bubble (max over ranks)" in text and "4.5" in text and "2x" in text


def test_chrome_trace_and_gantt(tmp_path):
    res = simulate_schedule("dualpipe", 4, 8)
    trace = to_chrome_trace(res.timeline)
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == len(res.timeline)
    assert {e["pid"] for e in events} == {0, 1, 2, 3}
    compute = [e for e in events if e["tid"] == 0]
    assert {e["name"] for e in compute} == {str(e.action) for e in res.timeline if e.action.is_compute}
    assert all(isinstance(e["ts"], float) and e["dur"] >= 0 for e in events)
    assert max(e["ts"] + e["dur"] for e in compute) == res.step_time * 1000.0
    names = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert [e["args"]["name"] for e in names] == ["rank 0", "rank 1", "rank 2", "rank 3"]
    path = save_chrome_trace(res.timeline, tmp_path / "trace.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(trace))
    png = save_gantt_png(res.timeline, tmp_path / "schedule.png", title="DualPipe pp=4, 8 micro-batches")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_gantt_time_axis_reads_in_ms_or_us(tmp_path, monkeypatch):
    """A timeline in seconds is drawn in the unit that keeps its span >= 1 (the plan's 0.35 s step in ms, a
    5e-5 s step in µs); the ticks are the seconds scaled by that unit."""
    assert time_unit(0.35) == (1e-3, "ms") and time_unit(2.5) == (1.0, "s")
    assert time_unit(5e-5) == (1e-6, "µs") and time_unit(3e-10) == (1e-9, "ns")
    res = simulate_schedule("dualpipe", 4, 8)
    scale = 2e-6  # seconds per cost unit: a step of a few dozen µs
    timeline = [e._replace(start=e.start * scale, end=e.end * scale) for e in res.timeline]
    from matplotlib.figure import Figure

    captured = {}
    orig = Figure.savefig

    def spy(fig, *a, **k):
        ax = fig.axes[0]
        captured["xlabel"] = ax.get_xlabel()
        captured["ticks"] = [(x, ax.xaxis.get_major_formatter()(x, 0)) for x in ax.get_xticks()]
        return orig(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    save_gantt_png(timeline, tmp_path / "s.png", unit_s=1.0)
    assert captured["xlabel"] == "time (µs)"
    for x, text in captured["ticks"]:
        assert float(text) == pytest.approx(x * 1e6)


if __name__ == "__main__" and "--regen-golden" in sys.argv:
    GOLDEN.write_text(to_text(build_schedule("dualpipe", 8, 20), GOLDEN_HEADER))
    print(f"wrote {GOLDEN}")


def test_per_stage_costs():
    """Stage-dependent costs: equal stages give the uniform result; unequal ones a hand-timed 1F1B."""
    from hai.pipeline import Costs, simulate_schedule

    c = Costs(F=1, B=2, W=1, FB=2.5, p2p=0.1)
    for name, pp in (("1f1b", 4), ("zb1p", 4), ("dualpipe", 4), ("dualpipev", 2)):
        n_st = 2 * pp if name == "dualpipev" else pp
        staged = Costs(F=1, B=2, W=1, FB=2.5, p2p=0.1, stages=(c,) * n_st)
        a, b = simulate_schedule(name, pp, 8, c), simulate_schedule(name, pp, 8, staged)
        assert a.step_time == pytest.approx(b.step_time) and a.busy == pytest.approx(b.busy), name
    # pp=2 1F1B, 2 micro-batches, stage 1 three times as slow. Rank 0: F F . . B . B; rank 1: F B F B.
    # r1: F(1,0) [1,4] B(1,0) [4,10] F(1,1) [10,13] B(1,1) [13,19]; r0: B(0,0) [10,12], B(0,1) [19,21].
    staged = Costs(p2p=0.0, stages=(Costs(F=1, B=2, W=1, FB=3), Costs(F=3, B=6, W=3, FB=9)))
    res = simulate_schedule("1f1b", 2, 2, staged)
    assert res.step_time == pytest.approx(21.0)
    assert res.busy == pytest.approx([6.0, 18.0])
    # an FB pair splits each stage's F&B in proportion to its F and B
    from hai.pipeline.schedules import Action, Kind

    fb = Action(Kind.FB, 0, 1, b_stage=1, b_micro_batch=0)
    assert staged.of(fb) == pytest.approx(3 * 1 / 3 + 9 * 6 / 9)


def test_fb_pair_of_two_stages_is_their_compute_when_communication_hides():
    """F&B of stage f's forward and stage b's backward = Fc_f + Bc_b when each stage's F&B is its compute."""
    from hai.pipeline import Costs
    from hai.pipeline.schedules import Action, Kind

    f = Costs(F=3, B=4, W=2, FB=6, F_comm=1, B_comm=0)  # Fc 2, Bc 4
    b = Costs(F=1, B=6, W=2, FB=5, F_comm=0, B_comm=2)  # Fc 1, Bc 4
    staged = Costs(stages=(f, b))
    assert staged.of(Action(Kind.FB, 0, 1, b_stage=1, b_micro_batch=0)) == pytest.approx(2 + 4)
    assert staged.of(Action(Kind.FB, 1, 1, b_stage=0, b_micro_batch=0)) == pytest.approx(1 + 4)
    with pytest.raises(ValueError, match="F_comm"):
        Costs(F=1, F_comm=2)
