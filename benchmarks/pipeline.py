"""Pipeline schedules: (a) simulated bubble next to DeepSeek-V3's published formulas; (b) executor overhead.

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
import time
from pathlib import Path

from hai.pipeline import Costs, bubble_formula, build_schedule, param_copies, save_chrome_trace, save_gantt_png, simulate_schedule

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


def _sleep_executor(name: str, pp_rank: int, pp: int, n_micro: int, costs: Costs):
    """A PipelineExecutor whose stage compute is a fixed sleep (seconds): F, B' = B-W (B), W, full BW = B."""
    import torch

    from hai.model.wgrad import WeightGradStore
    from hai.pipeline import build_schedule, num_stages
    from hai.pipeline.executor import PipelineExecutor, _Slot
    from hai.pipeline.simulate import add_send_recv

    class SleepExecutor(PipelineExecutor):
        def __init__(self):  # no model: only the schedule, P2P and bookkeeping of the real executor
            self.name, self.pp_rank, self.pp, self.n_micro = name, pp_rank, pp, n_micro
            self.group, self.pp_ranks, self.act_shape, self.loss_scale = None, list(range(pp)), (1024,), 1.0
            self.act_dtype, self.device = torch.float32, torch.device("cpu")
            self.n_stages = num_stages(name, pp)
            self.actions = add_send_recv(build_schedule(name, pp, n_micro), costs)[pp_rank]
            self.owner = self._stage_owners(build_schedule(name, pp, n_micro))
            self.store, self.timeline = WeightGradStore(), []
            self.overlap, self.fb_sequential, self.seam_log = False, True, []  # no seams: FB = F then B here

        def _forward_gen(self, stage, mb, slots, tokens):
            yield from ()
            time.sleep(costs.F)
            slot = slots.setdefault((stage, mb), _Slot())
            slot.out = torch.zeros(self.act_shape)
            if stage == self.n_stages - 1:
                slot.losses = (torch.zeros(()), torch.zeros(()))
            elif self.owner.get((stage + 1, mb)) == self.pp_rank:
                slots.setdefault((stage + 1, mb), _Slot()).inp = slot.out

        def _backward_gen(self, stage, mb, slots, split):
            yield from ()
            time.sleep(costs.B - costs.W if split else costs.B)
            slots[(stage, mb)].inp_grad = torch.zeros(self.act_shape)
            if stage > 0 and self.owner.get((stage - 1, mb)) == self.pp_rank:
                slots[(stage - 1, mb)].grad_out = slots[(stage, mb)].inp_grad
            if split:
                self.store._queued[(stage, mb)] = [lambda: time.sleep(costs.W)]

    return SleepExecutor()


def _overhead_rank(rank: int, world: int, name: str, n_micro: int, costs: Costs, steps: int) -> list[float]:
    ex = _sleep_executor(name, rank, world, n_micro, costs)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ex.run([None] * n_micro)
        times.append(time.perf_counter() - t0)
    return times


def executor_overhead(pp: int = 4, n_micro: int = 8, unit: float = 0.02, steps: int = 3) -> str:
    """(b) Run the real executor (its schedule walk, batched gloo P2P, W store) with sleep stages on ``pp`` CPU
    processes and compare the measured step time with the simulator's prediction for the same costs."""
    import statistics
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from dist_utils import run_ranks

    # Sleep stages have no MoE seams to overlap, so an FB action costs F + B here (see benchmarks/overlap.py for
    # the overlap of real stages).
    costs = Costs(F=unit, B=2 * unit, W=unit, FB=3 * unit, p2p=0.0)
    lines = [f"(b) executor with sleep stages, pp={pp}, {n_micro} micro-batches, F=B'=W={unit * 1e3:.0f} ms, "
             f"F&B=F+B (sleep stages have no seams to overlap); median of {steps} steps, max over ranks",
             f"{'schedule':10s} {'measured s':>11s} {'simulated s':>12s} {'overhead s':>11s} {'per action ms':>14s}"]
    for name in ("1f1b", "zb1p", "dualpipe"):
        per_rank = run_ranks(_overhead_rank, pp, name, n_micro, costs, steps)
        measured = max(statistics.median(t) for t in per_rank)
        sim = simulate_schedule(name, pp, n_micro, costs, wait_batches=True).step_time
        n_actions = max(len([a for a in acts if a.is_compute]) for acts in build_schedule(name, pp, n_micro))
        lines.append(f"{name:10s} {measured:11.3f} {sim:12.3f} {measured - sim:11.3f} "
                     f"{(measured - sim) / n_actions * 1e3:14.2f}")
    return "\n".join(lines)


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
