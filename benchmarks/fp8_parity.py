"""FP8 vs BF16 training parity on the tiny model (issue 6, item 5). DeepSeek-V3 reported < 0.25% relative loss gap.

Trains the tiny model twice, single process (cluster=cpu1 parallel=single train=test), same seed and data:
  bf16: model.precision=bf16 -> the Trainer runs forward under torch.autocast(bfloat16); fp32 master weights.
  fp8:  model.precision=fp8  -> attention projections, dense MLPs, shared/routed experts and the MTP projection run
        their three GEMMs in e4m3 with 1x128 / 128x128 block scales (hai.kernels.fp8_linear / fp8_grouped_linear,
        torch reference path on CPU); no autocast, so embedding, head, router, norms and attention core run in fp32
        (V3 kept those in bf16/fp32); fp32 master weights.
Prints the mean loss of the last 20 steps of each run and the relative difference.

    python benchmarks/fp8_parity.py [--steps 300] [--extra key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # torch reference path for the FP8 ops on CPU
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny GEMMs: one thread is ~10-50x faster on a shared 2-core box

import torch  # noqa: E402

from hai.cli import main as hai_main  # noqa: E402
from hai.train.metrics import read_metrics  # noqa: E402

DEEPSEEK_BOUND = 0.0025  # < 0.25% (DeepSeek-V3 technical report, FP8 vs BF16 validation)


def run(precision: str, steps: int, out_dir: str, extra: list[str]) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    rc = hai_main(["train", "model=tiny", "cluster=cpu1", "parallel=single", "train=test", f"train.steps={steps}",
                   f"model.precision={precision}", "wandb.mode=disabled", f"out_dir={out_dir}", *extra])
    if rc != 0:
        raise SystemExit(f"{precision} run failed with rc={rc}")
    return [r["loss"] for r in read_metrics(out_dir)], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--last", type=int, default=20, help="average the loss over the last N steps")
    ap.add_argument("--extra", nargs="*", default=[], help="more hai config overrides for both runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    extra = list(args.extra)
    curves, times = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("bf16", "fp8"):
            curves[precision], times[precision] = run(precision, args.steps, os.path.join(tmp, precision), extra)
    n = min(args.last, args.steps)
    final = {p: sum(c[-n:]) / n for p, c in curves.items()}
    rel = (final["fp8"] - final["bf16"]) / final["bf16"]
    print(f"tiny model, {args.steps} steps, same seed and data, single process (cluster=cpu1 parallel=single "
          f"train=test{' ' + ' '.join(extra) if extra else ''})")
    print("fp8 mode: FP8 (e4m3, 1x128 x 128x128 scales) GEMMs in attention projections / MLPs / experts / MTP proj, "
          "torch reference path; everything else (embed, head, router, norms, attention core) in fp32 (no autocast);"
          " fp32 master weights. bf16 mode: autocast bf16, fp32 master weights.")
    for p in ("bf16", "fp8"):
        c = curves[p]
        print(f"  {p:5s} first loss {c[0]:.4f}  final (mean of last {n}) {final[p]:.4f}  wall {times[p]:.0f} s")
    print(f"  relative difference (fp8 - bf16) / bf16: {rel * 100:+.3f}%   (DeepSeek-V3: < {DEEPSEEK_BOUND * 100:.2f}%)"
          f"   -> {'within' if abs(rel) < DEEPSEEK_BOUND else 'outside'} that bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
