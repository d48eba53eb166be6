"""HAI's training step against a plain PyTorch loop over the same model and batches (one process).

    OMP_NUM_THREADS=1 python benchmarks/overhead.py                    # presets tiny and tiny-h256
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --steps 30 model.hidden_size=128

HAI: ``Trainer.train_step`` with cluster=cpu1 parallel=single (ZeroAdamW on one rank, warmup + cosine LR, clipping,
router-bias update, metrics). Plain: the loop a PyTorch user would write for the same work: ``build_model`` with the
same seed, ``torch.optim.AdamW`` (defaults; weight decay on dim >= 2 parameters only), the same micro-batches from
``Sampler`` with ``(loss / n_micro).backward()`` accumulation and the same aux-loss scale, ``clip_grad_norm_``, the
LR from ``lr_at``, and the same router-bias rule. The two are stepped alternately (so load from other processes on
the machine hits both alike) after a few warm-up steps; the table gives median step times, HAI / plain, the median
time of the part after forward/backward (optimizer, clipping, bias update) and, as a check that both did the same
work, the max parameter difference at the end (it grows over steps from rounding: torch clips with an fp32 norm,
ZeroAdamW with an fp64 one, and routing is discrete, so a near-tie can flip an expert choice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch; other processes share the cores

import torch  # noqa: E402

from hai.config.compose import compose  # noqa: E402
from hai.data import Sampler, TokenFile, ensure_token_file  # noqa: E402
from hai.model import build_model  # noqa: E402
from hai.parallel import Topology  # noqa: E402
from hai.train.trainer import Trainer, lr_at  # noqa: E402

__all__ = ["PlainLoop", "measure", "format_table"]

PRESETS = {
    "tiny": [],
    "tiny-h256": ["model.hidden_size=256", "model.intermediate_size=512", "model.moe_intermediate_size=128",
                  "train.seq_len=64"],
}


class PlainLoop:
    """Textbook PyTorch: AdamW + clip_grad_norm_ + gradient accumulation over micro-batches."""

    def __init__(self, cfg):
        t = self.t = cfg.train
        self.cfg = cfg
        self.n_micro = t.global_batch_size // t.micro_batch_size
        self.model = build_model(cfg.model, seed=t.seed)
        self.model.set_aux_grad_scale(1.0 / self.n_micro)
        params = list(self.model.parameters())
        self.opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                     lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        self.sampler = Sampler(TokenFile.open(ensure_token_file(cfg.data)), t.seq_len, t.global_batch_size, t.seed)
        self.step = 0

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        total = 0.0
        for tokens in self.sampler.micro_batches(self.step, 0, 1, self.t.micro_batch_size):
            out = self.model(tokens)
            (out.loss / self.n_micro).backward()
            total += out.main_loss.item()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.t)
        self.opt.step()
        self.opt.zero_grad()
        for r in self.model.routers():
            r.update_bias(r.load, self.cfg.model.bias_update_speed)
            r.load.zero_()
        self.step += 1
        return {"loss": total / self.n_micro, "optimizer_s": time.perf_counter() - t1}


def measure(overrides=(), steps: int = 20, warmup: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = compose(["model=tiny", "train=test", "cluster=cpu1", "parallel=single", f"train.steps={warmup + steps}",
                       "wandb.mode=disabled", f"out_dir={out_dir}", *overrides])
        hai = Trainer(cfg, Topology.from_config(cfg), None, TokenFile.open(ensure_token_file(cfg.data)))
        plain = PlainLoop(cfg)
        times = {"hai": [], "plain": []}
        opt_times = {"hai": [], "plain": []}
        losses = {"hai": [], "plain": []}
        for i in range(warmup + steps):
            for name, run in (("hai", hai), ("plain", plain)):
                t0 = time.perf_counter()
                rec = run.train_step()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
                    opt_times[name].append(rec["optimizer_s"])
                losses[name].append(rec["loss"])
        ref = dict(plain.model.named_parameters())
        diff = max((p - ref[n]).abs().max().item() for n, p in hai.model.named_parameters())
    return {"n_params": sum(p.numel() for p in plain.model.parameters()), "cfg": cfg, "steps": steps,
            "median": {k: statistics.median(v) for k, v in times.items()}, "times": times,
            "median_opt": {k: statistics.median(v) for k, v in opt_times.items()}, "losses": losses, "param_diff": diff}


def format_table(rows: list[tuple[str, dict]]) -> str:
    head = (f"{'config':12s} {'params':>10s} {'tokens/step':>11s} {'micro':>5s} {'HAI step s':>11s} "
            f"{'plain step s':>12s} {'HAI/plain':>9s} {'optim s HAI/plain':>17s} {'max|dparam|':>11s} {'final loss HAI/plain':>21s}")
    out = [f"median of the timed steps after warm-up; torch threads: {torch.get_num_threads()}; 'optim s' is the "
           f"part after forward/backward (clip + AdamW + zero_grad + router bias)", head]
    for label, r in rows:
        t = r["cfg"].train
        h, p = r["median"]["hai"], r["median"]["plain"]
        out.append(f"{label:12s} {r['n_params']:10,d} {t.global_batch_size * t.seq_len:11d} "
                   f"{t.global_batch_size // t.micro_batch_size:5d} {h:11.4f} {p:12.4f} {h / p:9.3f} "
                   f"{r['median_opt']['hai']:8.4f}/{r['median_opt']['plain']:.4f} {r['param_diff']:11.2e} {r['losses']['hai'][-1]:10.4f}/{r['losses']['plain'][-1]:.4f}")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides on top of model=tiny train=test (one run); "
                                                 "without any, runs the presets " + ", ".join(PRESETS))
    args = ap.parse_args(argv)
    runs = {"custom": args.overrides} if args.overrides else PRESETS
    print(format_table([(label, measure(ov, args.steps, args.warmup)) for label, ov in runs.items()]))


if __name__ == "__main__":
    main()
