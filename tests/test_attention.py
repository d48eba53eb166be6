"""The attention cores and the packed-document path, against independent references.

- ``model.attention=sdpa`` (PyTorch's fused kernels, hai/model/fused_attention.py) and the reference flash-style loop
  (hai/model/attention.py) both equal a float64 dense masked softmax (forward and q/k/v gradients), for plain causal
  attention, context parallelism's zig-zag runs of queries over the whole window's keys, and document masks;
  q/k head dim 192 with v 128 as in DeepSeek-V3. Tolerance: fp32 against float64, rel 1e-5 of the tensor's norm.
- The model with ``sdpa`` equals the model with ``reference`` (loss and every gradient, rel 1e-5), with and without
  V3's recompute recipe and documents.
- Documents: a window of two documents gives the per-token losses of the two documents run separately (main and MTP
  heads, rel 1e-5), with ``data.reset_positions``; without the mask the second document's losses differ.
"""

import pytest
import torch

from hai.config import ModelConfig
from hai.model import build_model
from hai.model.attention import AttnMask, attention, attention_backward, attention_forward
from hai.model.fused_attention import sdpa_backward, sdpa_forward
from hai.model.sequence import DocumentSpec, documents, zigzag_runs

EOS = 1


def _dense64(q, k, v, scale, mask):
    """Masked softmax attention in float64, one query at a time from the mask's definition."""
    B, S, H, _ = q.shape
    L = k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    pos = torch.empty(S, dtype=torch.long)
    for q0, n, g0 in mask.runs:
        pos[q0:q0 + n] = torch.arange(g0, g0 + n)
    allowed = torch.arange(L)[None, :] <= pos[:, None]  # (S, L)
    allowed = allowed.expand(B, S, L)
    if mask.q_seg is not None:
        allowed = allowed & (mask.k_seg[:, None, :] == mask.q_seg[:, :, None])
    s = torch.einsum("bshk,blhk->bhsl", q, k) * scale
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhsl,blhv->bshv", s.softmax(-1), v)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _masks(B, S_local, cp, rank, L, seg=None):
    runs = zigzag_runs(S_local, cp, rank) if cp > 1 else ((0, S_local, L - S_local),)
    if seg is None:
        return AttnMask(runs)
    pos = torch.cat([torch.arange(g0, g0 + n) for _, n, g0 in runs])
    return AttnMask(runs, seg[:, pos], seg)


CASES = {  # (B, S_local, cp, rank, heads, qk dim, v dim, documents)
    "causal": (2, 40, 1, 0, 3, 24, 16, False),
    "causal_v3_dims": (1, 33, 1, 0, 2, 192, 128, False),
    "zigzag_cp2_rank0": (2, 24, 2, 0, 2, 24, 16, False),
    "zigzag_cp4_rank1": (1, 32, 4, 1, 2, 24, 16, False),
    "zigzag_cp4_rank3_v3_dims": (1, 16, 4, 3, 2, 192, 128, False),
    "documents": (2, 40, 1, 0, 3, 24, 16, True),
    "documents_zigzag_cp2_rank1": (2, 24, 2, 1, 2, 24, 16, True),
}


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_cores_equal_float64_dense(case, impl, monkeypatch):
    B, S, cp, rank, H, K, V, docs = CASES[case]
    L = S * cp
    g = torch.Generator().manual_seed(list(CASES).index(case))
    q = torch.randn(B, S, H, K, generator=g, requires_grad=True)
    k = torch.randn(B, L, H, K, generator=g, requires_grad=True)
    v = torch.randn(B, L, H, V, generator=g, requires_grad=True)
    seg = torch.randint(0, 3, (B, L), generator=g).sort(dim=1).values if docs else None
    mask = _masks(B, S, cp, rank, L, seg)
    import hai.model.attention as A

    monkeypatch.setattr(A, "_Q_BLOCK", 7)  # several query blocks per run in the reference loop
    out = attention(q, k, v, 0.3, mask, impl)
    dy = torch.randn(out.shape, generator=g)
    out.backward(dy)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _dense64(q64, k64, v64, 0.3, mask)
    ref.backward(dy.double())
    assert _rel(out, ref) < 1e-5
    for t, r in ((q, q64), (k, k64), (v, v64)):
        assert _rel(t.grad, r.grad) < 1e-5


