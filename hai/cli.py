"""The `hai` command: `hai train|launch|plan|account|prepare [key=value | group=option ...]`."""

from __future__ import annotations

import json
import os
import sys

from hai.config import ConfigError
from hai.config.compose import compose

__all__ = ["main"]

USAGE = """usage: hai COMMAND [overrides...]

commands:
  train     train a model (starts torchrun itself when the layout has several ranks)
  launch    start a job through torchrun (local, multi-node) or Slurm
  plan      validate a parallel layout and predict memory, communication and step time
  account   parameters, activated parameters, KV cache and FLOPs of a model (JSON)
  prepare   tokenize text / jsonl / parquet files into a token file or shards (data.source=... data.path=...)
  generate  sample from a checkpoint (resume=PATH|auto) or model.init_from=hf:DIR (generate.prompt=...,
            generate.speculative=true drafts with the MTP module)
  convert   HAI checkpoint -> Hugging Face (convert.src=CKPT convert.dst=DIR), or hf:DIR -> HAI checkpoint

overrides are Hydra's: group=option (model=deepseek_v3_671b cluster=h800_2048 parallel=v3_2048 train=demo)
and key=value (train.steps=50 parallel.dp=2 out_dir=runs/x wandb.mode=disabled output=json).
flags: launch --slurm (launcher.kind=slurm) --dry-run (dry_run=true); plan/account --json (output=json)."""


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


def cmd_train(cfg, overrides: list[str]) -> int:
    from hai.parallel.topology import Topology

    topo = Topology.from_config(cfg)  # validate before starting any process
    if not _under_torchrun():
        preflight(cfg)
        _check_fits(cfg)
    if topo.world_size > 1 and not _under_torchrun():
        from hai.launch.torchrun import agent_grace_s, run_local

        if cfg.cluster.device == "cuda" and cfg.cluster.nodes > 1:
            raise ConfigError(f"cluster {cfg.cluster.name!r} has {cfg.cluster.nodes} nodes: start it with "
                              f"`hai launch launcher.kind=torchrun ...` on each node or `launcher.kind=slurm`")
        return run_local(overrides, topo.world_size, grace_s=agent_grace_s(cfg.train.preempt_grace_s),
                         out_dir=cfg.out_dir)
    from hai.train.trainer import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out_dir": cfg.out_dir, **summary}) if cfg.output == "json" else
              format_summary(cfg, summary), flush=True)
    if topo.world_size > 1:  # a torchrun worker whose process group is shut down: skip interpreter teardown, where
        sys.stdout.flush()  # gloo's C++ threads meeting static destructors abort ~1 exit in 15 after a preemption
        sys.stderr.flush()
        os._exit(0)
    return 0


def preflight(cfg) -> None:
    """Everything the parent can check before any rank starts (raises with the value and the fix; `main` prints it
    once and exits 2): the data (a token file or shard directory per source, a held-out split that exists, a
    vocabulary that fits the model; the default corpus is built here, once), ``train.seq_len <= model.max_seq_len``,
    the resume checkpoint (exists, complete, this model), FP8 on a GPU that has it. (``model.init_from``'s
    directory is read, and checked, when the config is composed.)"""
    from hai.train.trainer import load_data

    m, t = cfg.model, cfg.train
    if m.precision == "fp8" and cfg.cluster.device == "cuda":
        import torch

        from hai.kernels import check_fp8_device

        if torch.cuda.is_available():  # this node's GPU; every rank checks its own again (Trainer)
            check_fp8_device("cuda")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len} (the RoPE tables "
                          f"and the model's context): set train.seq_len <= {m.max_seq_len} or raise model.max_seq_len")
    data = load_data(cfg)
    if data.vocab_size > m.vocab_size:
        raise ConfigError(f"the data {data.sources[0][1][0]!r} uses a vocabulary of {data.vocab_size} "
                          f"({data.tokenizer}) but model.vocab_size={m.vocab_size}: set model.vocab_size >= "
                          f"{data.vocab_size} or tokenize with the model's tokenizer")
    if t.eval_every and data.val is None:
        print("hai: no held-out split (data.val_fraction=0 and no data.val_path): validation loss is off",
              file=sys.stderr)
    if cfg.resume not in ("", "none"):
        from hai.checkpoint.files import check_model, read_meta, resolve_resume

        path = resolve_resume(cfg.resume, cfg.out_dir)
        if path is not None:
            check_model(path, read_meta(path), m)


