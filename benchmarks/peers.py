"""HAI against what a user would pick instead, side by side on identical work, in one table.

    python benchmarks/peers.py                       # all sections, 15 pairs each (about 2 minutes on 2 cores)
    python benchmarks/peers.py --only pipeline --pairs 11
    python benchmarks/peers.py --max-load 0.5 --wait 120   # wait up to 2 min for a quiet machine first

Sections (each pair of runs alternates A B A B ... in the same processes, so load from elsewhere hits both alike;
the table gives each side's median and min-max, HAI / peer as the median of the pairs' ratios, and a correctness
column):

- **pipeline**: HAI's executor vs ``torch.distributed.pipelining`` on 4 gloo ranks, the same per-rank modules (one
  model object: the torch stages wrap HAI's embedding / blocks / head), the same micro-batches and loss (main +
  lambda*MTP, divided by the micro-batch count; ``scale_grads=False``). Timed: one step's forward + backward + P2P
  (``PipelineExecutor.run`` vs ``schedule.step``), from a barrier to the slowest rank's finish; gradients are zeroed
  outside the timing. Pairs: 1F1B vs ``Schedule1F1B``; DualPipeV vs ``ScheduleDualPipeV``; ZB1P vs
  ``ScheduleInterleavedZeroBubble`` with one stage per rank (torch's ZB1P with a single local stage: the same
  F/B/W grid as HAI's ``zb1p``). Correctness: every gradient after one step from zero, HAI vs torch (bitwise, else
  the max |difference|).
- **zero1**: the whole training step at dp=2 (forward/backward, reduction, clip, AdamW, router-bias update), HAI's
  ``Trainer.train_step`` (``ZeroAdamW``) vs DeepSpeed ZeRO stage 1 (``benchmarks/zero1_vs_deepspeed.py``) and vs
  DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer`` (AdamW, ``no_sync`` accumulation, ``clip_grad_norm_``).
  Also the optimizer-state bytes per rank and the max |parameter difference| after the timed steps.
- **step**: one process, HAI's ``Trainer.train_step`` vs the plain PyTorch loop of ``benchmarks/overhead.py``.

The model is ``model=tiny`` (fp32) with 8 layers for the pipeline (so DualPipeV has a layer per stage). Timings on
a shared 2-core machine are noisy: the load average before and after each section is printed, and ``--max-load``
waits for a quiet machine. Numbers never feed CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: ranks share the cores

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

from hai.config.compose import compose  # noqa: E402
from hai.data import Sampler, TokenFile, ensure_token_file  # noqa: E402
from hai.model import build_model  # noqa: E402
from hai.parallel import Topology  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # forked ranks
from forked import run_ranks  # noqa: E402

PP = 4
N_MICRO = 8
PIPELINE_MODEL = ["model=tiny", "model.num_layers=8", "train=test", "train.micro_batch_size=1",
                  f"train.global_batch_size={N_MICRO}"]
PIPELINE_PEERS = {"1f1b": "Schedule1F1B", "dualpipev": "ScheduleDualPipeV", "zb1p": "ScheduleInterleavedZeroBubble"}


# ---------------------------------------------------------------------------------------------- helpers
def _load() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_load: float | None, wait_s: float) -> float:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``wait_s``); return the load."""
    t0 = time.time()
    while max_load is not None and _load() > max_load and time.time() - t0 < wait_s:
        time.sleep(5)
    return _load()


def _summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "xs": list(xs)}


# ---------------------------------------------------------------------------------------------- pipeline
class _TorchStage(nn.Module):
    """One pipeline stage as torch.distributed.pipelining sees it: HAI's modules of the stage (shared, not copied).
    The last stage returns the final hidden state; the loss function applies the head (and MTP) to it, so the
    head / norm / MTP modules are registered here for torch's weight-gradient pass."""

    def __init__(self, model, spec):
        super().__init__()
        self.embed = model.embed if spec.embed else None
        self.blocks = nn.ModuleList(model.layers[i] for i in spec.layers)
        tail = [model.norm, model.head, *model.mtp] + ([model.embed] if model.mtp and not spec.embed else [])
        self.tail = nn.ModuleList(tail) if (spec.head or spec.mtp) else None  # MTP re-embeds

    def forward(self, x):
        h = self.embed(x[:, :-1]) if self.embed is not None else x
        for block in self.blocks:
            h = block(h)
        return h


