"""Pipeline schedules: (a) simulated bubble next to DeepSeek-V3's published formulas; (b) executor overhead (TODO).

    python benchmarks/pipeline.py [--pp 16] [--micro-batches 32 48 64] [--F 1 --B 2 --W 1 --FB 2.5 --p2p 0]
                                  [--wait-batches] [--png DIR]

(a) For each schedule builds the actions of every rank, adds the P2P, simulates with the given per-chunk costs (B is
the FULL backward, an input-gradient B step costs B-W; FB is the overlapped F&B pair) and prints the simulated step
time, bubble (step time minus a device's busy time, the largest over devices), the published formula's value for the
same costs (Table 2: 1F1B (PP-1)(F+B); ZB1P (PP-1)(F+B-2W); DualPipe (PP/2-1)(F&B+B-3W)), the peak in-flight
activations (micro-batches of one stage chunk) and the parameter copies. DualPipeV runs on PP/2 devices (2 chunks of
1/PP of the layers each), so its row has the same chunk costs and, per the paper, DualPipe's bubble. The formulas are
exact for the defaults (F = B-W, W <= F, max(F, B) <= F&B <= F+B); other costs show where they are approximations.
``--png DIR`` also writes a Gantt chart and a Chrome trace per schedule for the first micro-batch count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hai.pipeline import Costs, bubble_formula, param_copies, save_chrome_trace, save_gantt_png, simulate_schedule

ROWS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def _devices(name: str, pp: int) -> int:
    return pp // 2 if name == "dualpipev" else pp


def bubble_table(pp: int, micro_batches: list[int], costs: Costs, wait_batches: bool = False,
                 png_dir: Path | None = None) -> str:
    head = (f"{'schedule':<10} {'devices':>7} {'micro':>5} {'step time':>9} {'bubble':>8} {'formula':>8} "
            f"{'bubble/step':>11} {'peak act':>8} {'params':>6}")
    lines = [head, "-" * len(head)]
    for name in ROWS:
        dev = _devices(name, pp)
        for n in micro_batches:
            res = simulate_schedule(name, dev, n, costs, wait_batches=wait_batches)
            formula = bubble_formula(name, dev, costs)
            flag = "" if res.bubble == formula else "  (!= formula)"
            lines.append(f"{name:<10} {dev:>7} {n:>5} {res.step_time:>9g} {res.bubble:>8g} {formula:>8g} "
                         f"{res.bubble / res.step_time:>11.1%} {res.peak:>8} {param_copies(name):>5}x{flag}")
            if png_dir is not None and n == micro_batches[0]:
                title = f"{name} on {dev} devices, {n} micro-batches"
                save_gantt_png(res.timeline, png_dir / f"{name}_pp{dev}_mb{n}.png", title)
                save_chrome_trace(res.timeline, png_dir / f"{name}_pp{dev}_mb{n}.json")
    return "\n".join(lines)


def executor_overhead() -> str:
    # ------------------------------------------------------------------------------------------------------------
    # TODO (b), for the lead: executor overhead. Run pp=4 DualPipe and 1F1B through hai.pipeline.executor with
    # synthetic stages whose F / B / W compute is a fixed sleep (e.g. F=B'=W=20 ms, F&B=50 ms), on 4 gloo CPU
    # processes, and print the measured step time next to simulate_schedule(name, 4, n, Costs(...in seconds...))
    # .step_time (and the executor's timeline through hai.pipeline.trace). Report the per-action overhead =
    # (measured - simulated) / actions per rank. Note: an executor that waits for each whole SEND/RECV batch matches
    # simulate(..., wait_batches=True); one that waits send handles only at the end of the step matches the default.
    # ------------------------------------------------------------------------------------------------------------
    return "(b) executor overhead: TODO (not implemented yet; see benchmarks/pipeline.py::executor_overhead)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=16)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[32, 48, 64])
    p.add_argument("--F", type=float, default=1.0)
    p.add_argument("--B", type=float, default=2.0, help="full backward (input + weight gradient)")
    p.add_argument("--W", type=float, default=1.0)
    p.add_argument("--FB", type=float, default=2.5, help="overlapped forward + full backward pair")
    p.add_argument("--p2p", type=float, default=0.0)
    p.add_argument("--wait-batches", action="store_true", help="ranks wait for whole SEND/RECV batches")
    p.add_argument("--png", type=Path, default=None, help="write Gantt PNGs and Chrome traces here")
    args = p.parse_args()
    costs = Costs(F=args.F, B=args.B, W=args.W, FB=args.FB, p2p=args.p2p)
    if args.png:
        args.png.mkdir(parents=True, exist_ok=True)
    print(f"(a) simulated pipeline bubble, PP={args.pp}; per-chunk costs F={costs.F:g} B={costs.B:g} "
          f"(B'={costs.B - costs.W:g} W={costs.W:g}) F&B={costs.FB:g} p2p={costs.p2p:g}"
          f"{'; ranks wait for whole P2P batches' if args.wait_batches else ''}")
    print(bubble_table(args.pp, args.micro_batches, costs, args.wait_batches, args.png))
    print()
    print(executor_overhead())


if __name__ == "__main__":
    main()
