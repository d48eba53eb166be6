"""Typed configuration schema for HAI.

Every component owns its config dataclass; Hydra YAML under ``configs/`` only fills this schema. Each dataclass
validates itself in ``__post_init__`` (OmegaConf calls it when a structured config is converted to an object), so a
bad value fails with a ``ValueError`` that names the key, the value and the fix.

Cross-component checks (world size against the parallel layout, experts against ep, ...) live in
``hai.parallel.topology`` because they need several of these trees at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "DataConfig",
    "ClusterConfig",
    "ParallelConfig",
    "WandbConfig",
    "LauncherConfig",
    "GenerateConfig",
    "ConvertConfig",
    "ProfileConfig",
    "Config",
    "ConfigError",
    "mixture_item",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and the fix."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, f"{key}={value!r} is not one of {list(choices)}: set {key} to one of them")


def _positive(key: str, value: Any) -> None:
    _require(value is not None and value > 0, f"{key}={value!r} must be > 0")


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters (names follow DeepSeek's released configs)."""

    name: str = "tiny"
    vocab_size: int = 320
    hidden_size: int = 64
    num_layers: int = 4
    first_k_dense_replace: int = 1  # the first k layers use a dense SwiGLU MLP
    intermediate_size: int = 128  # dense MLP width
    rms_norm_eps: float = 1e-6
    # --- MLA ---
    num_heads: int = 4
    q_lora_rank: Optional[int] = 32  # null: no query compression (DeepSeek-V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    attention: str = "reference"  # the training attention core: reference (flash-style loop) | sdpa (fused kernels)
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # longest sequence the model accepts (training and generation)
    # YaRN RoPE scaling (DeepSeek-V2/V3's released configs): off when rope_factor == 1
    rope_factor: float = 1.0
    rope_original_max_seq_len: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    # --- DeepSeekMoE ---
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # top-k
    moe_intermediate_size: int = 32
    score_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    norm_topk_prob: bool = True  # normalize the chosen k gates (V3: yes)
    route_scale: float = 1.0
    n_group: int = 1  # expert groups (= nodes of an EP group for node-limited routing)
    topk_group: int = 1  # groups kept per token (= node limit M)
    group_scoring: str = "topk_sum"  # a group's score: topk_sum (its top k/topk_group) | sum_top2 (V3) | max (V2)
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing (0 disables)
    seq_aux_alpha: float = 0.0001  # sequence-wise balance loss weight
    # --- MTP ---
    mtp_depth: int = 1
    mtp_lambda: float = 0.3
    mtp_hidden: str = "pre_norm"  # the main model's state MTP depth 1 takes: pre_norm | post_norm (after model.norm)
    mtp_concat: str = "hidden_first"  # the projection's input: hidden_first [h; e] | embed_first [e; h] (release)
    init_from: Optional[str] = None  # hf:DIR (a Hugging Face checkpoint: config.json + safetensors)
    # --- numerics / init ---
    init_std: float = 0.006
    precision: str = "fp32"  # fp32 | bf16 | fp8

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "intermediate_size", "num_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len"):
            _positive(f"model.{key}", getattr(self, key))
        _require(self.q_lora_rank is None or self.q_lora_rank > 0,
                 f"model.q_lora_rank={self.q_lora_rank} must be null (no query compression) or > 0")
        _require(self.qk_rope_head_dim % 2 == 0,
                 f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        _require(0 <= self.first_k_dense_replace <= self.num_layers,
                 f"model.first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_layers="
                 f"{self.num_layers}]")
        _choice("model.score_func", self.score_func, ("sigmoid", "softmax"))
        _choice("model.precision", self.precision, ("fp32", "bf16", "fp8"))
        _choice("model.attention", self.attention, ("reference", "sdpa"))
        _require(self.n_routed_experts >= 0 and self.n_shared_experts >= 0,
                 "model.n_routed_experts and model.n_shared_experts must be >= 0")
        if self.n_routed_experts > 0:
            _positive("model.moe_intermediate_size", self.moe_intermediate_size)
            _require(1 <= self.n_activated_experts <= self.n_routed_experts,
                     f"model.n_activated_experts={self.n_activated_experts} must lie in [1, n_routed_experts="
                     f"{self.n_routed_experts}]")
            _require(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                     f"model.n_group={self.n_group} must divide model.n_routed_experts={self.n_routed_experts}: "
                     f"choose n_group among the divisors of the expert count")
            _require(1 <= self.topk_group <= self.n_group,
                     f"model.topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]")
            _choice("model.group_scoring", self.group_scoring, ("topk_sum", "sum_top2", "max"))
            per_group = self.n_routed_experts // self.n_group
            if self.group_scoring == "topk_sum":
                _require(self.n_activated_experts % self.topk_group == 0,
                         f"model.n_activated_experts={self.n_activated_experts} must be divisible by "
                         f"model.topk_group={self.topk_group} (each kept group contributes k/topk_group experts to "
                         f"its score): or set model.group_scoring=sum_top2 / max")
                _require(self.n_activated_experts // self.topk_group <= per_group,
                         f"model.n_activated_experts/topk_group={self.n_activated_experts // self.topk_group} "
                         f"exceeds the {per_group} experts per group (n_routed_experts={self.n_routed_experts} / "
                         f"n_group={self.n_group}): raise topk_group or lower n_group")
            if self.group_scoring == "sum_top2" and self.n_group > 1:
                _require(per_group >= 2, f"model.group_scoring=sum_top2 needs >= 2 experts per group, got "
                                         f"{per_group}: lower model.n_group or use group_scoring=max")
            _require(self.topk_group * per_group >= self.n_activated_experts,
                     f"model.topk_group={self.topk_group} groups of {per_group} experts cannot hold "
                     f"n_activated_experts={self.n_activated_experts}: raise topk_group")
        _require(self.mtp_depth >= 0, f"model.mtp_depth={self.mtp_depth} must be >= 0")
        _choice("model.mtp_hidden", self.mtp_hidden, ("pre_norm", "post_norm"))
        _choice("model.mtp_concat", self.mtp_concat, ("hidden_first", "embed_first"))
        _require(self.rope_factor >= 1, f"model.rope_factor={self.rope_factor} must be >= 1 (1: no YaRN scaling)")
        _require(self.init_from is None or self.init_from.startswith("hf:"),
                 f"model.init_from={self.init_from!r} must be hf:DIR (a Hugging Face checkpoint directory)")
        _require(self.bias_update_speed >= 0, f"model.bias_update_speed={self.bias_update_speed} must be >= 0")
        _require(self.seq_aux_alpha >= 0, f"model.seq_aux_alpha={self.seq_aux_alpha} must be >= 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0


@dataclass
class DataConfig:
    """Where tokens come from. ``path: null`` builds (once, cached) a token file from the Python stdlib's sources.

    ``path`` is a token file, a directory of token-file shards or a glob of them; ``mixture`` lists sources as
    ``"WEIGHT:PATH"`` (e.g. ``[0.3:/data/code,0.7:/data/web]``) and replaces ``path``. The held-out split is
    ``val_path`` (same forms) or, without one, the last ``val_fraction`` of every source's windows."""

    path: Optional[str] = None
    mixture: List[str] = field(default_factory=list)  # "WEIGHT:PATH" per source; weights are normalized
    val_path: Optional[str] = None
    val_fraction: float = 0.01  # held out from the end of every source when val_path is unset (0: no split)
    source: Optional[str] = None  # for `hai prepare`: a file, directory or glob of text/jsonl/parquet files
    tokenizer: str = "byte"  # byte | path to a Hugging Face tokenizer.json
    text_field: str = "text"  # the document field of jsonl records and parquet columns
    workers: int = 0  # `hai prepare` worker processes; 0: one per CPU core
    shard_mb: int = 1024  # `hai prepare` writes shards of at most this many MB (when data.path is a directory)
    on_error: str = "fail"  # `hai prepare` on a corrupt or unreadable input file: fail | skip (reported by name)
    max_bytes: int = 4_000_000  # cap on text read by `hai prepare` from the default source
    document_mask: bool = False  # a position attends only within its document (EOS ends one); V3 pre-training: off
    reset_positions: bool = False  # RoPE positions restart at 0 at each document start
    format: str = "text"  # `hai prepare`: text (documents) | chat (conversations with a loss mask: hai.data.chat)
    pack: bool = True  # chat: conversations packed into windows of train.seq_len+1 (false: one per window, padded)
    truncate: bool = False  # chat: a conversation longer than a window is cut to it (false: a bad row, data.on_error)
    cache_dir: Optional[str] = None  # default: ~/.cache/hai

    def __post_init__(self) -> None:
        _positive("data.max_bytes", self.max_bytes)
        _positive("data.shard_mb", self.shard_mb)
        _require(self.workers >= 0, f"data.workers={self.workers} must be >= 0 (0: one per CPU core)")
        _require(0 <= self.val_fraction < 1, f"data.val_fraction={self.val_fraction} must lie in [0, 1)")
        _choice("data.on_error", self.on_error, ("fail", "skip"))
        _choice("data.format", self.format, ("text", "chat"))
        for item in self.mixture:
            mixture_item(item)
        _require(not (self.mixture and self.path), f"data.mixture={list(self.mixture)} and data.path={self.path!r} "
                 f"are both set: the mixture lists every source, drop data.path (or the mixture)")


def mixture_item(item: str) -> tuple[float, str]:
    """Parse one ``data.mixture`` entry ``"WEIGHT:PATH"``."""
    weight, sep, path = str(item).partition(":")
    try:
        w = float(weight)
    except ValueError:
        w = -1.0
    _require(bool(sep) and bool(path) and w > 0, f"data.mixture entry {item!r} is not WEIGHT:PATH with a positive "
             f"weight: write e.g. data.mixture=[0.3:/data/code,0.7:/data/web]")
    return w, path


@dataclass
class ProfileConfig:
    """torch.profiler traces of a few steps (hai.train.profile): ``steps=[a,b]`` profiles steps a..b (1-based, as
    logged) on every rank; ``memory=true`` adds a CUDA memory snapshot (on CPU: allocations in the trace)."""

    steps: List[int] = field(default_factory=list)
    memory: bool = False

    def __post_init__(self) -> None:
        s = list(self.steps)
        _require(not s or (len(s) == 2 and 1 <= s[0] <= s[1]), f"train.profile.steps={s} must be [] or [FIRST,LAST] "
                 f"with 1 <= FIRST <= LAST (steps as logged), e.g. train.profile.steps=[10,12]")


@dataclass
class TrainConfig:
    name: str = "demo"
    steps: int = 200
    epochs: float = 0.0  # > 0: train.steps = ceil(epochs x training windows / global_batch_size) (SFT); 0: steps
    finetune: bool = False  # resume=PATH of another run: its weights only (step 0, new optimizer); hai.train.trainer
    seed: int = 1234
    seq_len: int = 64
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    bf16_moments: bool = False  # keep AdamW moments in bf16 (as V3 did)
    overlap_grad_reduce: bool = True  # reduce-scatter gradient buckets during the last backward (hai.parallel.zero)
    grad_bucket_elements: int = 40_000_000  # a ZeRO-1 gradient bucket closes once it holds this many elements
    # (whole parameters: it may exceed it by one parameter's size; Megatron's 40M); 0: one bucket per kind
    recompute: str = "none"  # none | v3 (DeepSeek-V3's activation recipe) | full (every block segment recomputed)
    compile: bool = False  # torch.compile the block's elementwise math (norms, SwiGLU, RoPE; hai.model.layers)
    collective_timeout_s: float = 600.0  # a collective stuck this long: every rank dumps OUT_DIR/hang/, the job ends
    preempt_grace_s: float = 60.0  # SIGTERM/SIGUSR1/SIGINT: finish the step, save, exit 0 within this (else killed)
    straggler_ratio: float = 1.5  # a rank this much slower than the median, persistently, is named in the log
    async_save: Optional[bool] = None  # checkpoint writes in the background; None: on with CUDA, off on CPU
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    save_every: int = 0  # 0: no periodic checkpoints
    keep_last: int = 2
    log_every: int = 1
    eval_every: int = 50  # validation loss every this many steps and at the end (0: never)
    eval_batches: int = 2  # global batches of the held-out split per evaluation (the same ones every time)
    progress: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "lr"):
            _positive(f"train.{key}", getattr(self, key))
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 f"train.global_batch_size={self.global_batch_size} is not divisible by train.micro_batch_size="
                 f"{self.micro_batch_size}: pick a micro batch that divides the global batch")
        _require(0 <= self.min_lr <= self.lr, f"train.min_lr={self.min_lr} must lie in [0, train.lr={self.lr}]")
        _require(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _require(self.epochs >= 0, f"train.epochs={self.epochs} must be >= 0 (0: train.steps decides)")
        _require(self.grad_bucket_elements >= 0, f"train.grad_bucket_elements={self.grad_bucket_elements} must be "
                 f">= 0 (0: one bucket per parameter kind)")
        _require(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        _require(self.save_every >= 0, f"train.save_every={self.save_every} must be >= 0 (0 disables)")
        _require(self.keep_last >= 1, f"train.keep_last={self.keep_last} must be >= 1")
        _require(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0 (0 disables)")
        _positive("train.eval_batches", self.eval_batches)
        _choice("train.recompute", self.recompute, ("none", "v3", "full"))
        _positive("train.collective_timeout_s", self.collective_timeout_s)
        _positive("train.preempt_grace_s", self.preempt_grace_s)
        _require(self.straggler_ratio > 1, f"train.straggler_ratio={self.straggler_ratio} must be > 1 (a rank's busy "
                 f"time over the median's), e.g. 1.5")


@dataclass
class ClusterConfig:
    """A cluster of identical nodes. ``local_cpu`` simulates nodes of ``gpus_per_node`` CPU processes."""

    name: str = "local_cpu"
    nodes: int = 1
    gpus_per_node: int = 1
    device: str = "cpu"  # cpu | cuda
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl | fake
    gpu_name: str = "cpu"
    peak_tflops_bf16: float = 0.1  # per device, dense; used for MFU
    peak_tflops_fp8: float = 0.1
    memory_gb: float = 24.0  # per device
    nvlink_gbps: float = 10.0  # intra-node, per device, GB/s (unidirectional)
    ib_gbps: float = 10.0  # inter-node, per device, GB/s

    def __post_init__(self) -> None:
        _positive("cluster.nodes", self.nodes)
        _positive("cluster.gpus_per_node", self.gpus_per_node)
        _choice("cluster.device", self.device, ("cpu", "cuda"))
        _choice("cluster.backend", self.backend, ("auto", "gloo", "nccl", "fake"))

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class ParallelConfig:
    name: str = "single"
    pp: int = 1
    dp: int = 1
    ep: int = 1
    schedule: str = "1f1b"  # 1f1b | zb1p | dualpipe | dualpipev
    micro_batches: int = 0  # pipeline micro-batches per step; 0: global_batch / (dp * micro_batch_size)
    node_limit: int = 0  # M: a token's routed experts lie on <= M nodes; 0: unlimited
    dispatch: str = "flat"  # flat | hierarchical
    fp8_dispatch: bool = False
    overlap: bool = True  # pp > 1: cut stages at the MoE all-to-alls; FB actions overlap one chunk's with the other's
    layout: str = ""  # pipeline stages: "" even split | auto (the planner balances) | e.g. "Et*3|t*4|...|t*3Lm"
    tp: int = 1  # tensor-slice model parallelism inside a node (attention heads, MLP columns, vocabulary)
    cp: int = 1  # context parallelism: the sequence in 2*cp zig-zag chunks, rank i holding chunks i and 2cp-1-i
    sequence_parallel: bool = False  # with tp > 1: norms, residuals and the MoE on sequence shards (needed with MoE)

    def __post_init__(self) -> None:
        for key in ("pp", "dp", "ep", "tp", "cp"):
            _positive(f"parallel.{key}", getattr(self, key))
        _choice("parallel.schedule", self.schedule, ("1f1b", "zb1p", "dualpipe", "dualpipev"))
        _choice("parallel.dispatch", self.dispatch, ("flat", "hierarchical"))
        _require(self.micro_batches >= 0, f"parallel.micro_batches={self.micro_batches} must be >= 0")
        _require(self.node_limit >= 0, f"parallel.node_limit={self.node_limit} must be >= 0 (0: unlimited)")

    @property
    def edp(self) -> int:
        return self.dp * self.cp * self.tp // self.ep


@dataclass
class GenerateConfig:
    """`hai generate`: the model comes from ``resume`` (a HAI checkpoint, any layout) or ``model.init_from``."""

    prompt: str = "def "
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    speculative: bool = False  # draft with the MTP module, verify with the main model
    compare: bool = True  # with speculative: also time plain decoding, report both
    chat: bool = False  # the prompt is a user turn rendered with the tokenizer's chat template; stop at its EOS

    def __post_init__(self) -> None:
        _positive("generate.max_new_tokens", self.max_new_tokens)
        _require(self.temperature >= 0, f"generate.temperature={self.temperature} must be >= 0 (0: greedy)")
        _require(0 < self.top_p <= 1, f"generate.top_p={self.top_p} must lie in (0, 1]")


@dataclass
class ConvertConfig:
    """`hai convert`: ``src`` a HAI checkpoint directory (-> Hugging Face at ``dst``) or hf:DIR (-> a HAI
    checkpoint under ``dst``)."""

    src: Optional[str] = None
    dst: Optional[str] = None
    max_shard_gb: float = 4.0


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "hai"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _choice("wandb.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class LauncherConfig:
    """How `hai launch` starts a job: always torchrun running `hai train` in the end."""

    kind: str = "local"  # local | torchrun | slurm
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = "127.0.0.1:29500"
    max_restarts: int = 0
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"
    job_name: str = "hai"
    signal_lead_s: int = 300  # Slurm: SIGUSR1 this long before the time limit (save, then requeue); 0: none
    requeue: bool = True  # Slurm: --requeue, and a job stopped by that signal requeues itself (resume=auto)

    def __post_init__(self) -> None:
        _choice("launcher.kind", self.kind, ("local", "torchrun", "slurm"))
        _require(self.max_restarts >= 0, f"launcher.max_restarts={self.max_restarts} must be >= 0")
        _require(0 <= self.signal_lead_s <= 65535, f"launcher.signal_lead_s={self.signal_lead_s} must lie in "
                 f"[0, 65535] seconds (Slurm's --signal limit; 0: no early signal)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    out_dir: str = "runs/${train.name}"
    resume: str = "none"  # none | auto | PATH to a checkpoint directory
    output: str = "text"  # text | json (for `account` and `plan`)
    calibration: Optional[str] = None  # `hai plan`: kernel/link throughput JSON (hai/plan/calibration.py); none: H800's
    nproc: int = 0  # processes per node for `hai launch`/`hai train`; 0: from the cluster config
    dry_run: bool = False

    def __post_init__(self) -> None:
        _choice("output", self.output, ("text", "json"))
        _require(self.nproc >= 0, f"nproc={self.nproc} must be >= 0")

    @property
    def n_micro_batches(self) -> int:
        """Micro-batches per step on each data-parallel rank (the pipeline's micro-batches): global_batch_size /
        (dp x micro_batch_size). ``parallel.micro_batches``, when set, must equal it (checked with the topology)."""
        return self.train.global_batch_size // (self.parallel.dp * self.train.micro_batch_size)
