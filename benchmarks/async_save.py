"""Step time around checkpoints, synchronous vs ``train.async_save=true``.

Trains ``--steps`` steps on ``--ranks`` forked gloo ranks (dp = ranks) saving every ``--every`` steps, once with
synchronous saves and once asynchronous, and prints per mode: the step time of steps that follow a save, of the
other steps, and how long the loop was held at each save (sync: the whole write; async: staging the copy).

    python benchmarks/async_save.py --model small --ranks 2 --steps 24 --every 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # forked ranks

from forked import run_ranks  # noqa: E402

from hai.config.compose import compose  # noqa: E402
from hai.parallel.topology import Topology  # noqa: E402
from hai.train.trainer import Trainer, init_distributed, load_data  # noqa: E402


def _rank(rank: int, world: int, overrides: list[str]) -> None:
    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    Trainer(cfg, topo, init_distributed(topo), load_data(cfg)).fit()


def _measure(model: str, ranks: int, steps: int, every: int, async_save: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        ov = [f"model={model}", "train=test", "cluster=cpu1", "parallel=single", f"cluster.gpus_per_node={ranks}",
              f"parallel.dp={ranks}", f"train.steps={steps}", f"train.save_every={every}", "train.keep_last=1",
              f"train.async_save={str(async_save).lower()}", "wandb.mode=disabled", "train.progress=false",
              "train.seq_len=64", f"train.global_batch_size={4 * ranks}", "train.micro_batch_size=4",
              f"out_dir={out}"]
        run_ranks(_rank, ranks, ov, timeout=3600)
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(out, "checkpoints"))
                   for f in fs)
    step_t = {r["step"]: r["step_time_s"] for r in rows if "event" not in r}
    held = [r["seconds"] for r in rows if r.get("event") == ("checkpoint_staged" if async_save else "checkpoint")]
    written = [r["seconds"] for r in rows if r.get("event") == "checkpoint"]
    saves = [s for s in step_t if s % every == 0 and s < steps]
    after = [step_t[s + 1] for s in saves]
    other = [t for s, t in step_t.items() if s > 1 and s - 1 not in saves]
    return {"after_save": statistics.median(after), "other": statistics.median(other),
            "held_plus_next": statistics.median([h + t for h, t in zip(held, after)]),
            "held": statistics.median(held), "write": statistics.median(written), "ckpt_mb": size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=4)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"model={a.model} ranks={a.ranks} steps={a.steps} save_every={a.every} (medians, seconds; the sync write "
          f"holds the loop, the async one overlaps the next step)")
    print(f"{'mode':6s} {'step after a save':>18s} {'other steps':>12s} {'loop held at save':>18s} "
          f"{'held + next step':>17s} {'write':>8s} {'checkpoint MB':>14s}")
    for mode in (False, True):
        r = _measure(a.model, a.ranks, a.steps, a.every, mode)
        print(f"{'async' if mode else 'sync':6s} {r['after_save']:18.3f} {r['other']:12.3f} {r['held']:18.3f} "
              f"{r['held_plus_next']:17.3f} {r['write']:8.3f} {r['ckpt_mb']:14.1f}")


if __name__ == "__main__":
    main()
