"""model.precision=fp8 end to end on the torch reference path (issue 6, item 3).

V3's recipe (§3.3): bf16 weights in the modules (fp32 master weights in the optimizer); the GEMMs of the attention
projections, dense MLPs, shared and routed experts (and the MTP projection) quantize their operands on the fly and run
in FP8 (hai.kernels.fp8_linear / fp8_grouped_linear); everything else runs under bf16 autocast with the embedding and
output head in bf16, the router in fp32, norms and the attention softmax computed in fp32.

Every test deletes TRITON_INTERPRET in-process so hai.kernels dispatches to its torch reference (fast on CPU); the
kernels themselves are checked against those references in tests/test_fp8_kernels.py.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import hai.kernels
from hai.cli import main
from hai.config.compose import compose
from hai.train.metrics import read_metrics
from hai.model import build_model
from hai.model.layers import Linear, RMSNorm
from hai.model.moe import GroupedExperts, Router

ATTN_PROJ = {"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo"}


@pytest.fixture(autouse=True)
def torch_reference_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def tiny(**kw):
    return dataclasses.replace(compose(["model=tiny"]).model, **kw)


def _tokens(cfg, batch=4, seq=33, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


def _intended_fp8(name: str) -> bool:
    """Parameter names whose GEMM is meant to run in FP8 (V3): attention projections, dense MLPs, shared and routed
    experts, MTP projection. Everything else (embed, head, router, norms) is not."""
    parts = name.split(".")
    if parts[-2:-1] == ["experts"]:  # routed experts: stacked weights experts.w1/w2/w3
        return parts[-1] in {"w1", "w2", "w3"}
    if parts[-1] != "weight" or len(parts) < 3:
        return False
    owner, parent = parts[-2], parts[-3]
    return ((parent == "attn" and owner in ATTN_PROJ)
            or (parent in {"ffn", "shared"} and owner in {"w1", "w2", "w3"})  # dense MLPs, shared experts
            or (parts[0] == "mtp" and owner == "proj"))


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_linear_fp8_flags_cover_exactly_the_intended_projections(q_lora_rank):
    model = build_model(tiny(precision="fp8", q_lora_rank=q_lora_rank), seed=0)
    flagged = {n for n, m in model.named_modules() if isinstance(m, Linear) and m.fp8}
    flagged |= {n for n, m in model.named_modules() if isinstance(m, GroupedExperts) and m.fp8}
    expected = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if _intended_fp8(n)}
    assert flagged == expected
    names = {n.rsplit(".", 1)[-1] for n in flagged}
    assert names >= ({"wq"} if q_lora_rank is None else {"wq_a", "wq_b"}) | {"wkv_a", "wkv_b", "wo", "proj"}
    assert any(".shared." in n for n in flagged) and any(n.endswith("ffn.experts") for n in flagged)
    assert any(n.startswith("layers.0.ffn.") for n in flagged)  # the dense (first_k_dense_replace) MLP
    assert not model.head.fp8 and not isinstance(model.embed, Linear)
    # fp32 / bf16 models have no FP8 module at all
    ref = build_model(tiny(q_lora_rank=q_lora_rank), seed=0)
    assert not any(getattr(m, "fp8", False) for m in ref.modules())


def test_forward_backward_runs_exactly_the_intended_gemms_in_fp8(monkeypatch):
    """Count the calls under the trainer's recipe (bf16 weights, bf16 autocast): each intended weight goes through
    fp8_linear / fp8_grouped_linear once per forward with bf16 activations; the head through plain F.linear in bf16,
    the routers in fp32; norms see and return bf16 (fp32 inside); the attention core gets bf16 q/k/v."""
    import hai.model.attention as attention_mod

    cfg = tiny(precision="fp8")
    model = build_model(cfg, seed=0)
    name_of = {id(p): n for n, p in model.named_parameters()}
    fp8_calls, grouped_calls, plain_calls = [], [], []
    real_lin, real_grouped, real_F = hai.kernels.fp8_linear, hai.kernels.fp8_grouped_linear, F.linear

    def lin(x, w):
        fp8_calls.append((name_of.get(id(w), "<not a parameter>"), x.dtype))
        return real_lin(x, w)

    def grouped(x, w, counts):
        grouped_calls.append((name_of.get(id(w), "<not a parameter>"), x.dtype))
        return real_grouped(x, w, counts)

    def plain(x, w, b=None):
        plain_calls.append((name_of.get(id(w), "<fp32 copy>"), x.dtype))
        return real_F(x, w, b)

    monkeypatch.setattr(hai.kernels, "fp8_linear", lin)
    monkeypatch.setattr(hai.kernels, "fp8_grouped_linear", grouped)
    monkeypatch.setattr(torch.nn.functional, "linear", plain)
    norm_dtypes, core_dtypes = set(), set()
    hooks = [m.register_forward_hook(lambda m, i, o: norm_dtypes.update({i[0].dtype, o.dtype}))
             for m in model.modules() if isinstance(m, RMSNorm)]
    real_core = attention_mod.attention_forward

    def core(q, k, v, scale):
        core_dtypes.update({q.dtype, k.dtype, v.dtype})
        return real_core(q, k, v, scale)

    monkeypatch.setattr(attention_mod, "attention_forward", core)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_tokens(cfg))
        out.loss.backward()
    for h in hooks:
        h.remove()

    intended = sorted(n for n, _ in model.named_parameters() if _intended_fp8(n))
    fp8_names = sorted(n for n, _ in fp8_calls + grouped_calls)
    assert fp8_names == intended  # each intended weight exactly once, nothing else
    assert {n for n, _ in grouped_calls} == {n for n in intended if ".experts." in n}
    # head (main + MTP share it) in bf16; every router on an fp32 copy of its weight and fp32 input
    routers = [n for n, _ in model.named_parameters() if n.endswith("router.weight")]
    assert sorted(plain_calls, key=str) == sorted([("head.weight", torch.bfloat16)] * (1 + cfg.mtp_depth)
                                                  + [("<fp32 copy>", torch.float32)] * len(routers), key=str)
    assert {d for _, d in fp8_calls + grouped_calls} == {torch.bfloat16}  # the FP8 op quantizes inside
    assert norm_dtypes == {torch.bfloat16}
    assert core_dtypes == {torch.bfloat16}  # computed in fp32 inside attention_forward
    assert all(r.weight.grad is not None for r in model.modules() if isinstance(r, Router))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if _intended_fp8(n))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # bf16 weights (fp32 masters: optimizer)


def test_fp8_loss_and_gradients_close_to_fp32_same_weights():
    """Same fp32 weights and batch, fp8 GEMMs vs fp32 GEMMs (no autocast: this isolates the FP8 GEMMs' error).

    Bounds (e4m3 has 3 mantissa bits, ~6% per element; block scales and fp32 accumulation average that down):
      - loss: relative difference < 1e-3 (observed ~1e-4);
      - the whole gradient vector: cosine > 0.99 and relative L2 error < 0.15 (observed ~0.99 / ~0.08);
      - each tensor whose gradient does not come straight through a routing decision (all but routed experts,
        routers and the ffn_norm in front of them): relative L2 error < 0.25 (observed <= 0.15);
      - routed experts, routers and ffn_norm: cosine > 0.7 — FP8 noise flips a few discrete top-k choices, and a
        flipped token moves its whole gradient contribution to another expert (observed >= 0.87).
    A missing or wrong scale gives errors of order 1 (or inf), far outside these bounds."""
    cfg32, cfg8 = tiny(), tiny(precision="fp8")
    m32, m8 = build_model(cfg32, seed=0), build_model(cfg8, seed=0, dtype=torch.float32)
    m8.load_state_dict(m32.state_dict())
    tokens = _tokens(cfg32)
    outs = []
    for m in (m32, m8):
        out = m(tokens)
        out.loss.backward()
        outs.append(out)
    (o32, o8) = outs
    assert abs(o8.loss.item() - o32.loss.item()) / o32.loss.item() < 1e-3
    assert abs(o8.main_loss.item() - o32.main_loss.item()) / o32.main_loss.item() < 1e-3
    assert abs(o8.mtp_loss.item() - o32.mtp_loss.item()) / o32.mtp_loss.item() < 1e-3

    g32 = dict((n, p.grad) for n, p in m32.named_parameters())
    g8 = dict((n, p.grad) for n, p in m8.named_parameters())
    assert g32.keys() == g8.keys() and all(g is not None for g in g8.values())
    flat32 = torch.cat([g.flatten() for g in g32.values()]).double()
    flat8 = torch.cat([g8[n].flatten() for n in g32]).double()
    assert F.cosine_similarity(flat32, flat8, dim=0) > 0.99
    assert (flat8 - flat32).norm() / flat32.norm() < 0.15
    for n in g32:
        a, b = g32[n].double().flatten(), g8[n].double().flatten()
        if ".experts." in n or ".router." in n or "ffn_norm" in n:
            assert F.cosine_similarity(a, b, dim=0) > 0.7, n
        else:
            assert (b - a).norm() / a.norm() < 0.25, n


def test_thirty_step_fp8_training_run_loss_falls(tmp_path):
    """`hai train` with model.precision=fp8: bf16 weights, fp32 master weights (AdamW), FP8 GEMMs, bf16 autocast.
    One micro-batch of 2 x 32 tokens per step keeps it quick on two cores."""
    out = tmp_path / "fp8"
    rc = main(["train", "model=tiny", "cluster=cpu1", "parallel=single", "train=test", "train.steps=30",
               "train.global_batch_size=2", "train.micro_batch_size=2", "model.precision=fp8",
               "wandb.mode=disabled", f"out_dir={out}"])
    assert rc == 0
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = [r["loss"] for r in rows]
    assert all(l == l and l < 10 for l in losses)  # finite
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 5.0 and last < first - 1.0, (first, last)  # ln(320) = 5.77 at the start
