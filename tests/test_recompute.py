"""V3's activation recipe (train.recompute) and the fused pieces under it.

* The fused autograd pieces (RMSNorm, SwiGLU, flash-style attention, cross-entropy) against float64 autograd of the
  plain formulas.
* recompute=v3 and recompute=full give the losses and gradients of recompute=none (fp32: relative 1e-6 on the
  losses, 2e-6 on every gradient tensor's norm-wise error: the recompute regions differentiate by hand, in another
  summation order), with the zero-bubble store recording too (every weight gradient deferred, then run).
* What is kept really shrinks: v3 keeps no SwiGLU output, no norm output and no expert output rows.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hai.config.compose import compose
from hai.model import build_model
from hai.model.attention import attention
from hai.model.layers import cross_entropy, rms_norm, swiglu
from hai.model.wgrad import WeightGradStore
from measure import kept_for_backward


def tiny(**kw):
    return dataclasses.replace(compose(["model=tiny"]).model, **kw)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _grads_vs_float64(fn, ref, *shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*s, generator=g) for s in shapes]
    a = [x.clone().requires_grad_() for x in xs]
    b = [x.double().requires_grad_() for x in xs]
    ya, yb = fn(*a), ref(*b)
    dy = torch.randn(yb.shape, generator=g, dtype=torch.float64)
    ya.backward(dy.float())
    yb.backward(dy)
    assert _rel(ya, yb) < 1e-6
    for x, y in zip(a, b):
        assert _rel(x.grad, y.grad) < 1e-5


def test_fused_pieces_match_float64_autograd():
    _grads_vs_float64(lambda x, w: rms_norm(x, w, 1e-6),
                      lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, (3, 5, 16), (16,))
    _grads_vs_float64(swiglu, lambda a, b: F.silu(a) * b, (7, 12), (7, 12))

    def ref_attention(q, k, v):
        s = torch.einsum("bshk,blhk->bhsl", q, k) * 0.3
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("bhsl,blhv->bshv", s.softmax(-1), v)

    _grads_vs_float64(lambda q, k, v: attention(q, k, v, 0.3), ref_attention, (2, 9, 3, 8), (2, 9, 3, 8), (2, 9, 3, 5))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(11, 20, generator=g)
    target = torch.randint(0, 20, (11,), generator=g)
    _grads_vs_float64(lambda x: cross_entropy(x, target), lambda x: F.cross_entropy(x, target), (11, 20))
    del logits


def test_attention_blocks_of_queries_match_one_block(monkeypatch):
    """The query-block loop (256 queries per block) gives what one block gives (here 5 queries per block)."""
    import hai.model.attention as A

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 23, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    one = attention(q, k, v, 0.5)
    one.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    monkeypatch.setattr(A, "_Q_BLOCK", 5)
    many = attention(q, k, v, 0.5)
    many.sum().backward()
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)
    for t, ref in zip((q, k, v), grads):
        torch.testing.assert_close(t.grad, ref, rtol=1e-5, atol=1e-6)


def _loss_and_grads(cfg, recompute, tokens, store=False):
    model = build_model(cfg, seed=0, recompute=recompute)
    model.set_aux_grad_scale(0.5)
    ws = None
    if store:  # the zero-bubble split: every weight gradient deferred, then run
        ws = WeightGradStore()
        for m in model.modules():
            if hasattr(m, "wgrad_store"):
                m.wgrad_store = ws
        ws.recording = True
    out = model(tokens)
    out.loss.backward()
    if ws is not None:
        ws.recording = False
        ws.close(0)
        ws.run(0)
        assert ws.empty()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("q_lora_rank", [32, None])
@pytest.mark.parametrize("recompute, store", [("v3", False), ("v3", True), ("full", False)])
def test_recompute_equals_no_recompute_fp32(q_lora_rank, recompute, store):
    cfg = tiny(q_lora_rank=q_lora_rank, seq_aux_alpha=0.01)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    ref, ref_grads = _loss_and_grads(cfg, "none", tokens)
    got, grads = _loss_and_grads(cfg, recompute, tokens, store)
    for a, b in ((got.loss, ref.loss), (got.main_loss, ref.main_loss), (got.mtp_loss, ref.mtp_loss)):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert g is not None, n
        assert _rel(g, ref_grads[n]) < 2e-6, (n, _rel(g, ref_grads[n]))


def _saved_bytes(model, tokens) -> int:
    kept, out = kept_for_backward(lambda: model(tokens), model.parameters())
    out.loss.backward()
    return kept


def test_v3_keeps_less_than_none_and_full_least():
    cfg = tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(4))
    saved = {mode: _saved_bytes(build_model(cfg, seed=0, recompute=mode), tokens) for mode in ("none", "v3", "full")}
    assert saved["full"] < saved["v3"] < 0.6 * saved["none"], saved
