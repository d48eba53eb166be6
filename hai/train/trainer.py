"""The training loop: one code path from a single CPU process to the production layout.

``train(cfg)`` validates the whole configuration and the data before any process group exists, initializes the
process group when the world is larger than one (it expects to run under torchrun; ``hai train`` starts torchrun
itself), applies parallelism to the single-device model (``hai.parallel.parallelize``), and runs AdamW (ZeRO-1) with
warmup + cosine LR, clipping, aux-loss-free bias updates over the data-parallel group, and rank-0 metrics.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import resource
import sys
import time
import traceback
from dataclasses import asdict

import torch
import torch.distributed as dist

from hai.plan.accounting import train_flops_per_token
from hai.config import Config, ConfigError
from hai.config.compose import to_yaml
from hai.data import Dataset, Sampler, TokenFile, ensure_token_file, open_dataset
from hai.data.chat_prepare import ensure_chat_file
from hai.model import Router, build_model, materialize, param_dtype
from hai.model.batch import target_counts
from hai.model.sequence import DocumentSpec
from hai.parallel.parallelize import parallelize
from hai.parallel.topology import Topology
from hai.parallel.zero import ZeroAdamW, ZeroGroups
from hai.kernels import check_fp8_device, to_device
from hai.model.layers import compile_elementwise
from hai.train import hang, preempt
from hai.train.operations import RunOps

__all__ = ["train", "Trainer", "lr_at", "init_distributed"]


def lr_at(step: int, cfg) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at train.steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def init_distributed(topo: Topology, timeout_s: float = 600.0):
    """Join the torchrun world (if the topology has more than one rank) and build the device meshes; a collective
    that does not complete within ``timeout_s`` (``train.collective_timeout_s``) fails instead of waiting forever."""
    if topo.world_size == 1:
        return None
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != topo.world_size:
        raise ConfigError(f"this process runs in a world of {env_world} rank(s) (WORLD_SIZE) but the topology needs "
                          f"{topo.world_size} (pp={topo.pp} x dp={topo.dp} x cp={topo.cp} x tp={topo.tp}): start it "
                          f"with `hai train` or `hai launch`, which run torchrun with the right --nproc-per-node")
    if not dist.is_initialized():
        bind = {}
        if topo.device == "cuda":  # bound to this GPU: NCCL creates its communicators now, not inside the first P2P
            bind["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(bind["device_id"])
        dist.init_process_group(backend=topo.backend, timeout=datetime.timedelta(seconds=timeout_s), **bind)
    return topo.build_meshes()


def _group(mesh, axis: str):
    return None if mesh is None else mesh[axis].get_group()


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, mesh, data: Dataset | TokenFile):
        self.cfg, self.topo, self.mesh = cfg, topo, mesh
        self.rank = dist.get_rank() if mesh is not None else 0
        self.coords = topo.coords(self.rank)
        self.device = torch.device("cuda", torch.cuda.current_device()) if topo.device == "cuda" else \
            torch.device("cpu")
        if cfg.model.precision == "fp8":
            check_fp8_device(self.device)  # capability >= 8.9, or a message naming the GPU and model.precision=bf16
        compile_elementwise(cfg.train.compile)
        t = cfg.train
        self.n_micro = cfg.n_micro_batches
        # the data-parallel sums (ZeRO-1, losses, router loads) run over dp x cp: the CP ranks hold the other
        # positions of the same sequences (each its share of the loss), so their gradients add like the dp ranks'
        self.dp_group, self.pp_group = _group(mesh, "dp_cp"), _group(mesh, "pp")
        self.tp_group = _group(mesh, "tp") if topo.tp > 1 else None
        # per-rank construction: the architecture on meta, this rank's layout, then only its share materialized
        self.model = build_model(cfg.model, device="meta", recompute=t.recompute)
        self.placement = parallelize(self.model, topo, cfg, mesh, self.rank)
        materialize(self.model, self.device, param_dtype(cfg.model), t.seed, cfg.model.init_std)
        self.imported = None
        if cfg.model.init_from:  # released weights: each rank reads the tensors (and experts) it holds
            from hai.model.hf import hf_dir, load_into

            self.imported = load_into(self.model, cfg.model, hf_dir(cfg.model.init_from))
        self.model.set_aux_grad_scale(1.0 / self.n_micro)
        self._ep_clocks = [m.dispatcher.links for m in self.model.moe_layers()
                           if hasattr(m.dispatcher, "links") and dist.get_backend(m.dispatcher.group) == "gloo"]
        self.pipeline = self._pipeline()
        groups = ZeroGroups(self.dp_group, _group(mesh, "edp"), self.tp_group,
                            (self.dp_group, self.pp_group, self.tp_group), topo.dp)
        self.zero_groups = groups
        self.optimizer = ZeroAdamW(self.model.named_parameters(), t, groups, self.placement)
        if isinstance(data, Dataset):  # training windows, and the held-out split when there is one
            self.sampler = Sampler(data.train, t.seq_len, t.global_batch_size, t.seed)
            self.val_sampler = Sampler(data.val, t.seq_len, t.global_batch_size, t.seed) \
                if data.val is not None and t.eval_every else None
        else:  # one token file, all of its windows (no held-out split)
            self.sampler, self.val_sampler = Sampler(data, t.seq_len, t.global_batch_size, t.seed), None
        # chat (SFT) data: windows carry target flags; the loss is per target token of the global batch
        self.masked = data.loss_mask if isinstance(data, Dataset) else data.mask is not None
        self.model.doc_spec = _doc_spec(cfg, data)
        self.flops_per_token = train_flops_per_token(cfg.model, t.seq_len)
        self.step = 0
        self.run_id: str | None = None  # the metrics/wandb run this training continues (from a checkpoint)
        self.ops = RunOps(self)  # preemption, stragglers, profiles (hai.train.operations)

    def _pipeline(self):
        if self.topo.pp == 1:
            return None
        from hai.pipeline.executor import PipelineExecutor

        return PipelineExecutor(self.model, self.placement, self.topo, self.cfg, self.pp_group, self.device)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        """bf16 autocast for bf16 and fp8 models (under fp8 the FP8 GEMMs turn it off inside; embedding, head, norms,
        router and the attention softmax compute in the precision V3 states: bf16 weights, fp32 reductions)."""
        if self.cfg.model.precision in ("bf16", "fp8"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate gradients of the mean loss over micro-batches; returns [main_sum, mtp_sum] (detached, float64,
        on the device: read with the step's other metrics in one transfer)."""
        if self.pipeline is not None:
            # each stage's gradient reduce-scatter starts once the schedule has run its last gradient work
            self.optimizer.arm_grad_sync(by_hooks=False)
            self.pipeline.on_grads_final = self.optimizer.grads_final
            with self._autocast():
                sums = self.pipeline.run([mb.to(self.device) for mb in micro_batches])
            dist.all_reduce(sums, group=self.pp_group)  # the losses were computed at the last stage(s)
            return sums
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, tokens in enumerate(micro_batches):
            with self._autocast():
                out = self.model(tokens.to(self.device))
            if i == len(micro_batches) - 1:  # the gradient reduce-scatter overlaps this backward, bucket by bucket
                self.optimizer.arm_grad_sync()
            (out.loss / self.n_micro).backward()
            sums += torch.stack([out.main_loss.double(), out.mtp_loss.double()])
        return sums

    def set_target_norm(self, micro_batches: list[torch.Tensor], batches: int = 1) -> torch.Tensor | None:
        """Chat data: the target counts (main loss, each MTP depth) of ``batches`` global batches, from this rank's
        micro-batches with one all-reduce over the data-parallel ranks; the model divides each micro-batch's sum over
        its targets by the count per micro-batch, so the losses (summed over micro-batches, averaged over dp like the
        gradients) are the per-token mean of the global batch: every target token weighs the same, however its
        conversation is packed or long. Plain data: None (every position a target, the per-micro-batch mean is
        already per token)."""
        if not self.masked:
            self.model.target_norm = None
            return None
        counts = target_counts(micro_batches, self.cfg.model.mtp_depth)
        if self.dp_group is not None:
            dist.all_reduce(counts, group=self.dp_group)
        counts = counts / self.topo.cp  # the CP ranks of a data-parallel rank count the same windows
        self.model.target_norm = (counts.clamp_min(1) / (batches * self.n_micro * self.topo.dp)).float()
        return counts

    def update_router_biases(self, apply: bool) -> torch.Tensor:
        """Aux-loss-free balancing: loads summed over the data-parallel group (and over a router's pipeline copies),
        then b += gamma*sign(mean - load). Returns (mean over layers of max load / mean load - 1, largest bias spread)
        as a float64 device tensor (no host read)."""
        routers = self.model.routers()
        if not routers:
            return torch.zeros(2, dtype=torch.float64, device=self.device)
        for name, m in self.model.named_modules():  # a router held by two pipeline ranks saw half the tokens on each
            group = self.placement.copy_group(f"{name}.weight") if isinstance(m, Router) else None
            if group is not None:
                dist.all_reduce(m.load, group=group)
        loads = torch.stack([r.load for r in routers])  # (layers, E) this rank's counts
        for group in (self.dp_group, self.tp_group):  # every rank of the stage routes its own tokens
            if group is not None:
                dist.all_reduce(loads, group=group)
        gamma = self.cfg.model.bias_update_speed
        for r, load in zip(routers, loads):
            if gamma > 0 and apply:
                r.update_bias(load, gamma)
            r.load.zero_()
        mean = loads.mean(-1).clamp_min(1e-9)
        violation = (loads.max(-1).values / mean - 1).mean()
        spread = torch.stack([r.bias.max() - r.bias.min() for r in routers]).max()
        return torch.stack([violation, spread]).double()

    def _ep_blocked_s(self) -> float | None:
        """Host seconds this rank spent blocked in expert-parallel collectives since the last call. None without EP,
        and on NCCL, whose collectives do not block the host (the number would only be launch time)."""
        if not self._ep_clocks:
            return None
        total = sum(c.blocked_s for c in self._ep_clocks)
        for c in self._ep_clocks:
            c.blocked_s = 0.0
        return total

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.cfg.train)
        mbs = [to_device(mb, self.device) for mb in self.sampler.micro_batches(
            self.step, self.coords["dp"], self.topo.dp, self.cfg.train.micro_batch_size)]
        t_data = time.perf_counter() - t0
        targets = self.set_target_norm(mbs)  # chat data: the global batch's target count (one all-reduce)
        sums = self.forward_backward(mbs)
        t1 = time.perf_counter()
        ep_blocked = self._ep_blocked_s()
        result = self.optimizer.step(lr)  # one host sync: the global gradient norm (clip, skip)
        self.optimizer.zero_grad()
        balance = self.update_router_biases(apply=not result.skipped)
        if self.dp_group is not None:
            dist.all_reduce(sums, group=self.dp_group)
        stop = self.ops.vote()  # MAX over ranks of "a preemption signal arrived": read with the metrics
        extra = [] if targets is None else [targets[:1]]
        main_sum, mtp_sum, violation, spread, stop, *n_targets = torch.cat([sums, balance, stop, *extra]).tolist()
        self.ops.read_vote(stop)
        t2 = time.perf_counter()
        n = self.n_micro * self.topo.dp
        self.step += 1
        rec = {"step": self.step, "loss": main_sum / n, "mtp_loss": mtp_sum / n, "lr": lr,
               "grad_norm": result.grad_norm, "skipped": result.skipped, "forward_backward_s": t1 - t0,
               "optimizer_s": t2 - t1, "data_wait_s": t_data, "expert_load_max_violation": violation,
               "router_bias_spread": spread}
        if n_targets:  # chat data: the loss is the mean over these target tokens of the global batch
            rec["target_tokens"] = n_targets[0]
        if ep_blocked is not None:  # host time blocked in EP all-to-alls: the exposed comm on gloo
            rec["ep_comm_blocked_s"] = ep_blocked
        if self.pipeline is not None:  # this rank's idle share of the pipelined forward/backward
            busy = sum(e.end - e.start for e in self.pipeline.timeline)
            rec["pipeline_bubble_fraction"] = max(0.0, 1.0 - busy / (t1 - t0))
        return rec

    def evaluate(self) -> dict:
        """Mean main loss (and MTP loss) over ``train.eval_batches`` global batches of the held-out split, under this
        run's layout (pipeline stages, expert shards, dp slices): the same value a single process computes from the
        same weights. The same batches every time, so evaluations are comparable along the run. Chat data: the
        masked loss, the mean over the target tokens of all ``train.eval_batches`` batches (as in training)."""
        t = self.cfg.train
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = [to_device(mb, self.device) for i in range(t.eval_batches)
                   for mb in self.val_sampler.micro_batches(i, self.coords["dp"], self.topo.dp, t.micro_batch_size)]
        self.set_target_norm(batches, t.eval_batches)
        self.model.eval()  # routers do not count eval tokens; no sequence-wise aux loss
        try:
            with torch.no_grad(), self._autocast():
                for tokens in batches:
                    if self.pipeline is not None:
                        sums += self.pipeline.evaluate(tokens)
                    else:
                        out = self.model(tokens)
                        sums += torch.stack([out.main_loss.double(), out.mtp_loss.double()])
        finally:
            self.model.train()
        if self.pipeline is not None:
            dist.all_reduce(sums, group=self.pp_group)
        if self.dp_group is not None:
            dist.all_reduce(sums, group=self.dp_group)
        main, mtp = (sums / (t.eval_batches * self.n_micro * self.topo.dp)).tolist()
        return {"val_loss": main, "val_mtp_loss": mtp, "val_ppl": math.exp(min(main, 80.0))}

    def _throughput(self, rec: dict, step_time: float) -> dict:
        t, c = self.cfg.train, self.cfg.cluster
        tokens_per_s = t.global_batch_size * t.seq_len / step_time
        per_device = tokens_per_s / self.topo.world_size
        tflops = per_device * self.flops_per_token / 1e12  # every computed position, padding and prompts included
        if "target_tokens" in rec:  # chat data: the tokens the loss learned from
            rec = {**rec, "target_tokens_per_s": rec["target_tokens"] / step_time}
        return {**rec, "step_time_s": step_time, "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
                "tflops_per_device": tflops, "mfu": tflops / c.peak_tflops_bf16,
                "memory_bytes": _memory_bytes(self.device), "optimizer_state_bytes": self.optimizer.state_bytes()}

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg = self.cfg
        resumed = self.resume()
        sink = None
        if self.rank == 0:
            from hai.train.metrics import MetricsSink

            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            sink = MetricsSink(cfg.out_dir, asdict(cfg), cfg.wandb, cfg.train.steps, self.step, cfg.train.progress,
                               run_id=self.run_id)
            self.run_id = sink.run_id  # saved with every checkpoint (rank 0 writes the metadata)
            if resumed is not None:
                sink.event("resumed", **resumed)
        first = last = val = None
        speed: list[tuple[float, float]] = []  # (tokens/s, mfu) per step
        t_start = time.perf_counter()
        t = cfg.train
        self.ops.start()
        try:
            while self.step < t.steps:
                self.ops.begin_step(self.step + 1)  # profile window
                t0 = time.perf_counter()
                rec = self.train_step()
                rec = self._throughput(rec, time.perf_counter() - t0)
                rec.update(self.ops.end_step(rec, sink))  # exposed comm; the slowest rank every train.log_every steps
                if self.val_sampler is not None and (self.step % t.eval_every == 0 or self.step == t.steps):
                    t1 = time.perf_counter()
                    val = self.evaluate()
                    rec.update(val, eval_s=time.perf_counter() - t1)
                first = first if first is not None else rec["loss"]
                last = rec["loss"]
                speed.append((rec["tokens_per_s"], rec["mfu"]))
                if sink is not None:
                    if rec["skipped"]:
                        sink.event("skipped_step", step=rec["step"], grad_norm=str(rec["grad_norm"]))
                    sink.log(rec)
                saved = bool(t.save_every) and (self.step % t.save_every == 0 or self.step == t.steps)
                if saved:
                    self.save_checkpoint(sink)  # every save_every steps and at the end
                if self.ops.after_step(sink, saved):  # preempted: this step's checkpoint is saved, stop
                    break
            self.ops.finish(sink)  # an asynchronous checkpoint write still in flight completes
            if self.pipeline is not None:  # the last step's executed schedule: trace.json + schedule.png
                self.pipeline.write_timeline(cfg.out_dir if self.rank == 0 else None)
        finally:
            steady = speed[1:] or speed  # the first step pays start-up (allocations, Triton/autotune, P2P setup)
            summary = {"first_loss": first, "final_loss": last, "steps": self.step, "steps_run": len(speed),
                       "wall_time_s": time.perf_counter() - t_start,
                       "val_loss": None if val is None else val["val_loss"],
                       "val_ppl": None if val is None else val["val_ppl"],
                       "tokens_per_s": sum(x for x, _ in steady) / len(steady) if steady else None,
                       "mfu": sum(m for _, m in steady) / len(steady) if steady else None, **self.ops.close()}
            if sink is not None:
                summary.update(sink.paths())
                sink.close(summary)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> dict | None:
        """Load the checkpoint ``resume`` names (none | auto | PATH): model, ZeRO-1 state (any dp size), step, RNG."""
        from hai.checkpoint.state import load_checkpoint, resume_path

        path = resume_path(self.cfg)
        if path is None:
            return None
        if self.cfg.train.finetune:
            path, weights_only = self._finetune_source(path)
        t0 = time.perf_counter()
        run = self.run_state()
        meta = load_checkpoint(run, path, self.cfg.model)
        self.step, self.run_id = run.progress.step, run.progress.run_id
        if self.cfg.train.finetune and weights_only:  # a new run from these weights: fresh AdamW, step 0
            self.optimizer = ZeroAdamW(self.model.named_parameters(), self.cfg.train, self.zero_groups, self.placement)
            self.step, self.run_id = 0, None
            return {"step": 0, "path": path, "weights_only": True, "seconds": time.perf_counter() - t0}
        saved_len = (meta.get("train") or {}).get("seq_len", self.cfg.train.seq_len)
        if saved_len != self.cfg.train.seq_len:  # a new phase (context extension): its own steps and data from 0
            self.step = 0
        return {"step": self.step, "path": path, "saved_dp": meta.get("dp"),
                "saved_world_size": meta.get("world_size"), "seconds": time.perf_counter() - t0}

    def _finetune_source(self, path: str) -> tuple[str, bool]:
        """``train.finetune``: a checkpoint of another run gives its weights only (its optimizer state and step are
        dropped: a new run, e.g. SFT from pre-training); this run's own newest checkpoint, when it has one, is
        resumed fully (a restarted fine-tuning job continues with the same command line)."""
        import dataclasses

        from hai.checkpoint.files import checkpoint_root
        from hai.checkpoint.state import resume_path

        root = os.path.abspath(checkpoint_root(self.cfg.out_dir))
        if os.path.abspath(path).startswith(root + os.sep):
            return path, False
        own = resume_path(dataclasses.replace(self.cfg, resume="auto"))
        return (own, False) if own is not None else (path, True)

    def run_state(self):
        """The checkpoint's view of this rank: model, optimizer shard, progress and where its shards sit."""
        from hai.checkpoint.state import Progress, RunState, ShardLayout

        layout = ShardLayout(self.model, self.cfg.model.n_routed_experts, self.topo.ep, self.coords, self.placement)
        return RunState(self.model, self.optimizer, Progress(self.step, self.run_id), layout, self.topo, self.device)

    def save_checkpoint(self, sink=None) -> str:
        """Collective: write OUT_DIR/checkpoints/step_N atomically (keeps the last train.keep_last); with
        train.async_save the step's state is staged and written in the background (hai.checkpoint.async_save)."""
        from hai.checkpoint.state import save_checkpoint

        t0 = time.perf_counter()
        t = self.cfg.train
        config = {"model": asdict(self.cfg.model), "train": asdict(t)}
        if self.ops.checkpointer is not None:
            return self.ops.save_async(self.run_state(), config, sink)
        path = save_checkpoint(self.run_state(), self.cfg.out_dir, t.keep_last, config)
        if sink is not None:
            sink.event("checkpoint", step=self.step, path=path, seconds=time.perf_counter() - t0)
        return path


