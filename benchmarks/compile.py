"""`train.compile`: CPU step time of one process with the block's elementwise math eager vs torch.compile'd.

    python benchmarks/compile.py [--model small] [--steps 12] [--recompute none]

Prints the median step time of the steps after the first two (compilation happens in the first), both ways, and
the first step's time (which pays the compile).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from hai.config.compose import compose  # noqa: E402
from hai.data import TokenFile, ensure_token_file  # noqa: E402
from hai.model.layers import compile_elementwise  # noqa: E402
from hai.parallel import Topology  # noqa: E402
from hai.train.trainer import Trainer  # noqa: E402


def _times(model: str, steps: int, recompute: str, compiled: bool) -> list[float]:
    cfg = compose([f"model={model}", "train=test", "cluster=cpu1", "parallel=single", "wandb.mode=disabled",
                   f"train.recompute={recompute}", f"train.compile={str(compiled).lower()}", "model.precision=fp32"])
    trainer = Trainer(cfg, Topology.from_config(cfg), None, TokenFile.open(ensure_token_file(cfg.data)))
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        out.append(time.perf_counter() - t0)
    compile_elementwise(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--recompute", default="none")
    a = ap.parse_args()
    print(f"model={a.model} recompute={a.recompute}, one process, {os.cpu_count()} cores")
    print(f"{'mode':<10} {'first step s':>12} {'median step s':>14}")
    for compiled in (False, True):
        t = _times(a.model, a.steps, a.recompute, compiled)
        print(f"{'compiled' if compiled else 'eager':<10} {t[0]:>12.2f} {statistics.median(t[2:]):>14.3f}")


if __name__ == "__main__":
    main()