@pytest.mark.parametrize("case", ["causal", "zigzag_cp4_rank1", "documents_zigzag_cp2_rank1"])
def test_sdpa_lse_equals_reference(case):
    """The kept log-sum-exp is the same quantity in both cores (the recompute path keeps it across them)."""
    B, S, cp, rank, H, K, V, docs = CASES[case]
    L = S * cp
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(B, S, H, K, generator=g), torch.randn(B, L, H, K, generator=g), \
        torch.randn(B, L, H, V, generator=g)
    seg = torch.randint(0, 3, (B, L), generator=g).sort(dim=1).values if docs else None
    mask = _masks(B, S, cp, rank, L, seg)
    o_r, lse_r = attention_forward(q, k, v, 0.3, mask)
    o_s, lse_s = sdpa_forward(q, k, v, 0.3, mask)
    assert _rel(o_s, o_r) < 1e-6 and _rel(lse_s, lse_r) < 1e-6
    do = torch.randn(o_r.shape, generator=g)
    for a, b in zip(sdpa_backward(q, k, v, o_r, lse_r, do, 0.3, mask),
                    attention_backward(q, k, v, o_r, lse_r, do, 0.3, mask)):
        assert _rel(a, b) < 1e-5


def _cfg(**kw):
    return ModelConfig(**{"max_seq_len": 256, **kw})


def _loss_and_grads(cfg, tokens, recompute="none", doc_spec=None):
    model = build_model(cfg, seed=0, recompute=recompute)
    model.doc_spec = doc_spec
    out = model(tokens)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", ["none", "v3", "full"])
@pytest.mark.parametrize("docs", [False, True])
def test_model_sdpa_equals_reference(recompute, docs):
    tokens = torch.randint(2, 320, (2, 97), generator=torch.Generator().manual_seed(0))
    tokens[0, [20, 50]] = EOS
    tokens[1, 70] = EOS
    spec = DocumentSpec(EOS, mask=True, reset=True) if docs else None
    loss_r, grads_r = _loss_and_grads(_cfg(attention="reference"), tokens, recompute, spec)
    loss_s, grads_s = _loss_and_grads(_cfg(attention="sdpa"), tokens, recompute, spec)
    assert loss_s.item() == pytest.approx(loss_r.item(), rel=1e-5)
    assert grads_s.keys() == grads_r.keys()
    for n in grads_r:
        assert _rel(grads_s[n], grads_r[n]) < 1e-5, n


def test_documents_segments_and_positions():
    t = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    d = documents(t, DocumentSpec(EOS, mask=True, reset=True))
    assert d.segment_BS.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert d.position_BS.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert documents(t, DocumentSpec(EOS)) is None
    assert documents(t, DocumentSpec(EOS, reset=True)).segment_BS is None