def format_summary(cfg, s: dict) -> str:
    """The end-of-run summary a person reads: what happened and where everything is."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    run = s.get("steps_run", s["steps"])
    steps = f"{run} step{'' if run == 1 else 's'}" + ("" if run == s["steps"] else f" (resumed: now at step "
                                                                                  f"{s['steps']})")
    lines = [f"hai train: {steps} in {s['wall_time_s']:.1f} s; train loss {num(s['first_loss'], '.3f')} "
             f"-> {num(s['final_loss'], '.3f')}" + ("" if s.get("val_loss") is None else
                                                  f"; val loss {s['val_loss']:.3f} (ppl {s['val_ppl']:.2f})"),
             f"  throughput  {num(s.get('tokens_per_s'), ',.0f')} tokens/s, MFU {num(s.get('mfu'), '.2%')} "
             f"(peak {cfg.cluster.peak_tflops_bf16:g} TFLOP/s per device, cluster={cfg.cluster.name})"]
    for key, label in (("metrics_path", "metrics"), ("loss_png", "loss plot"), ("checkpoint_dir", "checkpoints")):
        if s.get(key) and (key != "checkpoint_dir" or os.path.isdir(s[key])):
            lines.append(f"  {label:<11} {s[key]}")
    if s.get("preempted"):
        p = s["preempted"]
        since = "" if p.get("since_signal_s") is None else f", {p['since_signal_s']:.1f} s after the signal"
        lines.append(f"  preempted   {p['signal']}: stopped after step {p['step']} with a checkpoint (saved in "
                     f"{p['save_s']:.1f} s{since}); continue with resume=auto")
    lines += _profile_lines(s.get("profile"))
    if s.get("wandb_sync"):
        lines.append(f"  wandb       {s['wandb_dir']} (offline; upload: {s['wandb_sync']})")
    elif s.get("wandb_url"):
        lines.append(f"  wandb       {s['wandb_url']}")
    return "\n".join(lines)


def _profile_lines(p: dict | None) -> list[str]:
    if not p:
        return []
    first, last = p["steps"]
    lines = [f"  profile     steps {first}-{last}: {p['dir']}/{p['traces']} (chrome://tracing, Perfetto)"]
    if p.get("memory"):
        lines.append(f"  memory      {p['memory']}")
    if p.get("top_ops"):
        lines.append("  top 10 ops by self time (rank 0):")
        lines += ["    " + row for row in p["top_ops"].splitlines()]
    return lines


def _check_fits(cfg) -> None:
    """The plan's memory check, in the parent, before any rank starts (ConfigError naming the rank and the fix)."""
    from hai.plan.memory import check_fits

    check_fits(cfg, cfg.n_micro_batches)


def cmd_account(cfg, overrides: list[str]) -> int:
    from hai.plan.accounting import account

    report = account(cfg.model, cfg.train.seq_len)
    if cfg.output == "json":
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:34s} {v:,}" if isinstance(v, (int, float)) else f"{k:34s} {v}")
    return 0


def cmd_prepare(cfg, overrides: list[str]) -> int:
    if cfg.data.format == "chat":
        return _prepare_chat(cfg)
    from hai.data.prepare import prepare_corpus

    report = prepare_corpus(cfg.data, progress=cfg.output != "json")
    if cfg.output == "json":
        print(json.dumps(report))
        return 0
    print(f"hai prepare: {report['files']} file(s), {report['documents']:,} documents, {report['tokens']:,} tokens "
          f"(vocab {report['vocab_size']:,}, {report['tokenizer']}) -> {report['path']} ({report['shards']} "
          f"shard(s)); {report['input_bytes'] / 2**20:,.1f} MB in {report['seconds']:.1f} s = "
          f"{report['mb_per_s']:,.1f} MB/s with {report['workers']} worker(s)")
    for path, err in report["skipped"].items():
        print(f"  skipped {path}: {err}")
    return 0


def _prepare_chat(cfg) -> int:
    """`hai prepare data.format=chat`: conversations into windows of train.seq_len+1 (hai.data.chat_prepare)."""
    from hai.data.chat_prepare import prepare_chat

    r = prepare_chat(cfg.data, cfg.train.seq_len, progress=cfg.output != "json")
    if cfg.output == "json":
        print(json.dumps(r))
        return 0
    how = "packed" if r["pack"] else "padded"
    print(f"hai prepare: {r['files']} file(s), {r['rows']:,} rows -> {r['conversations']:,} conversations "
          f"({r['template']}) in {r['windows']:,} windows of {r['window']} tokens ({how}) -> {r['path']}; packing "
          f"efficiency {r['packing_efficiency']:.1%}, targets {r['target_fraction']:.1%} of "
          f"tokens ({r['target_tokens']:,}); {r['truncated']} truncated")
    bad = ", ".join(f"{k} {n}" for k, n in r["bad_rows"].items())
    print(f"  bad rows skipped: {bad or 'none'}")
    for kind, examples in r["bad_examples"].items():
        for e in examples:
            print(f"    {kind}: {e}")
    return 0


