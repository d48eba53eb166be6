"""HAI's ZeRO-1 (``ZeroAdamW``) against DeepSpeed ZeRO stage 1: same model, weights, batches and update rule.

    OMP_NUM_THREADS=1 python benchmarks/zero1_vs_deepspeed.py                  # tiny and a wider tiny, 20 steps
    OMP_NUM_THREADS=1 python benchmarks/zero1_vs_deepspeed.py --steps 10 model.hidden_size=128

Two gloo ranks are forked (dp=2, one OpenMP thread each). On every rank the same ``build_model(seed)`` weights are
trained twice, step by step in alternation (so load from other processes on the machine hits both alike):

- HAI: ``Trainer.train_step`` (ZeroAdamW, warmup + cosine ``lr_at``, clipping, router-bias update);
- DeepSpeed: ``deepspeed.initialize`` with ZeRO stage 1, fp32 (no fp16/bf16), ``torch.optim.AdamW`` (``torch_adam``,
  ``foreach=False``: the single-tensor arithmetic ZeroAdamW mirrors), the same betas/eps, param groups with weight
  decay on dim >= 2 parameters only, ``gradient_clipping`` = train.grad_clip, ``gradient_accumulation_steps`` = our
  micro-batch count, the same global batch, and our ``lr_at(step)`` written into its param groups before each step.

Both read the same micro-batches from ``Sampler.micro_batches(step, dp_rank, dp, micro_batch_size)``.

Gradient scaling. Our loss per micro-batch is ``out.loss / n_micro``; the MoE sequence-balance loss enters the
gradient through an autograd injection whose gradient is ``model.set_aux_grad_scale(1 / n_micro)``, not through
``out.loss``. ``engine.backward(loss)`` divides the loss by gradient_accumulation_steps (= n_micro) itself, so the
DeepSpeed side passes the *unscaled* ``out.loss`` and sets the same aux scale 1 / n_micro: both then accumulate
d(main + lambda*mtp)/n_micro + d(aux)/n_micro per micro-batch. (Dividing the loss ourselves as well would scale the
main loss by 1/n_micro^2 but leave the aux gradient at 1/n_micro.)

Router bias (aux-loss-free balancing) is outside the optimizer; it is applied identically in both: after each
optimizer step, per-expert loads summed over the dp group, then ``b += gamma * sign(mean - load)`` (HAI's rule,
written out plainly for the DeepSpeed side). ``model.bias_update_speed=0`` as an override disables it in both.

Optimizer-state bytes per rank: fp32 master shard + exp_avg + exp_avg_sq (DeepSpeed: its
``single_partition_of_fp32_groups`` + the wrapped AdamW's state, including its 0-d ``step`` tensors).

DeepSpeed's first ``initialize`` JIT-compiles a C++ shared-memory op (45-110 s on 2 cores); the build is cached in
``$TORCH_EXTENSIONS_DIR`` (default here: ~/.cache/hai/torch_extensions), so only the first run pays.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: ranks share the cores

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hai.config.compose import compose  # noqa: E402
from hai.data import Sampler, TokenFile, ensure_token_file  # noqa: E402
from hai.model import build_model  # noqa: E402
from hai.parallel import Topology  # noqa: E402
from hai.train.trainer import Trainer, init_distributed, lr_at  # noqa: E402

__all__ = ["EXTENSIONS_DIR", "compare_rank", "compare", "format_table", "max_param_diff"]

EXTENSIONS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hai", "torch_extensions")
PRESETS = {
    "tiny": [],
    "tiny-h128": ["model.hidden_size=128", "model.intermediate_size=256", "model.moe_intermediate_size=64"],
}


def _cfg(dp: int, out_dir: str, steps: int, overrides):
    return compose(["model=tiny", "train=test", "cluster=cpu1", "parallel=single", f"train.steps={steps}",
                    "wandb.mode=disabled", f"out_dir={out_dir}", f"cluster.gpus_per_node={dp}", f"parallel.dp={dp}",
                    *overrides])


# ---------------------------------------------------------------------------------------------- DeepSpeed side
def _ds_config(cfg, n_micro: int) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": n_micro,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                  "weight_decay": t.weight_decay, "torch_adam": True,
                                                  "foreach": False}},
        "zero_optimization": {"stage": 1},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def update_router_biases(model, gamma: float) -> None:
    """HAI's aux-loss-free rule for a peer's replicated model: loads summed over the world (dp), then
    b += gamma * sign(mean - load)."""
    routers = model.routers()
    if not routers:
        return
    loads = torch.stack([r.load for r in routers])
    dist.all_reduce(loads)
    for r, load in zip(routers, loads):
        if gamma > 0:
            r.update_bias(load, gamma)
        r.load.zero_()


class _DeepSpeedRun:
    """The same model and batches through a DeepSpeed ZeRO-1 engine, one ``step()`` per global batch."""

    def __init__(self, cfg, dp: int, dp_rank: int):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        t = self.t = cfg.train
        self.cfg, self.dp, self.dp_rank = cfg, dp, dp_rank
        self.n_micro = t.global_batch_size // (dp * t.micro_batch_size)
        model = build_model(cfg.model, seed=t.seed)
        model.set_aux_grad_scale(1.0 / self.n_micro)  # engine.backward scales the loss, not the injected aux grad
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": t.weight_decay},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        with contextlib.redirect_stdout(io.StringIO()):  # "... shm_comm_op built successfully"
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                                     config=_ds_config(cfg, self.n_micro))
        self.model = model
        self.sampler = Sampler(TokenFile.open(ensure_token_file(cfg.data)), t.seq_len, t.global_batch_size, t.seed)
        self.step = 0

    def train_step(self) -> dict:
        lr = lr_at(self.step, self.t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        sums = torch.zeros(2, dtype=torch.float64)
        for tokens in self.sampler.micro_batches(self.step, self.dp_rank, self.dp, self.t.micro_batch_size):
            out = self.engine(tokens)
            self.engine.backward(out.loss)  # unscaled: the engine divides by gradient_accumulation_steps
            self.engine.step()  # steps the optimizer at the accumulation boundary only
            sums += torch.stack([out.main_loss.double(), out.mtp_loss.double()])
        self._update_router_biases()
        dist.all_reduce(sums)
        self.step += 1
        return {"loss": sums[0].item() / (self.n_micro * self.dp), "grad_norm": self.engine.get_global_grad_norm()}

    def _update_router_biases(self) -> None:
        update_router_biases(self.model, self.cfg.model.bias_update_speed)

    def state_bytes(self) -> int:
        zero = self.optimizer  # DeepSpeedZeroOptimizer: fp32 partitions + the wrapped torch AdamW's state
        tensors = list(zero.single_partition_of_fp32_groups)
        tensors += [v for s in zero.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(x.numel() * x.element_size() for x in tensors)


# ---------------------------------------------------------------------------------------------- one rank
def compare_rank(rank: int, world: int, out_dir: str, steps: int, overrides=(), warmup: int = 3) -> dict:
    """Train HAI and DeepSpeed side by side on this rank (a ``run_ranks`` target); return losses, times, params."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    warnings.filterwarnings("ignore", message=r".*(is deprecated|Slicing a flattened dim)")  # torch's, not ours
    cfg = _cfg(world, out_dir, steps, overrides)
    topo = Topology.from_config(cfg)
    hai = Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))
    t0 = time.perf_counter()
    ds = _DeepSpeedRun(cfg, topo.dp, hai.coords["dp"])
    ds_init_s = time.perf_counter() - t0
    out = {name: {"loss": [], "grad_norm": [], "time": []} for name in ("hai", "deepspeed")}
    for _ in range(steps):
        for name, run in (("hai", hai), ("deepspeed", ds)):
            dist.barrier()
            t0 = time.perf_counter()
            rec = run.train_step()
            out[name]["time"].append(time.perf_counter() - t0)
            out[name]["loss"].append(rec["loss"])
            out[name]["grad_norm"].append(float(rec["grad_norm"]))
    for name, model, opt in (("hai", hai.model, hai.optimizer), ("deepspeed", ds.model, ds)):
        out[name]["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        out[name]["biases"] = [r.bias.clone() for r in model.routers()]
        out[name]["state_bytes"] = opt.state_bytes()
        out[name]["median_step_s"] = statistics.median(out[name]["time"][min(warmup, steps - 1):])
    out["deepspeed"]["init_s"] = ds_init_s
    out["n_params"] = sum(p.numel() for p in hai.model.parameters())
    return out


def max_param_diff(result: dict) -> tuple[float, str]:
    """Largest |HAI - DeepSpeed| over all parameters, and the parameter where it occurs."""
    a, b = result["hai"]["params"], result["deepspeed"]["params"]
    return max(((a[n] - b[n]).abs().max().item(), n) for n in a)


def compare(steps: int, overrides=(), world: int = 2) -> list[dict]:
    """Fork ``world`` gloo ranks and run :func:`compare_rank` on each (rank order)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from dist_utils import run_ranks

    cfg = _cfg(world, ".", steps, overrides)
    ensure_token_file(cfg.data)  # build the default corpus once, before forking
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    if not os.path.isfile(os.path.join(ext_dir, "deepspeed_shm_comm", "deepspeed_shm_comm.so")):
        print(f"DeepSpeed will compile its shm op once (45-110 s on 2 cores), cached in {ext_dir}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(compare_rank, world, d, steps, tuple(overrides), timeout=600.0,
                         env={"TORCH_EXTENSIONS_DIR": ext_dir})


# ---------------------------------------------------------------------------------------------- report
def format_table(label: str, results: list[dict]) -> str:
    r0 = results[0]
    h, d = r0["hai"], r0["deepspeed"]
    diff, where = max_param_diff(r0)
    bias_diff = max(((x - y).abs().max().item() for x, y in zip(h["biases"], d["biases"])), default=0.0)
    step_s = [max(r[k]["median_step_s"] for r in results) for k in ("hai", "deepspeed")]
    rows = [
        f"## {label}: {r0['n_params']:,} parameters, dp={len(results)}, {len(h['loss'])} steps",
        f"{'':34s}{'HAI ZeroAdamW':>16s}{'DeepSpeed ZeRO-1':>18s}",
        f"{'median step time (s, max over ranks)':34s}{step_s[0]:16.4f}{step_s[1]:18.4f}",
    ]
    for rank, r in enumerate(results):
        rows.append(f"{f'optimizer-state bytes, rank {rank}':34s}{r['hai']['state_bytes']:16,d}"
                    f"{r['deepspeed']['state_bytes']:18,d}")
    rows += [f"{'final loss':34s}{h['loss'][-1]:16.6f}{d['loss'][-1]:18.6f}",
             f"max |param diff| after {len(h['loss'])} steps: {diff:.3e} ({where}); max |router bias diff|: "
             f"{bias_diff:.3e}; DeepSpeed initialize: {d['init_s']:.1f} s",
             f"{'step':>4s} {'loss HAI':>12s} {'loss DS':>12s} {'|dloss|':>9s} {'gnorm HAI':>10s} {'gnorm DS':>10s}"]
    for i, (lh, ld, gh, gd) in enumerate(zip(h["loss"], d["loss"], h["grad_norm"], d["grad_norm"])):
        rows.append(f"{i + 1:4d} {lh:12.6f} {ld:12.6f} {abs(lh - ld):9.2e} {gh:10.5f} {gd:10.5f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="Hydra overrides on top of model=tiny train=test (one run); "
                                                "without any, runs the presets " + ", ".join(PRESETS))
    args = p.parse_args(argv)
    import deepspeed  # noqa: F401  (imported once here; the forked ranks inherit it)

    runs = {"custom": args.overrides} if args.overrides else PRESETS
    for label, overrides in runs.items():
        print(format_table(label, compare(args.steps, overrides)), flush=True)
        print()


if __name__ == "__main__":
    main()