def _doc_spec(cfg: Config, data) -> DocumentSpec | None:
    """``data.document_mask`` / ``data.reset_positions``: the documents end with the data's EOS id."""
    d = cfg.data
    if not (d.document_mask or d.reset_positions):
        return None
    if data.eos_id < 0:
        raise ConfigError("data.document_mask / data.reset_positions need the documents' EOS id, which this token "
                          "file does not record: re-create it with `hai prepare`, or set both to false")
    marked = data.loss_mask if isinstance(data, Dataset) else data.mask is not None  # chat windows mark starts
    return DocumentSpec(data.eos_id, d.document_mask, d.reset_positions, marked)


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def load_data(cfg: Config) -> Dataset:
    """The run's training and held-out windows (``data.mixture``, else ``data.path`` or the default corpus; with
    ``data.format=chat`` the default is the synthetic chat corpus, prepared for train.seq_len)."""
    if cfg.data.mixture:
        path = None
    elif cfg.data.format == "chat":
        path = ensure_chat_file(cfg.data, cfg.train.seq_len)
    else:
        path = ensure_token_file(cfg.data)
    return open_dataset(cfg.data, cfg.train.seq_len, cfg.train.seed, path=path)


def with_epochs(cfg: Config, data: Dataset) -> Config:
    """``train.epochs > 0``: ``train.steps`` = the steps that draw that many passes over the training windows."""
    t = cfg.train
    if not t.epochs:
        return cfg
    import dataclasses

    steps = max(1, math.ceil(t.epochs * data.train.n_windows / t.global_batch_size))
    return dataclasses.replace(cfg, train=dataclasses.replace(t, steps=steps))