def _token_losses(model, tokens_BS):
    """Per-token losses (main (S-1,), MTP depth 1 (S-2,)) of one sequence, in float64 from the logits."""
    main, (mtp,) = model.forward_logits_mtp(tokens_BS)
    lp = main.double().log_softmax(-1)[0]
    lm = mtp.double().log_softmax(-1)[0]
    t = tokens_BS[0]
    return -lp[:-1].gather(1, t[1:, None])[:, 0], -lm[:-1].gather(1, t[2:, None])[:, 0]


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_window_of_two_documents_equals_them_run_separately(impl):
    """Doc A (ends with EOS) then doc B in one window, with document_mask and reset_positions: every position of A
    (up to its EOS, which predicts B's first token) has the loss of A + B[:2] run alone, and every position of B the
    loss of B run alone, for the main head and MTP depth 1 (whose inputs at A's last positions are B's first
    tokens). Without the mask, B's losses change."""
    g = torch.Generator().manual_seed(4)
    a = torch.cat([torch.randint(2, 320, (37,), generator=g), torch.tensor([EOS])])
    b = torch.randint(2, 320, (45,), generator=g)
    window = torch.cat([a, b])[None]
    model = build_model(_cfg(attention=impl, rope_factor=4.0, rope_original_max_seq_len=32), seed=0)
    model.doc_spec = DocumentSpec(EOS, mask=True, reset=True)
    packed_main, packed_mtp = _token_losses(model, window)
    a_main, a_mtp = _token_losses(model, torch.cat([a, b[:2]])[None])
    b_main, b_mtp = _token_losses(model, b[None])
    n = len(a)
    torch.testing.assert_close(packed_main[:n], a_main[:n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_main[n:], b_main, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_mtp[:n], a_mtp[:n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_mtp[n:], b_mtp, rtol=1e-5, atol=1e-6)
    model.doc_spec = None
    unmasked_main, _ = _token_losses(model, window)
    torch.testing.assert_close(unmasked_main[:n - 1], packed_main[:n - 1], rtol=1e-5, atol=1e-6)  # causal: A alone
    assert (unmasked_main[n:] - b_main).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_cuda_equals_reference():
    """The CUDA branch (memory-efficient kernel with the log-sum-exp) against the reference on the same device."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for case in ("causal_v3_dims", "zigzag_cp4_rank3_v3_dims", "documents_zigzag_cp2_rank1"):
        B, S, cp, rank, H, K, V, docs = CASES[case]
        L = S * cp
        q, k, v = (torch.randn(B, n, H, d, generator=g, device="cuda") for n, d in ((S, K), (L, K), (L, V)))
        seg = torch.randint(0, 3, (B, L), generator=g, device="cuda").sort(dim=1).values if docs else None
        mask = _masks(B, S, cp, rank, L, seg)
        o_r, lse_r = attention_forward(q, k, v, 0.3, mask)
        o_s, lse_s = sdpa_forward(q, k, v, 0.3, mask)
        assert _rel(o_s, o_r) < 1e-4 and _rel(lse_s, lse_r) < 1e-4
        do = torch.randn(o_r.shape, generator=g, device="cuda")
        for x, y in zip(sdpa_backward(q, k, v, o_r, lse_r, do, 0.3, mask),
                        attention_backward(q, k, v, o_r, lse_r, do, 0.3, mask)):
            assert _rel(x, y) < 1e-4


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_head_chunks_equal_all_heads_at_once(impl, monkeypatch):
    """V3's recompute region attending one head at a time (a tiny HEAD_CHUNK_BYTES: the long-window path) gives the
    loss and every gradient of all heads at once (rel 1e-5), with documents."""
    import hai.model.attention as A

    tokens = torch.randint(2, 320, (2, 97), generator=torch.Generator().manual_seed(5))
    tokens[0, 30] = tokens[1, 60] = EOS
    spec = DocumentSpec(EOS, mask=True, reset=True)
    loss_all, grads_all = _loss_and_grads(_cfg(attention=impl), tokens, "v3", spec)
    assert build_model(_cfg(), device="meta").layers[0].attn.head_chunks(2, 96, 4) is None
    monkeypatch.setattr(A, "HEAD_CHUNK_BYTES", 1)
    assert build_model(_cfg(), device="meta").layers[0].attn.head_chunks(2, 96, 4) == [(0, 1), (1, 2), (2, 3),
                                                                                         (3, 4)]
    loss_one, grads_one = _loss_and_grads(_cfg(attention=impl), tokens, "v3", spec)
    assert loss_one.item() == pytest.approx(loss_all.item(), rel=1e-5)
    for n in grads_all:
        assert _rel(grads_one[n], grads_all[n]) < 1e-5, n
