"""The routed experts' bf16/fp32 grouped GEMMs (hai.model.grouped): float64 per-expert references, the per-expert
loop's bits on CPU, the zero-bubble deferral, and one grouped GEMM per weight per pass (no loop over experts)."""

import pytest
import torch
import torch.nn.functional as F

from hai.model import grouped
from hai.model.grouped import (cuda_wgrad_mm, grouped_dgrad, grouped_fprop, grouped_linear, grouped_wgrad,
                               uses_grouped_mm)
from hai.model.moe import GroupedExperts
from hai.model.wgrad import WeightGradStore

COUNTS = [5, 0, 3, 9, 0, 1]  # empty experts included (dropless routing gives some experts no rows)
E, K, N = len(COUNTS), 32, 24


def _operands(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = sum(COUNTS)
    x = torch.randn(R, K, generator=g).to(dtype)
    w = torch.randn(E, N, K, generator=g).to(dtype)
    dy = torch.randn(R, N, generator=g).to(dtype)
    return x, w, dy


def _reference(x, w, dy):
    """float64 per-expert GEMMs."""
    xs, dys = torch.split(x.double(), COUNTS), torch.split(dy.double(), COUNTS)
    y = torch.cat([xe @ w[e].double().t() for e, xe in enumerate(xs)])
    dx = torch.cat([de @ w[e].double() for e, de in enumerate(dys)])
    dw = torch.stack([de.t() @ xe for de, xe in zip(dys, xs)])
    return y, dx, dw


def test_grouped_mm_is_what_runs_on_cpu():
    x, w, _ = _operands()
    assert grouped._GROUPED_MM is not None, "torch.nn.functional.grouped_mm is missing from this torch"
    assert uses_grouped_mm(x, N, K) and uses_grouped_mm(x.bfloat16(), N, K)


def test_the_cuda_calls_pass_torchs_cuda_checks_at_v3_sizes():
    """The three calls the CUDA branch makes, at V3's expert sizes (K=7168, N=2048, 8 local experts), on the meta
    device, whose grouped_mm checks are the CUDA kernel's (bf16 operands, 16-byte strides, output dtype): fprop with
    the transposed weight view, dgrad with the weight, and the wgrad's fp32-output mm per expert (the grouped kernel
    refuses an fp32 output)."""
    E, N_, K_, R = 8, 2048, 7168, 4096
    meta = dict(dtype=torch.bfloat16, device="meta")
    x, w, dy = torch.empty(R, K_, **meta), torch.empty(E, N_, K_, **meta), torch.empty(R, N_, **meta)
    offs = torch.empty(E, dtype=torch.int32, device="meta")
    assert grouped._GROUPED_MM(x, w.transpose(-2, -1), offs=offs).shape == (R, N_)
    assert grouped._GROUPED_MM(dy, w, offs=offs).shape == (R, K_)
    dw = cuda_wgrad_mm(dy, x, [R // E] * E, offs)
    assert dw.shape == (E, N_, K_) and dw.dtype == torch.float32  # one fp32-output mm per expert
    with pytest.raises(RuntimeError, match="bfloat16"):  # why not the grouped kernel: no fp32 output
        grouped._GROUPED_MM(dy.t(), x, offs=offs, out_dtype=torch.float32)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_three_gemms_match_float64_per_expert(dtype, tol):
    x, w, dy = _operands(dtype)
    y_ref, dx_ref, dw_ref = _reference(x, w, dy)
    y, dx, dw = grouped_fprop(x, w, COUNTS), grouped_dgrad(dy, w, COUNTS), grouped_wgrad(dy, x, COUNTS)
    assert y.dtype == dx.dtype == dtype and dw.dtype == torch.float32 and dw.shape == (E, N, K)
    for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert dw[1].abs().max() == 0 and dw[4].abs().max() == 0  # experts without rows: zero gradient


def test_same_bits_as_the_per_expert_loop_on_cpu(monkeypatch):
    """The grouped GEMM changes no number on CPU: the loop it replaces (forced by hiding grouped_mm) gives the same
    bits in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        x, w, dy = _operands(dtype, seed=1)
        fast = (grouped_fprop(x, w, COUNTS), grouped_dgrad(dy, w, COUNTS), grouped_wgrad(dy, x, COUNTS))
        with monkeypatch.context() as m:
            m.setattr(grouped, "_GROUPED_MM", None)
            assert not uses_grouped_mm(x, N, K)
            loop = (grouped_fprop(x, w, COUNTS), grouped_dgrad(dy, w, COUNTS), grouped_wgrad(dy, x, COUNTS))
        for a, b in zip(fast, loop):
            assert torch.equal(a, b)


def test_autocast_computes_in_bf16_like_f_linear():
    x, w, _ = _operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_fprop(x, w, COUNTS)
        ref = torch.cat([F.linear(xe, w[e]) for e, xe in enumerate(torch.split(x, COUNTS))])
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_weight_gradient_is_deferred_to_the_store_and_lands_in_main_grad():
    x, w, dy = _operands()
    _, dx_ref, dw_ref = _reference(x, w, dy)
    weight = torch.nn.Parameter(w.clone())
    weight.main_grad = torch.zeros(E, N, K)
    xin = x.clone().requires_grad_()
    store = WeightGradStore()
    store.recording = True
    grouped_linear(xin, weight, COUNTS, store=store).backward(dy)
    torch.testing.assert_close(xin.grad.double(), dx_ref, rtol=1e-5, atol=1e-4)
    assert weight.main_grad.abs().max() == 0 and weight.grad is None  # only dx so far: dW waits for the W action
    store.close("B")
    store.run("B")
    torch.testing.assert_close(weight.main_grad.double(), dw_ref, rtol=1e-5, atol=1e-4)
    # no store, no optimizer: autograd receives dW like any gradient
    plain = torch.nn.Parameter(w.clone())
    grouped_linear(x, plain, COUNTS).backward(dy)
    torch.testing.assert_close(plain.grad.double(), dw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("recompute", ["none", "v3"])
def test_experts_run_one_grouped_gemm_per_weight_not_a_loop(monkeypatch, recompute):
    """8 experts, forward and backward: 3 fprop + 3 dgrad + 3 wgrad grouped GEMMs in all, no per-expert F.linear,
    and the gradients of the float64 per-expert reference."""
    torch.manual_seed(0)
    experts = GroupedExperts(8, K, N)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    counts = [3, 0, 4, 1, 0, 6, 2, 2]
    x = torch.randn(sum(counts), K, requires_grad=True)
    gate = torch.rand(sum(counts), requires_grad=True)
    calls, real = [], grouped._GROUPED_MM

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(grouped, "_GROUPED_MM", counting)
    monkeypatch.setattr(F, "linear", lambda *a, **kw: pytest.fail("a per-expert F.linear ran"))
    y = experts.gated(x, gate, counts) if recompute == "v3" else experts(x, counts) * gate.unsqueeze(-1)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert len(calls) == 9
    monkeypatch.undo()
    # float64 reference, expert by expert
    xr, gr = x.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    ws = [p.detach().double().requires_grad_() for p in (experts.w1, experts.w3, experts.w2)]
    outs = [F.linear(F.silu(F.linear(xe, ws[0][e])) * F.linear(xe, ws[1][e]), ws[2][e])
            for e, xe in enumerate(torch.split(xr, counts))]
    (torch.cat(outs) * gr.unsqueeze(-1)).backward(dy.double())
    for got, ref in ((x.grad, xr.grad), (gate.grad, gr.grad), (experts.w1.grad, ws[0].grad),
                     (experts.w3.grad, ws[1].grad), (experts.w2.grad, ws[2].grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grouped_experts_match_float64():
    """For the GPU kit (``benchmarks/gpu_check.sh`` runs the gpu tests): the CUDA branch in bf16 (grouped fprop and
    dgrad, the fp32-output wgrad per expert) against float64 per-expert references, with empty experts, group sizes
    that are not multiples of 8 (whether torch's kernel needs padded groups is unknown until this runs) and a
    rank with no rows at all."""
    g = torch.Generator().manual_seed(0)
    E_, N_, K_ = 8, 256, 512
    for counts in ([13, 0, 40, 7, 0, 129, 1, 64], [0] * E_):
        R = sum(counts)
        x, w, dy = (torch.randn(*shape, generator=g) for shape in ((R, K_), (E_, N_, K_), (R, N_)))
        xc, wc, dyc = (t.cuda().bfloat16() for t in (x, w, dy))
        assert uses_grouped_mm(xc, N_, K_)
        weight = torch.nn.Parameter(wc.clone())
        weight.main_grad = torch.zeros(E_, N_, K_, device="cuda")
        xin = xc.clone().requires_grad_()
        y = grouped_linear(xin, weight, counts)
        y.backward(dyc)
        xs, dys = torch.split(xc.double().cpu(), counts), torch.split(dyc.double().cpu(), counts)
        wd = wc.double().cpu()
        ref_y = torch.cat([xe @ wd[e].t() for e, xe in enumerate(xs)])
        ref_dx = torch.cat([de @ wd[e] for e, de in enumerate(dys)])
        ref_dw = torch.stack([de.t() @ xe for de, xe in zip(dys, xs)])
        assert y.dtype == torch.bfloat16 and weight.main_grad.dtype == torch.float32
        for got, ref in ((y, ref_y), (xin.grad, ref_dx)):  # bf16 outputs: one rounding
            scale = ref.abs().max().item() if ref.numel() else 1.0
            torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-2, atol=1e-2 * scale)
        # fp32 wgrad from bf16 operands: the products are exact, only the fp32 sums round
        torch.testing.assert_close(weight.main_grad.double().cpu(), ref_dw, rtol=1e-5, atol=1e-4)
        assert all(weight.main_grad[e].abs().max().item() == 0 for e, c in enumerate(counts) if not c)
