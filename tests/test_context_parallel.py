"""Context parallelism reproduces the single-process training run of the same model, seed and data: per-step losses
and final parameters (every rank against the slice of the reference it holds), fp32 on gloo.

Tolerance: losses rel 1e-5, parameters rtol 1e-4 / atol 1e-5 after 3 AdamW steps (as tests/test_parallel_train.py):
the layouts differ from the reference only in the order of sums (the latents' reduce-scatter, the balance loss's
all-reduce, the all-to-all, P2P and the optimizer's reduce-scatter over dp x cp). Sequences of 256 positions, MTP
depth 1 and the sequence-wise balance loss on (alpha 0.01, 100x the preset, so a wrong sum shows), router biases
moving at 10x the preset. Configurations of one world size share one launch of forked ranks.
"""

import re

import numpy as np
import pytest
import torch

from dist_utils import (collective_bytes, planned_bytes, rank_params, resume_and_train, run_ranks,
                        train_and_save)
from test_tensor_parallel import _compare
from hai.config import ConfigError
from hai.config.compose import compose
from hai.data import TokenFile, ensure_token_file
from hai.data.tokens import write_token_file
from hai.model.sequence import zigzag_runs
from hai.parallel import Topology
from hai.train.trainer import Trainer, init_distributed

STEPS = 3
BASE = ["model=tiny", "train=test", "cluster=cpu1", "parallel=single", f"train.steps={STEPS}", "wandb.mode=disabled",
        "model.bias_update_speed=0.01", "model.seq_aux_alpha=0.01", "train.seq_len=256", "train.global_batch_size=4",
        "train.micro_batch_size=2"]
SP = ["parallel.sequence_parallel=true"]
V3, FULL, SDPA = ["train.recompute=v3"], ["train.recompute=full"], ["model.attention=sdpa"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """The default corpus cut into documents of 8-119 tokens (EOS after each): 2-30 documents per window, many
    spanning the CP chunk boundaries. Overrides turning the document mask and position resets on."""
    tf = TokenFile.open(ensure_token_file(compose(BASE).data))
    toks = np.asarray(tf.tokens[:120_000]).astype(np.int64)
    rng, out, i = np.random.default_rng(0), [], 0
    while i < len(toks):
        n = int(rng.integers(8, 120))
        out += [toks[i:i + n], [tf.eos_id]]
        i += n
    path = tmp_path_factory.mktemp("docs") / "docs.haitok"
    write_token_file(path, np.concatenate(out), tf.vocab_size, tf.tokenizer, tf.eos_id)
    return [f"data.path={path}", "data.document_mask=true", "data.reset_positions=true"]


def _trainer(overrides):
    cfg = compose([*BASE, *overrides])
    topo = Topology.from_config(cfg)
    return Trainer(cfg, topo, init_distributed(topo), TokenFile.open(ensure_token_file(cfg.data)))


def _run(overrides):
    tr = _trainer(overrides)
    losses = [tr.train_step()["loss"] for _ in range(STEPS)]
    params, shards = rank_params(tr.model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    overlap = tr.pipeline is not None and tr.pipeline.overlap
    return losses, params, tr.topo.coords(rank), tr.topo.ep, shards, overlap


def _rank_many(rank, world, runs):
    return [_run(overrides) for overrides in runs]


# name -> (world, layout overrides, recipe overrides (the reference runs them too), uses the documents)
LAYOUTS = {
    "cp2": (2, ["parallel.cp=2"], [], False),
    "cp2_docs": (2, ["parallel.cp=2"], [], True),
    "cp2_v3_sdpa_docs": (2, ["parallel.cp=2"], V3 + SDPA, True),
    "cp2_full": (2, ["parallel.cp=2"], FULL, False),
    "cp2_sdpa_docs_vs_reference_core": (2, ["parallel.cp=2", *SDPA], [], True),  # the reference run: reference core
    "cp4": (4, ["parallel.cp=4"], [], False),
    "cp4_docs": (4, ["parallel.cp=4"], [], True),
    "cp2_ep2_dp2": (4, ["parallel.cp=2", "parallel.dp=2", "parallel.ep=2"], [], False),
    "cp2_ep2_dp2_docs_v3": (4, ["parallel.cp=2", "parallel.dp=2", "parallel.ep=2"], V3, True),
    "cp2_pp2_dualpipe_ep2": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipe",
                                 "train.micro_batch_size=1"], [], False),
    "cp2_pp2_dualpipe_ep2_docs_v3": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.ep=2",
                                         "parallel.schedule=dualpipe", "train.micro_batch_size=1"], V3, True),
    "cp2_pp2_zb1p": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.schedule=zb1p", "train.micro_batch_size=1"],
                     [], False),
    "cp2_pp2_1f1b_docs_full": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.schedule=1f1b"], FULL, True),
    "cp2_pp2_dualpipev_ep2": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipev",
                                  "train.micro_batch_size=1"], [], False),
    "cp2_tp2_sp_ep2": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.ep=2", *SP], [], False),
    "cp2_tp2_sp_ep4_docs_v3": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.ep=4", *SP], V3, True),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world, docs, tmp_path, monkeypatch):
    """At world 2, V3's recompute region attends one head at a time (the long-window path; the forked ranks
    inherit the setting) against the single process doing the same."""
    if world == 2:
        import hai.model.attention as A

        monkeypatch.setattr(A, "HEAD_CHUNK_BYTES", 1)
    names = [n for n, (w, *_) in LAYOUTS.items() if w == world]
    runs, refs = [], {}
    for n in names:
        _, layout, recipe, uses_docs = LAYOUTS[n]
        common = [*recipe, *(docs if uses_docs else []), f"out_dir={tmp_path / n}"]
        key = tuple(recipe) + (uses_docs,)
        if key not in refs:
            refs[key] = _run(common)
        runs.append([f"cluster.gpus_per_node={world}", *layout, *common])
    per_rank = run_ranks(_rank_many, world, runs)
    for i, n in enumerate(names):
        _, layout, recipe, uses_docs = LAYOUTS[n]
        results = [r[i] for r in per_rank]
        if any(o.startswith("parallel.schedule=dualpipe") for o in layout) and "parallel.ep=2" in layout:
            # the F&B pairs overlap the all-to-alls
            assert all(r[5] for r in results), n
        try:
            _compare([r[:5] for r in results], refs[tuple(recipe) + (uses_docs,)])
        except AssertionError as e:
            raise AssertionError(f"{n}: {e}") from None