def _torch_schedule(name: str, model, layout, pp_rank: int, group, device, loss_fn):
    from torch.distributed import pipelining as tp

    stages = [tp.PipelineStage(_TorchStage(model, layout.specs[s]), s, layout.n_stages, device, group=group)
              for s in layout.rank_stages(pp_rank)]
    cls = getattr(tp, PIPELINE_PEERS[name])
    if name == "1f1b":
        return cls(stages[0], N_MICRO, loss_fn=loss_fn, scale_grads=False), stages
    return cls(stages, N_MICRO, loss_fn=loss_fn, scale_grads=False), stages


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _zero(model) -> None:
    for p in model.parameters():
        p.grad = None


def pipeline_rank(rank: int, world: int, schedule: str, pairs: int, warmup: int) -> dict:
    """One rank of the pipeline comparison (a ``run_ranks`` target)."""
    from hai.model.init import materialize, param_dtype
    from hai.parallel.parallelize import parallelize
    from hai.pipeline.executor import PipelineExecutor
    from hai.train.trainer import init_distributed

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.distributed.pipelining").setLevel(logging.ERROR)
    cfg = compose([*PIPELINE_MODEL, "cluster=cpu1", "parallel=single", f"cluster.gpus_per_node={PP}",
                   f"parallel.pp={PP}", f"parallel.schedule={schedule}", "wandb.mode=disabled"])
    topo = Topology.from_config(cfg)
    mesh = init_distributed(topo)
    device = torch.device("cpu")
    model = build_model(cfg.model, device="meta", recompute=cfg.train.recompute)
    placement = parallelize(model, topo, cfg, mesh, rank)
    materialize(model, device, param_dtype(cfg.model), cfg.train.seed, cfg.model.init_std)
    model.set_aux_grad_scale(1.0 / N_MICRO)
    group = mesh["pp"].get_group()
    pp_rank = topo.coords(rank)["pp"]
    t = cfg.train
    hai = PipelineExecutor(model, placement, topo, cfg, group, device)
    lam = cfg.model.mtp_lambda

    def loss_fn(h, tokens):
        loss = model.main_loss(h, tokens)
        if model.mtp:
            loss = loss + lam * model.mtp_loss(h, tokens)
        return loss / N_MICRO

    peer, stages = _torch_schedule(schedule, model, placement.layout, pp_rank, group, device, loss_fn)
    sampler = Sampler(TokenFile.open(ensure_token_file(cfg.data)), t.seq_len, t.global_batch_size, t.seed)
    first = any(s == 0 for s in placement.layout.rank_stages(pp_rank))
    last = any(s == placement.layout.n_stages - 1 for s in placement.layout.rank_stages(pp_rank))

    # HAI's executor attaches its weight-gradient store to the layers (when its schedule defers W); torch's own
    # input/weight split works on the autograd graph, so its runs see the plain modules
    holders = [m for m in model.modules() if hasattr(m, "wgrad_store")]
    hai_store = [m.wgrad_store for m in holders]

    def use_store(on: bool) -> None:
        for m, s in zip(holders, hai_store):
            m.wgrad_store = s if on else None

    def run_hai(step):
        hai.run(sampler.micro_batches(step, 0, 1, t.micro_batch_size))

    def run_torch(step):
        x = torch.cat(sampler.micro_batches(step, 0, 1, t.micro_batch_size))
        peer.step(*((x,) if first else ()), **({"target": x} if last else {}))

    # correctness: one step from zero gradients each
    run_hai(0)
    g_hai = _grads(model)
    _zero(model)
    use_store(False)
    run_torch(0)
    use_store(True)
    g_torch = _grads(model)
    _zero(model)
    bitwise = g_hai.keys() == g_torch.keys() and all(torch.equal(g_hai[n], g_torch[n]) for n in g_hai)
    diff, worst = max((((g_hai[n] - g_torch[n]).abs().max().item(), n) for n in g_hai if n in g_torch),
                      default=(float("inf"), ""))
    if g_hai.keys() != g_torch.keys():
        diff, worst = float("inf"), f"gradients of {sorted(g_hai.keys() ^ g_torch.keys())}"
    times = {"hai": [], "torch": []}
    for i in range(warmup + pairs):
        for name, fn in (("hai", run_hai), ("torch", run_torch)):
            use_store(name == "hai")
            dist.barrier(group)
            t0 = time.perf_counter()
            fn(1 + i)
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the slowest rank ends the step
            _zero(model)
            if i >= warmup:
                times[name].append(elapsed.item())
    return {"times": times, "bitwise": bitwise, "max_diff": diff, "worst": worst, "n_grads": len(g_hai),
            "differ": sorted(n for n in g_hai if n in g_torch and not torch.equal(g_hai[n], g_torch[n]))}