def train(cfg: Config) -> dict:
    """Run training as configured (under torchrun when the topology has several ranks)."""
    preempt.install()  # from here on SIGTERM/SIGUSR1/SIGINT mean "save and stop" (hai.train.preempt)
    topo = Topology.from_config(cfg)
    data = load_data(cfg)
    cfg = with_epochs(cfg, data)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the data {data.sources[0][1][0]!r} uses a vocabulary of {data.vocab_size} but "
                          f"model.vocab_size={cfg.model.vocab_size}: set model.vocab_size >= {data.vocab_size}")
    hang.enable_flight_recorder()  # collectives recorded for hang reports (before the process group exists)
    mesh = init_distributed(topo, hang.pg_timeout_s(cfg.train.collective_timeout_s))
    if mesh is None:
        return Trainer(cfg, topo, mesh, data).fit()
    watch = hang.HangWatch(cfg.out_dir, cfg.train.collective_timeout_s).start()  # OUT_DIR/hang/ if one is stuck
    try:
        summary = Trainer(cfg, topo, mesh, data).fit()
    except BaseException:  # noqa: BLE001 - any failure on this rank ends the job
        _fail_fast()
    watch.stop()
    dist.barrier()  # success only: every rank is here; gloo aborts at interpreter exit without a clean shutdown
    dist.destroy_process_group()
    return summary


def _peer_gone(err: BaseException | None) -> bool:
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        m in text for m in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _fail_fast() -> None:
    """This rank failed: print its traceback once and exit non-zero now. No barrier and no process-group teardown
    (both may wait on collectives the other ranks will never finish): torchrun sees the exit and stops the other
    workers, so the job ends within its monitoring interval instead of the backend's collective timeout."""
    rank = os.environ.get("RANK", "?")
    err = sys.exc_info()[1]
    if _peer_gone(err):  # a consequence of another rank's failure: one line, that rank's traceback is the story
        print(f"hai train: rank {rank} stopped: a peer rank failed ({type(err).__name__})", file=sys.stderr)
    else:
        print(f"hai train: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