def test_zigzag_balances_causal_attention_work():
    """Per-rank (query, key) pairs under the causal mask, counted from the runs each rank attends with: equal on
    every rank with zig-zag chunks, against more than (2cp-2) : 1 between the busiest and the idlest rank with
    contiguous chunks."""
    S = 4096
    for cp in (2, 4, 8):
        work = []
        for r in range(cp):
            work.append(sum(sum(g0 + j + 1 for j in range(n)) for _, n, g0 in zigzag_runs(S // cp, cp, r)))
        assert len(set(work)) == 1 and sum(work) == S * (S + 1) // 2
        c = S // cp
        contiguous = [sum(r * c + j + 1 for j in range(c)) for r in range(cp)]
        assert max(contiguous) / min(contiguous) > 2 * cp - 2


@pytest.mark.parametrize("overrides, message", [
    (["parallel.cp=3", "cluster.gpus_per_node=3"], "parallel.cp=3 splits train.seq_len=256 into 2 x cp = 6 zig-zag "
                                                   "chunks"),
    (["parallel.cp=2", "cluster.gpus_per_node=4"], "!= parallel.pp=1 x parallel.dp=1 x parallel.cp=2 = 2: set "
                                                   "parallel.dp=2"),
    (["parallel.cp=2", "cluster.gpus_per_node=6"], "!= parallel.pp=1 x parallel.dp=1 x parallel.cp=2 = 2: set "
                                                   "parallel.dp=3"),
    (["parallel.cp=4", "parallel.pp=2", "cluster.gpus_per_node=6"], "is not divisible by pp x cp = 8"),
    (["parallel.cp=2", "parallel.tp=4", "cluster.gpus_per_node=8", "train.seq_len=12", *SP],
     "each CP rank's train.seq_len/cp = 6 positions over parallel.tp=4: choose a seq_len divisible by cp x tp = 8"),
    (["parallel.cp=2", "cluster.gpus_per_node=2", "parallel.ep=4"], "parallel.ep=4 does not divide parallel.dp=1 x "
                                                                    "parallel.cp=2"),
    (["parallel.cp=2", "cluster.gpus_per_node=2", "train.seq_len=2048"], "train.seq_len=2048 exceeds "
                                                                         "model.max_seq_len=1024"),
])
def test_cp_misconfigurations_name_value_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Topology.from_config(compose([*BASE, *overrides]))


@pytest.mark.multiproc
def test_checkpoint_moves_between_cp_sizes(tmp_path):
    """Saved at cp=2 (x ep=2) after 3 steps, resumed at cp=1 (one process) and at cp=4: the next 3 losses are those
    of an uninterrupted single-process run of 6 steps (rel 1e-5)."""
    six = f"train.steps={2 * STEPS}"
    ref = _trainer([six, f"out_dir={tmp_path / 'ref'}"])
    want = [ref.train_step()["loss"] for _ in range(2 * STEPS)]
    saved = run_ranks(train_and_save, 2, [*BASE, "cluster.gpus_per_node=2", "parallel.cp=2", "parallel.ep=2",
                                          f"out_dir={tmp_path / 'cp2'}", six], STEPS)
    assert saved[0][0] == pytest.approx(want[:STEPS], rel=1e-5)
    path = saved[0][1]
    step, got = resume_and_train(0, 1, [*BASE, f"resume={path}", f"out_dir={tmp_path / 'cp1'}", six], STEPS)
    assert step == STEPS and got == pytest.approx(want[STEPS:], rel=1e-5)
    for step, got in run_ranks(resume_and_train, 4, [*BASE, "cluster.gpus_per_node=4", "parallel.cp=4",
                                                     f"resume={path}", f"out_dir={tmp_path / 'cp4'}", six], STEPS):
        assert step == STEPS and got == pytest.approx(want[STEPS:], rel=1e-5)


def _count_rank(rank, world, overrides):
    import hai.parallel.context_parallel as cpm
    from hai.plan.cp import cp_chunk_bytes

    tr = _trainer(overrides)
    got = collective_bytes(cpm, tr.model.cp.group, lambda: tr.forward_backward(
        tr.sampler.micro_batches(0, tr.coords["dp"], tr.topo.dp, tr.cfg.train.micro_batch_size)))
    return got, planned_bytes(cp_chunk_bytes(tr.cfg, 0), tr.cfg.n_micro_batches)


@pytest.mark.multiproc
@pytest.mark.parametrize("recompute", ["none", "v3", "full"])
def test_plan_cp_bytes_equal_the_collectives_of_a_run(recompute):
    """Every CP collective of one forward/backward (tensor bytes per kind, rank 0) is what `hai plan` counts."""
    got, want = run_ranks(_count_rank, 2, ["cluster.gpus_per_node=2", "parallel.cp=2",
                                           f"train.recompute={recompute}"])[0]
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-9) for k in got), (got, want)


@pytest.mark.parametrize("overrides", [
    ["model=small", "cluster=h100_node", "parallel=single", "parallel.cp=4", "parallel.dp=2", "parallel.ep=8",
     "train.seq_len=8192", "model.max_seq_len=8192", "train.global_batch_size=4", "train.micro_batch_size=1"],
    ["model=small", "cluster=h100_node", "cluster.nodes=2", "parallel=tp4_pp2", "parallel.tp=2", "parallel.cp=2",
     "train.seq_len=8192", "model.max_seq_len=8192", "train.global_batch_size=8", "train.micro_batch_size=1",
     "train.recompute=v3"],
])
def test_plan_static_bytes_equal_the_cp_rank_built_on_meta(overrides):
    """`hai plan`'s static bytes for a CP layout (dense ZeRO-1 buckets over dp x cp, experts over the stage's
    dp x cp x tp / ep) equal what the construction path allocates on meta, on the first and last rank of a stage."""
    from hai.plan.construct import constructed_bytes
    from hai.plan.memory import static_bytes

    cfg = compose(overrides)
    topo = Topology.from_config(cfg)
    p = cfg.parallel
    for pp in range(p.pp):
        want = static_bytes(cfg, pp)
        for rank in (topo.rank_of_dp(pp, 0, 0, 0), topo.rank_of_dp(pp, p.dp - 1, p.tp - 1, p.cp - 1)):
            built = constructed_bytes(cfg, rank)
            assert {k: built[k] for k in want} == want, (rank, built, want)


@pytest.mark.parametrize("phase, seq, batch, cp", [("v3_ext32k", 32768, 1920, 8), ("v3_ext128k", 131072, 480, 32)])
def test_context_extension_presets_fit_the_2048_gpu_cluster(phase, seq, batch, cp):
    """train=v3_ext32k / v3_ext128k carry DeepSeek-V3's sec. 4.3 values (1000 steps, lr 7.3e-6, YaRN s=40, alpha=1,
    beta=32, sqrt(t) = 0.1 ln s + 1), and on the 2048-GPU cluster their layouts (parallel=<same name>) fit 80 GB:
    the kept bytes of the plan and, beside them, the attention working set of one layer's backward."""
    import math

    from hai.model.layers import softmax_scale
    from hai.plan.cp import attention_working_set
    from hai.plan.step import predict

    cfg = compose(["model=deepseek_v3_671b", "cluster=h800_2048", f"parallel={phase}", f"train={phase}"])
    t, m, p = cfg.train, cfg.model, cfg.parallel
    assert (t.steps, t.seq_len, t.global_batch_size, t.lr, t.min_lr, t.warmup_steps) == (1000, seq, batch, 7.3e-6,
                                                                                          7.3e-6, 0)
    assert (m.rope_factor, m.rope_beta_slow, m.rope_beta_fast, m.rope_original_max_seq_len) == (40, 1, 32, 4096)
    sqrt_t = 0.1 * math.log(40) + 1
    assert softmax_scale(m) == pytest.approx(sqrt_t ** 2 / math.sqrt(192), rel=1e-12)
    assert (p.cp, p.pp, p.ep, p.dp * p.cp * p.pp) == (cp, 16, 64, 2048)
    Topology.from_config(cfg)
    mem = predict(cfg, with_comm=False)["memory"]
    assert mem["fits"] and mem["total"] + attention_working_set(cfg) < 80e9, mem["total"]


def test_short_sequence_checkpoint_resumes_at_a_longer_one(tmp_path):
    """A checkpoint saved at seq_len 64 resumes at seq_len 256 with YaRN on and cp=1 (a new phase, as V3's 4K -> 32K
    extension): weights and AdamW state load, the phase starts at step 0 and trains."""
    short = _trainer(["train.seq_len=64", f"out_dir={tmp_path / 'short'}"])
    for _ in range(2):
        short.train_step()
    path = short.save_checkpoint()
    saved = {n: p.detach().clone() for n, p in short.model.named_parameters()}
    long = _trainer([f"resume={path}", f"out_dir={tmp_path / 'long'}", "model.rope_factor=4",
                     "model.rope_original_max_seq_len=64", "model.max_seq_len=256"])
    long.resume()
    assert long.step == 0 and long.optimizer.step_count == short.optimizer.step_count == 2
    for n, p in long.model.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert np.isfinite(long.train_step()["loss"])


@pytest.mark.multiproc
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_low_precision_recipe_under_cp(precision, tmp_path, monkeypatch):
    """V3's precision recipe (bf16 weights, fp32 masters and gradients; fp8: FP8 GEMMs) at cp=2 x ep=2 with V3's
    recompute against the single-process run of the same recipe, with tests/test_parallel_train.py's bounds: losses
    rel 2e-3, each tensor's deviation < 0.5 of how far the reference moved it (bf16 rounds differently when the sums
    are ordered differently; under FP8 the weight-gradient GEMMs quantize 128-token tiles of other token groups, as
    under dp). The FP8 GEMMs take their torch reference."""
    from hai.model import build_model
    from hai.parallel.expert import expert_range

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    recipe = [f"model.precision={precision}", *V3]
    ref_losses, ref_params = _run([*recipe, f"out_dir={tmp_path / 'ref'}"])[:2]
    cfg = compose([*BASE, *recipe])
    init = dict(build_model(cfg.model, seed=cfg.train.seed).named_parameters())
    layout = ["cluster.gpus_per_node=2", "parallel.cp=2", "parallel.ep=2", *recipe, f"out_dir={tmp_path / 'cp'}"]
    results = [r[0] for r in run_ranks(_rank_many, 2, [layout], env={"TRITON_INTERPRET": "0"})]
    for losses, params, coords, ep, *_ in results:
        assert losses == pytest.approx(ref_losses, rel=2e-3)
        for name, p in params.items():
            if name not in init:  # the router biases (buffers)
                continue
            ref, p0 = ref_params[name].float(), init[name].detach().float()
            if ".experts." in name:
                e0, e1 = expert_range(ref.shape[0], coords["ep"], ep)
                ref, p0 = ref[e0:e1], p0[e0:e1]
            assert p.dtype == torch.bfloat16, name
            assert ((p.float() - ref).norm() / (ref - p0).norm()).item() < 0.5, name