def pipeline_section(pairs: int, warmup: int) -> list[dict]:
    rows = []
    for schedule, peer in PIPELINE_PEERS.items():
        res = run_ranks(pipeline_rank, PP, schedule, pairs, warmup, timeout=900.0)
        r0 = res[0]
        rows.append({"section": "pipeline", "hai": f"HAI {schedule}", "peer": f"torch {peer}",
                     "what": f"fwd+bwd+P2P, pp={PP}, {N_MICRO} micro-batches",
                     "hai_s": _summary(r0["times"]["hai"]), "peer_s": _summary(r0["times"]["torch"]),
                     "check": "grads bitwise" if all(r["bitwise"] for r in res) else
                     "grads max |diff| {:.1e} ({})".format(*max((r["max_diff"], r["worst"]) for r in res))})
    return rows


# ---------------------------------------------------------------------------------------------- ZeRO-1
class _ZeroRedundancyRun:
    """DDP + torch.distributed.optim.ZeroRedundancyOptimizer(AdamW): the same model, batches and update rule."""

    def __init__(self, cfg, dp: int, dp_rank: int):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        t = self.t = cfg.train
        self.cfg, self.dp, self.dp_rank = cfg, dp, dp_rank
        self.n_micro = t.global_batch_size // (dp * t.micro_batch_size)
        self.model = build_model(cfg.model, seed=t.seed)
        self.model.set_aux_grad_scale(1.0 / self.n_micro)
        self.ddp = DistributedDataParallel(self.model)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = ZeroRedundancyOptimizer(decay, optimizer_class=torch.optim.AdamW, lr=t.lr,
                                           betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                                           foreach=False)
        self.opt.add_param_group({"params": rest, "weight_decay": 0.0})
        self.sampler = Sampler(TokenFile.open(ensure_token_file(cfg.data)), t.seq_len, t.global_batch_size, t.seed)
        self.step = 0

    def train_step(self) -> dict:
        from hai.train.trainer import lr_at

        mbs = self.sampler.micro_batches(self.step, self.dp_rank, self.dp, self.t.micro_batch_size)
        for i, tokens in enumerate(mbs):
            ctx = self.ddp.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext()
            with ctx:
                out = self.ddp(tokens)
                (out.loss / self.n_micro).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.t)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        from zero1_vs_deepspeed import update_router_biases

        update_router_biases(self.model, self.cfg.model.bias_update_speed)
        self.step += 1
        return {}

    def state_bytes(self) -> int:
        local = self.opt.optim  # this rank's shard: torch's AdamW state (exp_avg, exp_avg_sq, step)
        return sum(v.numel() * v.element_size() for s in local.state.values() for v in s.values()
                   if torch.is_tensor(v))


def zero1_rank(rank: int, world: int, out_dir: str, pairs: int, warmup: int) -> dict:
    from zero1_vs_deepspeed import EXTENSIONS_DIR, _cfg, _DeepSpeedRun

    from hai.train.trainer import Trainer, init_distributed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    warnings.filterwarnings("ignore")
    cfg = _cfg(world, out_dir, warmup + pairs, ())
    topo = Topology.from_config(cfg)
    runs = {"hai": Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))}
    runs["zero_redundancy"] = _ZeroRedundancyRun(cfg, topo.dp, runs["hai"].coords["dp"])
    with contextlib.redirect_stdout(io.StringIO()):
        runs["deepspeed"] = _DeepSpeedRun(cfg, topo.dp, runs["hai"].coords["dp"])
    times = {k: [] for k in runs}
    for i in range(warmup + pairs):
        for name, run in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            run.train_step()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times[name].append(elapsed.item())
    params = {k: dict(r.model.named_parameters()) for k, r in runs.items()}
    diff = {k: max((params["hai"][n] - p).abs().max().item() for n, p in params[k].items())
            for k in ("deepspeed", "zero_redundancy")}
    state = {"hai": runs["hai"].optimizer.state_bytes(), "deepspeed": runs["deepspeed"].state_bytes(),
             "zero_redundancy": runs["zero_redundancy"].state_bytes()}
    return {"times": times, "diff": diff, "state": state}