def cmd_launch(cfg, overrides: list[str]) -> int:
    from hai.launch import launch
    from hai.parallel.topology import Topology

    Topology.from_config(cfg)
    preflight(cfg)
    _check_fits(cfg)
    return launch(cfg, overrides)


def cmd_plan(cfg, overrides: list[str]) -> int:
    from hai.plan import format_plan, plan

    report = plan(cfg, out_dir=cfg.out_dir)
    print(json.dumps(report) if cfg.output == "json" else format_plan(report))
    return 0


def cmd_generate(cfg, overrides: list[str]) -> int:
    from hai.data import load_tokenizer
    from hai.checkpoint.load import load_model
    from hai.inference.generate import generate

    model, tok_spec = load_model(cfg)
    tok = load_tokenizer(tok_spec)
    g = cfg.generate
    prompt, stop = tok.encode(g.prompt), ()
    if g.chat:  # a user turn in the tokenizer's chat template (as `hai prepare data.format=chat` renders them)
        from hai.data.chat import load_chat_template

        template = load_chat_template(tok_spec)
        prompt, stop = template.prompt([{"role": "user", "content": g.prompt}]), template.stop_ids
    runs = [("speculative (MTP drafts)" if g.speculative else "plain", g.speculative)]
    if g.speculative and g.compare:
        runs.append(("plain", False))
    report = {}
    for name, spec in runs:
        res = generate(model, prompt, g.max_new_tokens, g.temperature, g.top_p, g.seed, speculative=spec, stop=stop)
        report[name] = {"tokens_per_s": res.tokens_per_s, "main_passes": res.main_passes, "tokens": len(res.tokens),
                        "acceptance": res.acceptance if spec else None, "text": tok.decode(res.tokens)}
    if cfg.output == "json":
        print(json.dumps(report))
        return 0
    first = report[runs[0][0]]
    print(f"user: {g.prompt}\nassistant: {first['text']}" if g.chat else g.prompt + first["text"])
    for name, r in report.items():
        acc = f", draft acceptance {100 * r['acceptance']:.1f}%" if r["acceptance"] is not None else ""
        print(f"[{name}] {r['tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s, {r['main_passes']} main-model "
              f"passes{acc}", file=sys.stderr)
    if len(report) == 2:
        same = report[runs[0][0]]["text"] == report["plain"]["text"]
        print(f"speculative output {'equals' if same else 'differs from'} plain decoding"
              + ("" if g.temperature == 0 else " (sampling: each is a sample of the same distribution)"),
              file=sys.stderr)
    return 0


def cmd_convert(cfg, overrides: list[str]) -> int:
    from hai.config import ConfigError

    c = cfg.convert
    if not c.src or not c.dst:
        raise ConfigError("hai convert needs convert.src and convert.dst: convert.src=CKPT_DIR convert.dst=HF_DIR "
                          "(HAI -> Hugging Face) or convert.src=hf:DIR convert.dst=RUN_DIR (-> a HAI checkpoint)")
    if c.src.startswith("hf:"):
        from hai.checkpoint.convert import hf_to_hai

        out = hf_to_hai(cfg, c.src, c.dst)
    else:
        from hai.checkpoint.convert import hai_to_hf

        out = hai_to_hf(cfg, c.src, c.dst, int(c.max_shard_gb * 2**30))
    print(json.dumps(out))
    return 0


COMMANDS = {"train": cmd_train, "launch": cmd_launch, "plan": cmd_plan, "account": cmd_account, "prepare": cmd_prepare,
            "generate": cmd_generate, "convert": cmd_convert}


# Flag spellings of common overrides, per command (DESIGN: `hai launch --slurm`, `--dry-run`); the rest is Hydra's.
FLAGS = {
    "launch": {"--slurm": "launcher.kind=slurm", "--dry-run": "dry_run=true"},
    "plan": {"--json": "output=json"},
    "account": {"--json": "output=json"},
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"hai: unknown command {cmd!r}; expected one of {sorted(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    flags = FLAGS.get(cmd, {})
    bad = [a for a in argv[1:] if a.startswith("--") and a not in flags]
    if bad:
        print(f"hai {cmd}: error: unknown flag {bad[0]!r}; `hai {cmd}` takes "
              f"{', '.join(flags) or 'no flags'} (and key=value / group=option overrides)", file=sys.stderr)
        return 2
    overrides = [flags.get(a, a) for a in argv[1:]]
    try:
        cfg = compose(overrides)
        return COMMANDS[cmd](cfg, overrides)
    except ValueError as e:  # ConfigError, DataError and the like: the message names the value and the fix
        print(f"hai {cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
