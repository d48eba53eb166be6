"""Rank-0 observability: metrics.jsonl, a wandb run (offline by default) and a tqdm progress bar.

Only rank 0 constructs a :class:`MetricsSink`; metrics arriving here are already global (reduced by the trainer).
The wandb API key is never written anywhere by HAI: online mode reads it from the environment / wandb's own login.
The run id (``run_id``) travels in checkpoints, so a run resumed from one continues the same wandb run.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any

__all__ = ["MetricsSink", "read_metrics"]


class MetricsSink:
    def __init__(self, out_dir: str, config: dict, wandb_cfg, total_steps: int, start_step: int = 0,
                 progress: bool = True, run_id: str | None = None):
        self.out_dir = out_dir
        self.run_id = run_id or uuid.uuid4().hex[:12]  # a new run unless continuing a checkpoint's
        os.makedirs(out_dir, exist_ok=True)
        self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", buffering=1)
        self._wandb = self._init_wandb(config, wandb_cfg)
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _init_wandb(self, config: dict, wcfg):
        if wcfg.mode == "disabled":
            return None
        import wandb

        return wandb.init(project=wcfg.project, entity=wcfg.entity, name=wcfg.name, tags=list(wcfg.tags),
                          config=config, dir=self.out_dir, mode=wcfg.mode, id=self.run_id, resume="allow",
                          settings=wandb.Settings(x_disable_stats=True, console="off", silent=True))

    def log(self, metrics: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(metrics) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

    def event(self, kind: str, **fields: Any) -> None:
        """A non-step record (skipped step, checkpoint, restart) in metrics.jsonl."""
        self._jsonl.write(json.dumps({"event": kind, **fields}) + "\n")

    def paths(self) -> dict[str, str | None]:
        """Where this run's outputs are: metrics.jsonl, checkpoints, loss.png, the wandb run (and how to upload it)."""
        out = {"metrics_path": os.path.join(self.out_dir, "metrics.jsonl"),
               "checkpoint_dir": os.path.join(self.out_dir, "checkpoints"),
               "loss_png": os.path.join(self.out_dir, "loss.png"), "wandb_dir": None, "wandb_sync": None,
               "wandb_url": None}
        run = self._wandb
        if run is not None:
            run_dir = os.path.dirname(run.dir.rstrip("/"))  # .../wandb/offline-run-DATE-ID (run.dir is its files/)
            out["wandb_dir"] = run_dir
            if run.settings.mode == "offline":
                out["wandb_sync"] = f"wandb sync {run_dir}"
            else:
                out["wandb_url"] = run.url
        return out

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
        try:
            plot_run(self.out_dir)
        except Exception as e:  # noqa: BLE001 - a picture must never fail a finished run
            print(f"hai: could not draw loss.png ({type(e).__name__}: {e})", file=sys.stderr)
        if self._wandb is not None:
            for k, v in (summary or {}).items():
                self._wandb.summary[k] = v
            self._wandb.finish()
        self._jsonl.close()


def read_metrics(out_dir: str) -> list[dict]:
    """Per-step records of a run (events excluded)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "event" not in r]


def plot_run(out_dir: str) -> str | None:
    """Draw ``out_dir/loss.png`` from metrics.jsonl: train and validation loss per step, and tokens/s."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    by_step: dict[int, dict] = {}
    for r in read_metrics(out_dir):  # a restarted run repeats steps: the last record of a step wins
        by_step[int(r["step"])] = r
    rows = [by_step[k] for k in sorted(by_step)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    ax.plot(steps, [r["loss"] for r in rows], lw=1, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", ms=4, lw=1.5, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    tps = [r.get("tokens_per_s") for r in rows]
    bx.plot(steps, tps, lw=1, color="tab:green")
    bx.set_xlabel("step")
    bx.set_ylabel("tokens/s (all ranks)")
    bx.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(out_dir)))
    out = os.path.join(out_dir, "loss.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