def zero1_section(pairs: int, warmup: int) -> list[dict]:
    import deepspeed  # noqa: F401  (imported once here; the forked ranks inherit it)
    from zero1_vs_deepspeed import EXTENSIONS_DIR

    ext = os.environ.get("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    ensure_token_file(compose(["model=tiny", "train=test"]).data)
    with tempfile.TemporaryDirectory() as d:
        res = run_ranks(zero1_rank, 2, d, pairs, warmup, timeout=900.0, env={"TORCH_EXTENSIONS_DIR": ext})
    rows = []
    for key, label in (("deepspeed", "DeepSpeed ZeRO-1"), ("zero_redundancy", "DDP + ZeroRedundancyOptimizer")):
        st = [f"{r['state']['hai'] / 1e6:.2f}/{r['state'][key] / 1e6:.2f}" for r in res]
        rows.append({"section": "zero1", "hai": "HAI ZeroAdamW", "peer": label,
                     "what": f"train step, dp=2; opt. state MB/rank HAI/peer {' '.join(st)}",
                     "hai_s": _summary(res[0]["times"]["hai"]), "peer_s": _summary(res[0]["times"][key]),
                     "check": f"params max |diff| {max(r['diff'][key] for r in res):.1e}"})
    return rows


# ---------------------------------------------------------------------------------------------- one process
def step_section(pairs: int, warmup: int) -> list[dict]:
    from overhead import PRESETS, measure

    rows = []
    for label, overrides in PRESETS.items():
        r = measure(overrides, steps=pairs, warmup=warmup)
        rows.append({"section": "step", "hai": "HAI Trainer.train_step", "peer": "plain PyTorch loop",
                     "what": f"train step, 1 process, {label} ({r['n_params'] / 1e6:.1f}M params; fwd/bwd, clip, "
                             f"AdamW, router bias)",
                     "hai_s": _summary(r["times"]["hai"]), "peer_s": _summary(r["times"]["plain"]),
                     "check": f"params max |diff| {r['param_diff']:.1e}"})
    return rows


# ---------------------------------------------------------------------------------------------- report
def format_table(rows: list[dict]) -> str:
    head = (f"{'HAI':<24} {'peer':<32} {'HAI ms (min-max)':>22} {'peer ms (min-max)':>22} {'HAI/peer':>8} "
            f"{'(p25-p75)':>13}  {'check':<28} what")
    out = [head, "-" * len(head)]
    for r in rows:
        h, p = r["hai_s"], r["peer_s"]
        cell = lambda s: f"{1e3 * s['median']:.1f} ({1e3 * s['min']:.1f}-{1e3 * s['max']:.1f})"  # noqa: E731
        ratios = [a / b for a, b in zip(h["xs"], p["xs"])]  # pair by pair: load shared by the two cancels
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        spread = f"({q[0]:.2f}-{q[2]:.2f})"
        out.append(f"{r['hai']:<24} {r['peer']:<32} {cell(h):>22} {cell(p):>22} {statistics.median(ratios):>8.3f} "
                   f"{spread:>13}  "
                   f"{r['check']:<28} {r['what']}")
    return "\n".join(out)


SECTIONS = {"pipeline": pipeline_section, "zero1": zero1_section, "step": step_section}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=15, help="timed A/B pairs per comparison (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--max-load", type=float, default=None, help="wait for a 1-minute load average below this")
    ap.add_argument("--wait", type=float, default=300.0, help="seconds to wait for --max-load at most")
    args = ap.parse_args(argv)
    ensure_token_file(compose(PIPELINE_MODEL).data)  # build the default corpus once, before forking
    rows, loads = [], []
    for name in args.only.split(","):
        before = wait_quiet(args.max_load, args.wait)
        rows += SECTIONS[name](args.pairs, args.warmup)
        loads.append(f"{name} {before:.2f}->{_load():.2f}")
    print(f"medians over {args.pairs} alternating pairs after {args.warmup} warm-up pairs; {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; 1-min load average before->after: "
          + ", ".join(loads))
    print(format_table(rows))


if __name__ == "__main__":
    main()
