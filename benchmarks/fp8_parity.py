"""FP8 vs BF16 training parity, paired over seeds, beside the BF16 vs FP32 noise floor. DeepSeek-V3 reported a
< 0.25% relative loss gap between FP8 and BF16 training.

For each seed (train.seed: weight init and data order) the tiny model trains three times, single process
(cluster=cpu1 parallel=single train=test), as the trainer runs each precision:
  fp32: fp32 weights, no autocast.
  bf16: bf16 weights (fp32 master weights in the optimizer), forward and backward under torch.autocast(bfloat16).
  fp8:  as bf16, and the three GEMMs of attention projections, dense MLPs, shared/routed experts and the MTP projection
        in e4m3 with 1x128 / 128x128 block scales (hai.kernels.fp8_linear / fp8_grouped_linear, which turn autocast
        off inside; the torch reference path on CPU); embedding, head, router, norms and the attention core stay
        under bf16 autocast with fp32 reductions, as V3 kept them.
Each run's loss is the mean of its last N steps. The paired gaps (fp8 - bf16) / bf16 and (bf16 - fp32) / fp32 are
signed, per seed; their mean, standard deviation and standard error over the seeds say whether a 0.25% effect is
resolvable at this scale (one seed cannot test it).

    python benchmarks/fp8_parity.py [--steps 300] [--seeds 5] [--last 20] [--json OUT] [--extra key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # torch reference path for the FP8 ops on CPU
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny GEMMs: one thread is ~10-50x faster on a shared 2-core box

import torch  # noqa: E402

from hai.cli import main as hai_main  # noqa: E402
from hai.train.metrics import read_metrics  # noqa: E402

DEEPSEEK_BOUND = 0.0025  # < 0.25% (DeepSeek-V3 technical report, FP8 vs BF16 validation)
PRECISIONS = ("fp32", "bf16", "fp8")


def run(precision: str, seed: int, steps: int, out_dir: str, extra: list[str]) -> list[float]:
    rc = hai_main(["train", "model=tiny", "cluster=cpu1", "parallel=single", "train=test", f"train.steps={steps}",
                   f"train.seed={seed}", f"model.precision={precision}", "wandb.mode=disabled",
                   "train.progress=false", f"out_dir={out_dir}", *extra])
    if rc != 0:
        raise SystemExit(f"{precision} run (seed {seed}) failed with rc={rc}")
    return [r["loss"] for r in read_metrics(out_dir)]


def stats(gaps: list[float]) -> dict:
    """Mean, sample standard deviation and standard error of the signed per-seed gaps."""
    n = len(gaps)
    std = statistics.stdev(gaps) if n > 1 else float("nan")
    return {"gaps": gaps, "mean": statistics.fmean(gaps), "std": std, "se": std / n ** 0.5,
            "signs": "".join("+" if g > 0 else "-" for g in gaps)}


def _line(name: str, s: dict) -> str:
    return (f"  {name:<22} mean {100 * s['mean']:+.3f}%  std {100 * s['std']:.3f}%  SE {100 * s['se']:.3f}%  "
            f"signs {s['signs']}  per seed " + " ".join(f"{100 * g:+.2f}%" for g in s["gaps"]))


def report(finals: dict, steps: int, last: int, extra: list[str]) -> dict:
    seeds = sorted(finals)
    gap = {"fp8 - bf16 (/ bf16)": [(finals[s]["fp8"] - finals[s]["bf16"]) / finals[s]["bf16"] for s in seeds],
           "bf16 - fp32 (/ fp32)": [(finals[s]["bf16"] - finals[s]["fp32"]) / finals[s]["fp32"] for s in seeds]}
    out = {name: stats(g) for name, g in gap.items()}
    fp8 = out["fp8 - bf16 (/ bf16)"]
    print(f"tiny model, {steps} steps, seeds {seeds}, loss = mean of the last {last} steps, single process "
          f"(cluster=cpu1 parallel=single train=test{' ' + ' '.join(extra) if extra else ''}); recipe: see --help")
    for p in PRECISIONS:
        print(f"  {p:<5} final loss per seed " + " ".join(f"{finals[s][p]:.4f}" for s in seeds))
    for name, s in out.items():
        print(_line(name, s))
    resolvable = fp8["se"] < DEEPSEEK_BOUND / 2
    print(f"  DeepSeek-V3 bound {100 * DEEPSEEK_BOUND:.2f}%: the fp8 gap's standard error is "
          f"{100 * fp8['se']:.3f}% ({'small enough' if resolvable else 'too large'} to resolve it at this scale; "
          f"noise floor bf16 - fp32 std {100 * out['bf16 - fp32 (/ fp32)']['std']:.3f}%)")
    return {"steps": steps, "last": last, "seeds": seeds, "finals": {str(s): finals[s] for s in seeds}, **out,
            "bound": DEEPSEEK_BOUND, "resolvable": resolvable}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=5, help="train.seed 0 .. N-1")
    ap.add_argument("--last", type=int, default=20, help="average the loss over the last N steps")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--extra", nargs="*", default=[], help="more hai config overrides for every run")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    n, finals, t0 = min(args.last, args.steps), {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            curves = {p: run(p, seed, args.steps, os.path.join(tmp, f"{p}_{seed}"), args.extra) for p in PRECISIONS}
            finals[seed] = {p: sum(c[-n:]) / n for p, c in curves.items()}
    result = report(finals, args.steps, n, args.extra)
    print(f"  wall {time.perf_counter() - t0:.0f} s for {args.seeds * len(PRECISIONS)} runs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
