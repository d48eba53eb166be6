"""FP8 kernels: Triton (interpreter on CPU, compiled on CUDA) == torch reference, references vs float64, autograd.

Error bounds (e4m3 keeps 3 mantissa bits: ≤ 2**-4 relative rounding per element, ~2.6% RMS per operand):
  GEMM_ROW_BOUND = 0.07  max over output rows of the row's relative L2 error of the block-scaled reference against
                         the float64 product of the unquantized operands (observed 0.046-0.049 on the blocky data below,
                         seeds 0-4); a missing block scale, a per-tensor scale or shifted block scales give >= 1.0.
  GRAD_BOUND = 0.05      relative Frobenius error of y, dx, dW of fp8_linear / fp8_grouped_linear against float64
                         autograd (observed 0.030-0.037).
  Kernel vs reference: fp32 outputs within 1e-5 relative (observed ~5e-9); bf16 outputs within one bf16 ulp.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / hai.kernels are imported

import subprocess  # noqa: E402
import sys  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import hai.kernels._common as _common  # noqa: E402
from hai.kernels import fp8_grouped_linear, fp8_linear  # noqa: E402
from hai.kernels import gemm as G  # noqa: E402
from hai.kernels import quant as Q  # noqa: E402
from hai.kernels._common import check_fp8_device, tl, triton, use_triton  # noqa: E402

# Triton picks the interpreter when *it* is imported; if something imported it before this file set the variable,
# the kernels cannot run on CPU here (test_interpreter_is_active says so; fix: the same setdefault in conftest.py).
INTERPRET = os.environ["TRITON_INTERPRET"] == "1" and _common._DECORATED_INTERPRETED

DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
GEMM_ROW_BOUND = 0.07
GRAD_BOUND = 0.05
FP8 = torch.float8_e4m3fn


def test_interpreter_is_active():
    if os.environ["TRITON_INTERPRET"] == "1":
        assert _common._DECORATED_INTERPRETED, (
            "triton / hai.kernels were imported before TRITON_INTERPRET=1 was set, so the Triton tests here are "
            "skipped: add os.environ.setdefault('TRITON_INTERPRET', '1') at the top of tests/conftest.py")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(DEVICE)


def _bytes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _fake_quant(t: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """Independent emulation: quantize t (2-D, dims divisible by the block) in br x bc blocks and dequantize (fp64)."""
    M, K = t.shape
    blocks = t.float().reshape(M // br, br, K // bc, bc)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12) / 448.0
    q = (blocks / scale).clamp(-448, 448).to(FP8)
    return (q.double() * scale.double()).reshape(M, K)


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _up(n: int) -> int:
    return -(-n // 128) * 128


# ------------------------------------------------------------------------------------------------------- quantizers
def _saturating_amax() -> float:
    """A value a with fl(a / fl(a / 448)) > 448 in fp32: its block must clamp (saturate) to exactly 448."""
    cands = torch.linspace(1.0, 9.0, 4001)
    hits = cands[(cands / (cands / 448.0)) > 448.0]
    assert hits.numel() > 0
    return hits[0].item()


def _tie_values(n: int, seed: int) -> torch.Tensor:
    """e4m3 values, exact midpoints between neighbours (ties), their fp32 neighbours, subnormal ties, ±0."""
    reps = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    reps = reps[torch.isfinite(reps) & (reps >= 0)].unique()
    mids = (reps[1:] + reps[:-1]) / 2
    pool = torch.cat([reps, mids, torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(-1.0)),
                      torch.tensor([2.0**-10, 3 * 2.0**-10, 2.0**-11, 1e-30, 0.0, -0.0])])
    idx = torch.randint(0, pool.numel(), (n,), generator=_gen(seed))
    sign = torch.where(torch.rand(n, generator=_gen(seed + 1)) < 0.5, -1.0, 1.0)
    return pool[idx] * sign


def _tricky_input(dtype: torch.dtype) -> torch.Tensor:
    """x[384, 384]: blocks of varied magnitude (1e-3..1e3), an all-zero block, a block of ties with scale exactly 1
    (448 on the diagonal, so every 1x128, 128x1 and 128x128 block's amax is 448), and a block whose amax saturates."""
    g = _gen(0)
    x = torch.randn(384, 384, generator=g) * 10 ** (6 * torch.rand(3, 1, 3, 1, generator=g) - 3).expand(
        3, 128, 3, 128).reshape(384, 384)
    x = x * 10 ** (2 * torch.rand(384, 384, generator=g) - 1)  # also varies within 128x1 and 1x128 blocks
    x[:128, :128] = 0.0
    eye = torch.eye(128, dtype=torch.bool)
    ties = _tie_values(128 * 128, seed=1).reshape(128, 128)
    x[128:256, 128:256] = torch.where(eye, 448.0, ties)
    sat = _saturating_amax()
    body = (torch.randn(128, 128, generator=g) * sat / 8).clamp(-sat / 2, sat / 2)
    x[:128, 256:] = torch.where(eye, torch.where(torch.rand(128, generator=g) < 0.5, -sat, sat).diag(), body)
    return x.to(dtype).to(DEVICE)


@triton.jit
def _cast_kernel(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(q_ptr + offs, Q._to_e4m3(x, 1.0), mask=offs < n)


@needs_triton
def test_e4m3_rounding_matches_torch_cast():
    """The kernels' fp32 -> e4m3 step (scale 1) against torch's cast: every e4m3 value, every tie and its fp32
    neighbours, subnormal ties, ±0, and values past 448 that must saturate; both signs."""
    big = torch.tensor([448.0, 448.0001, 463.99, 464.0, 465.0, 480.0, 1e4, 3e38])
    v = torch.cat([_tie_values(20000, seed=2), big, torch.randn(4000, generator=_gen(3)) * 100])
    v = torch.cat([v, -v]).to(DEVICE)
    q = torch.empty(v.shape, dtype=FP8, device=DEVICE)
    _cast_kernel[(triton.cdiv(v.numel(), 8192),)](v, q, v.numel(), BLOCK=8192)
    expected = v.clamp(-448, 448).to(FP8)
    assert torch.equal(_bytes(q), _bytes(expected)), f"{(_bytes(q) != _bytes(expected)).sum()} of {v.numel()} differ"


QUANTIZERS = {  # name -> (triton launcher, torch reference, block rows, block cols)
    "1x128": (Q.quant_1x128_triton, Q.quant_1x128_ref, 1, 128),
    "128x1": (Q.quant_128x1_triton, Q.quant_128x1_ref, 128, 1),
    "128x128": (Q.quant_128x128_triton, Q.quant_128x128_ref, 128, 128),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_quant_kernel_bytes_equal_reference(kind, dtype):
    triton_fn, ref_fn, _, _ = QUANTIZERS[kind]
    x = _tricky_input(dtype)
    q_k, s_k = triton_fn(x)
    q_r, s_r = ref_fn(x)
    assert q_k.dtype == q_r.dtype == FP8 and s_k.dtype == s_r.dtype == torch.float32
    assert torch.equal(_bytes(q_k), _bytes(q_r)), f"{(_bytes(q_k) != _bytes(q_r)).sum()} bytes differ"
    assert torch.equal(s_k, s_r)
    if dtype == torch.float32:  # the special blocks did what they are there for
        assert torch.equal(_bytes(q_k[128:256, 128:256]), _bytes(x[128:256, 128:256].to(FP8)))  # ties, scale 1
        assert torch.equal(_bytes(q_k[:128, 256:].diagonal()) & 0x7F, torch.full((128,), 0x7E, device=DEVICE))
        assert torch.equal(_bytes(q_k[:128, :128]), torch.zeros(128, 128, dtype=torch.uint8, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_quant_scales_and_round_trip(kind):
    """Independent properties: scale = max(amax, 1e-12)/448 per block, the block max maps to ±448, every element
    dequantizes within half an e4m3 ulp (2**-4 relative for normals, 2**-10 * scale for subnormals)."""
    triton_fn, _, br, bc = QUANTIZERS[kind]
    x = _tricky_input(torch.float32)
    q, s = triton_fn(x)
    blocks = x.reshape(384 // br, br, 384 // bc, bc)
    amax = blocks.abs().amax(dim=(1, 3))
    assert torch.equal(s, torch.where(amax > 0, amax, torch.tensor(1e-12, device=DEVICE)) / 448.0)
    qb = q.float().reshape(blocks.shape)
    assert torch.all(qb.abs().amax(dim=(1, 3)) == torch.where(amax > 0, 448.0, 0.0))
    deq = qb * s[:, None, :, None]
    err = (deq - blocks).abs()
    tol = torch.maximum(blocks.abs() * 2.0**-4, s[:, None, :, None] * 2.0**-10) * (1 + 1e-6)
    assert torch.all(err <= tol), f"max excess {(err - tol).max()}"


@pytest.mark.parametrize("fn, x, match", [
    ("quant_1x128", torch.randn(4, 100), r"K=100 is not a multiple of 128.*pad K to 128"),
    ("quant_128x1", torch.randn(100, 128), r"M=100 is not a multiple of 128.*pad M to 128"),
    ("quant_128x128", torch.randn(128, 200), r"K=200 is not a multiple of 128.*pad K to 256"),
    ("quant_128x128", torch.randn(130, 128), r"N=130 is not a multiple of 128"),
    ("quant_1x128", torch.ones(4, 128, dtype=torch.int32), r"dtype torch.int32 is not supported"),
    ("quant_1x128", torch.randn(256, 256).t(), r"not contiguous.*\.contiguous\(\)"),
    ("quant_1x128", torch.randn(2, 4, 128), r"must be 2-D, got shape \(2, 4, 128\)"),
])
def test_quant_rejects_bad_inputs(fn, x, match):
    for variant in (fn, fn + "_triton", fn + "_ref"):
        with pytest.raises(ValueError, match=match):
            getattr(Q, variant)(x)


# ------------------------------------------------------------------------------------------------------------- GEMMs
def _gemm_operands(product: str):
    """(a_q, a_s, b_q, b_s, exact fp64 a·bᵀ of the unquantized operands) for the three training products."""
    x, w, dy = _randn(200, 384, seed=1), _randn(256, 384, seed=2), _randn(256, 256, seed=3)
    if product == "fprop":  # y = x·Wᵀ: x 1x128, W 128x128
        return (*Q.quant_1x128_ref(x), *Q.quant_128x128_ref(w), x.double() @ w.double().T)
    if product == "dgrad":  # dx = dy·W: dy 1x128, Wᵀ from W's bytes and transposed block scales
        w_q, w_s = Q.quant_128x128_ref(w)
        return (*Q.quant_1x128_ref(dy[:200].contiguous()), w_q.t(), w_s.t(), dy[:200].double() @ w.double())
    x_tok = _randn(256, 384, seed=4)  # wgrad dW = dyᵀ·x: both 128x1 along the 256 tokens (transposed views)
    dy_q, dy_s = Q.quant_128x1_ref(dy)
    x_q, x_s = Q.quant_128x1_ref(x_tok)
    return dy_q.t(), dy_s.t(), x_q.t(), x_s.t(), dy.double().T @ x_tok.double()


def _assert_kernel_close(c_k: torch.Tensor, c_r: torch.Tensor) -> None:
    assert c_k.dtype == c_r.dtype and c_k.shape == c_r.shape
    if c_k.dtype == torch.float32:
        assert _rel(c_k, c_r) < 1e-5
        assert (c_k - c_r).abs().max() <= 1e-5 * c_r.abs().max()
    else:  # both round the same fp32 value up to accumulation order: at most one bf16 ulp apart
        torch.testing.assert_close(c_k.float(), c_r.float(), rtol=2.0**-7, atol=1e-30)


def _assert_bf16_is_rounded_fp32(c_bf16: torch.Tensor, c_fp32: torch.Tensor) -> None:
    """A kernel's bf16 output is its own fp32 result rounded to nearest even (what torch's cast does)."""
    assert torch.equal(c_bf16.view(torch.int16), c_fp32.to(torch.bfloat16).view(torch.int16))


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("product", ["fprop", "dgrad", "wgrad"])
def test_gemm_kernel_matches_reference(product, out_dtype):
    a_q, a_s, b_q, b_s, exact = _gemm_operands(product)
    c_k = G.fp8_gemm_triton(a_q, a_s, b_q, b_s, out_dtype)
    c_r = G.fp8_gemm_ref(a_q, a_s, b_q, b_s, out_dtype)
    _assert_kernel_close(c_k, c_r)
    if out_dtype == torch.bfloat16:
        _assert_bf16_is_rounded_fp32(c_k, G.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.float32))
    assert _rel(c_r, exact) < GRAD_BOUND  # gaussian data: ~0.037


def _max_row_err(c: torch.Tensor, exact: torch.Tensor) -> float:
    return ((c.double() - exact).norm(dim=1) / exact.norm(dim=1)).max().item()


def _blocky_operands(seed: int):
    """a[256, 384]: each 1x128 block scaled by 10**U(-1, 1), every 16th row (token) an outlier x1e5;
    b[256, 384]: each 128x128 block scaled by 10**U(-1, 1)."""
    g = _gen(seed)
    a = torch.randn(256, 384, generator=g) * (10 ** (2 * torch.rand(256, 3, 1, generator=g) - 1)).expand(
        256, 3, 128).reshape(256, 384)
    a[::16] *= 1e5
    b = torch.randn(256, 384, generator=g) * (10 ** (2 * torch.rand(2, 1, 3, 1, generator=g) - 1)).expand(
        2, 128, 3, 128).reshape(256, 384)
    return a.to(DEVICE), b.to(DEVICE)


@pytest.mark.parametrize("seed", [0, 1])
def test_gemm_reference_error_bound_catches_wrong_scales(seed):
    a, b = _blocky_operands(seed)
    exact = a.double() @ b.double().T
    a_q, a_s = Q.quant_1x128_ref(a)
    b_q, b_s = Q.quant_128x128_ref(b)
    assert _max_row_err(G.fp8_gemm_ref(a_q, a_s, b_q, b_s, torch.float32), exact) < GEMM_ROW_BOUND
    missing = a_s.clone()
    missing[:, 1] = 1.0  # forgot to multiply K block 1 by its scale
    shifted = b_s.roll(1, dims=1)  # b's block scales applied to the wrong K blocks
    s_tensor = a.abs().max() / 448.0  # one scale for the whole tensor
    a_pt = (a / s_tensor).clamp(-448, 448).to(FP8)
    broken = {
        "missing block scale": G.fp8_gemm_ref(a_q, missing, b_q, b_s, torch.float32),
        "shifted block scales": G.fp8_gemm_ref(a_q, a_s, b_q, shifted, torch.float32),
        "per-tensor scale": G.fp8_gemm_ref(a_pt, torch.full_like(a_s, s_tensor.item()), b_q, b_s, torch.float32),
    }
    for name, c in broken.items():
        assert _max_row_err(c, exact) > 10 * GEMM_ROW_BOUND, name


def _grouped_operands(counts: list[int]):
    T, E, N, K = sum(counts), len(counts), 256, 256
    x, w = _randn(T, K, seed=5), _randn(E, N, K, seed=6)
    x_q, x_s = Q.quant_1x128_ref(x)
    w_q, w_s = Q.quant_128x128_ref(w.reshape(E * N, K))
    bounds = torch.tensor([0] + counts).cumsum(0).tolist()
    exact = torch.cat([x[bounds[e]:bounds[e + 1]].double() @ w[e].double().T for e in range(E)])
    return x_q, x_s, w_q.view(E, N, K), w_s.view(E, N // 128, K // 128), exact


@needs_triton
def test_grouped_gemm_kernel_matches_reference_with_empty_and_unaligned_groups():
    counts = [100, 0, 156, 30, 0]
    x_q, x_s, w_q, w_s, exact = _grouped_operands(counts)
    c_k = {}
    for out_dtype in (torch.float32, torch.bfloat16):
        c_k[out_dtype] = G.fp8_grouped_gemm_triton(x_q, x_s, w_q, w_s, counts, out_dtype)
        c_r = G.fp8_grouped_gemm_ref(x_q, x_s, w_q, w_s, torch.tensor(counts), out_dtype)
        _assert_kernel_close(c_k[out_dtype], c_r)
    _assert_bf16_is_rounded_fp32(c_k[torch.bfloat16], c_k[torch.float32])
    assert _rel(c_r, exact) < GRAD_BOUND
    empty = G.fp8_grouped_gemm_triton(x_q[:0], x_s[:0], w_q, w_s, [0] * 5)
    assert empty.shape == (0, 256)


@needs_triton
def test_k_grouped_gemm_kernel_matches_reference():
    counts = [128, 0, 256]
    dy, x = _randn(384, 256, seed=7), _randn(384, 128, seed=8)
    dy_q, dy_s = Q.quant_128x1_ref(dy)
    x_q, x_s = Q.quant_128x1_ref(x)
    args = (dy_q.t(), dy_s.t(), x_q.t(), x_s.t(), counts)
    c_k, c_r = G.fp8_k_grouped_gemm_triton(*args), G.fp8_k_grouped_gemm_ref(*args)
    _assert_kernel_close(c_k, c_r)
    assert torch.equal(c_k[1], torch.zeros_like(c_k[1]))
    assert _rel(c_r[2], dy[128:].double().T @ x[128:].double()) < GRAD_BOUND


def test_gemm_rejects_bad_operands():
    q, s = Q.quant_1x128_ref(torch.randn(4, 256))
    w_q, w_s = Q.quant_128x128_ref(torch.randn(128, 256))
    with pytest.raises(ValueError, match=r"a is \(4, 256\), b is \(256, 128\); their K differ"):
        G.fp8_gemm(q, s, w_q.t(), w_s.t())
    with pytest.raises(ValueError, match=r"K=100 is not a multiple of 128.*zero-pad K to 128"):
        G.fp8_gemm(q[:, :100], s, w_q[:, :100], w_s)
    with pytest.raises(ValueError, match=r"a_scale must be \(4, 2\)"):
        G.fp8_gemm(q, s[:, :1], w_q, w_s)
    with pytest.raises(ValueError, match=r"b_scale shape \(2, 2\) fits neither"):
        G.fp8_gemm(q, s, w_q, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"float8_e4m3fn"):
        G.fp8_gemm(q.float(), s, w_q, w_s)
    with pytest.raises(ValueError, match=r"out_dtype=torch.float16"):
        G.fp8_gemm(q, s, w_q, w_s, torch.float16)
    with pytest.raises(ValueError, match=r"tokens_per_expert=\[3, 0\] must have 2 .* summing to 4"):
        G.fp8_grouped_gemm(q, s, w_q.expand(2, -1, -1), w_s.expand(2, -1, -1), [3, 0])
    with pytest.raises(ValueError, match=r"every group's K must be a multiple of 128, got \[64, 192\]"):
        G.fp8_k_grouped_gemm(q, s, q, s, [64, 192])


# ------------------------------------------------------------------------------------------------- K-major layouts
def _magnitudes(*shape, seed: int) -> torch.Tensor:
    """Gaussian data whose 128-blocks differ in magnitude by up to 10**3 (so a wrongly placed scale shows)."""
    g = _gen(seed)
    return (torch.randn(*shape, generator=g) * 10 ** (3 * torch.rand(*shape, generator=g))).to(DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_128x1_writes_the_same_bytes_token_contiguous(dtype):
    x = _magnitudes(384, 256, seed=30).to(dtype)  # M=384 tokens, K=256 columns
    q, s = Q.quant_128x1_triton(x)
    for fn in (Q.quant_128x1_triton, Q.quant_128x1_ref):
        q_t, s_t = fn(x, transpose=True)
        assert q_t.shape == (256, 384) and q_t.is_contiguous()
        assert torch.equal(_bytes(q_t), _bytes(q.t())), fn.__name__
        assert s_t.shape == (256, 3) and s_t.stride() == (1, 256) and torch.equal(s_t, s.t())  # MN-major scales


@needs_triton
@pytest.mark.parametrize("shape", [(256, 384), (3, 256, 384)])
def test_transposed_128x128_writes_each_blocks_bytes_k_major(shape):
    w = _magnitudes(*shape, seed=31)
    per_matrix = [Q.quant_128x128_ref(m) for m in w.reshape(-1, *shape[-2:])]
    for fn in (Q.quant_128x128_triton, Q.quant_128x128_ref):
        q, s = fn(w)
        q_t, s_t = fn(w, transpose=True)
        assert q_t.shape == (*shape[:-2], 384, 256) and q_t.is_contiguous() and s_t.is_contiguous()
        for i, (q_m, s_m) in enumerate(per_matrix):
            assert torch.equal(_bytes(q.reshape(-1, 256, 384)[i]), _bytes(q_m)), fn.__name__
            assert torch.equal(_bytes(q_t.reshape(-1, 384, 256)[i]), _bytes(q_m.t())), fn.__name__
            assert torch.equal(s_t.reshape(-1, 3, 2)[i], s_m.t()) and torch.equal(s.reshape(-1, 2, 3)[i], s_m)


def _k_major_operands(product: str):
    """The dgrad / wgrad operands of _gemm_operands as the quantizers now write them (contiguous along K)."""
    w, dy, x_tok = _randn(256, 384, seed=2), _randn(256, 256, seed=3), _randn(256, 384, seed=4)
    if product == "dgrad":
        return (*Q.quant_1x128_ref(dy[:200].contiguous()), *Q.quant_128x128_ref(w, transpose=True))
    return (*Q.quant_128x1_ref(dy, transpose=True), *Q.quant_128x1_ref(x_tok, transpose=True))


@needs_triton
@pytest.mark.parametrize("product", ["dgrad", "wgrad"])
def test_k_major_operands_give_bitwise_the_same_gemm(product):
    """The K-major operands hold the values of the transposed views they replace: the kernel's fp32 and bf16 results
    are bitwise unchanged, and still match the reference."""
    views, k_major = _gemm_operands(product)[:4], _k_major_operands(product)
    assert all(q.stride(1) == 1 for q in k_major[::2]) and not all(q.stride(1) == 1 for q in views[::2])
    for v, k in zip(views, k_major):
        assert torch.equal(v.float(), k.float())
    for out_dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        c_k = G.fp8_gemm_triton(*k_major, out_dtype)
        assert torch.equal(c_k.view(bits), G.fp8_gemm_triton(*views, out_dtype).view(bits))
        _assert_kernel_close(c_k, G.fp8_gemm_ref(*k_major, out_dtype))


@needs_triton
def test_promotion_rounds_each_step_like_the_reference():
    """With exact K-block dot products (small integers), only the promotion rounds: (dot·sa)·sb, then + acc. The
    kernel (enable_fp_fusion=False at every launch: hai.kernels._common.FP_FUSION) and the reference round each step
    alike, so they agree bitwise; a fused multiply-add (what fp_fusion=True compiles on a GPU) differs on this data."""
    g = _gen(40)
    a_q = torch.randint(-4, 5, (128, 512), generator=g).float().to(FP8).to(DEVICE)
    b_q = torch.randint(-4, 5, (128, 512), generator=g).float().to(FP8).to(DEVICE)
    a_s, b_s = (torch.rand(128, 4, generator=g).to(DEVICE) + 0.5 for _ in range(2))  # per-row scales of a and b
    c_k = G.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.float32)
    c_r = G.fp8_gemm_ref(a_q, a_s, b_q, b_s, torch.float32)
    assert torch.equal(c_k, c_r)
    fused = torch.zeros(128, 128, dtype=torch.float64, device=DEVICE)
    for kb in range(4):
        ks = slice(kb * 128, (kb + 1) * 128)
        t = (a_q[:, ks].double() @ b_q[:, ks].double().T).float() * a_s[:, kb, None]  # exact dot, one rounding
        fused = (t.double() * b_s[None, :, kb].double() + fused).float().double()  # fma: one rounding for both
    assert not torch.equal(fused.float(), c_r)


# ---------------------------------------------------------------------------------------------- device and host
def test_fp8_is_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"capability 8\.9 or newer.*cuda:0 \(NVIDIA A100-SXM4-80GB\) has capability "
                                         r"8\.0: set model\.precision=bf16"):
        check_fp8_device("cuda:0")
    check_fp8_device("cpu")  # the interpreter / torch reference run anywhere
    a100_tensor = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert not use_triton(a100_tensor)  # the dispatch sends it to the torch reference, never to an fp8e4nv kernel
    for cap in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        check_fp8_device(torch.device("cuda", 0))
        assert use_triton(a100_tensor) == _common.HAS_TRITON


def test_launchers_copy_no_pageable_host_memory_and_wait_for_nothing():
    """Every launch at V3 sizes (hai.kernels.aot's sites, on meta tensors, launches captured): the tile tables, K
    offsets and row maps reach the device from pinned memory, and no launcher reads device data on the host."""
    pytest.importorskip("triton")
    from hai.kernels import aot
    from host_syncs import count_host_syncs

    with count_host_syncs() as syncs:
        launches = aot.record_launches()
    assert len(launches) > 100 and {ln.site.split(" ", 1)[1] for ln in launches} >= {"fprop", "dgrad", "wgrad"}
    assert syncs.total == 0, dict(syncs.counts)


# ---------------------------------------------------------------------------------------------------------- autograd
def _emulated_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, dy_MN: torch.Tensor):
    """fp64 (y, dx, dW) of V3's recipe from _fake_quant: fprop x(1x128)·W(128x128)ᵀ, dgrad dy(1x128)·W(128x128),
    wgrad dy(128x1)ᵀ·x(128x1) where x is the cached 1x128 copy re-quantized in 128x1 tiles (V3's workflow); K, N
    and tokens zero-padded to multiples of 128."""
    (M, K), N = x_MK.shape, w_NK.shape[0]
    Mp, Kp, Np = _up(M), _up(K), _up(N)
    x_p, w_p, dy_p = _pad(x_MK, Mp, Kp), _pad(w_NK, Np, Kp), _pad(dy_MN, Mp, Np)
    w_d = _fake_quant(w_p, 128, 128)
    y = _fake_quant(x_p, 1, 128) @ w_d.T
    dx = _fake_quant(dy_p, 1, 128) @ w_d
    dw = _fake_quant(dy_p, 128, 1).T @ _fake_quant(_fake_quant(x_p, 1, 128), 128, 1)
    return y[:M, :N], dx[:M, :K], dw[:N, :K]


def _fp64_linear(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = x64 @ w64.T
    y64.backward(dy.double())
    return y64.detach(), x64.grad, w64.grad


@needs_triton
@pytest.mark.parametrize("x_shape, n, dtype", [
    ((256, 256), 256, torch.float32),
    ((2, 5, 64), 96, torch.float32),  # tiny model: hidden 64 pads K to 128, 10 tokens pad to 128
    ((300, 200), 130, torch.float32),
    ((3, 50, 192), 160, torch.bfloat16),
])
def test_fp8_linear_matches_emulation_and_float64(x_shape, n, dtype):
    k = x_shape[-1]
    x = _randn(*x_shape, seed=9).to(dtype).requires_grad_()
    w = (_randn(n, k, seed=10) / k**0.5).to(dtype).requires_grad_()
    y = fp8_linear(x, w)
    dy = _randn(*y.shape, seed=11).to(dtype)
    y.backward(dy)
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype and y.shape == (*x_shape[:-1], n)
    emul = _emulated_linear(x.detach().reshape(-1, k), w.detach(), dy.reshape(-1, n))
    exact = _fp64_linear(x.reshape(-1, k), w, dy.reshape(-1, n))
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16 outputs: rounding of the result only
    for name, got, e, ex in zip(("y", "dx", "dW"), (y, x.grad, w.grad), emul, exact):
        got = got.reshape(e.shape)
        assert _rel(got, e) < tol, name
        assert _rel(got, ex) < GRAD_BOUND, name


@needs_triton
def test_fp8_linear_weight_grad_only_and_no_grad():
    x, w = _randn(130, 64, seed=12), _randn(64, 64, seed=13).requires_grad_()
    with torch.no_grad():
        y0 = fp8_linear(x, w)
    y = fp8_linear(x, w)
    assert torch.equal(y0, y)
    dy = _randn(130, 64, seed=14)
    y.backward(dy)
    assert _rel(w.grad, _emulated_linear(x, w.detach(), dy)[2]) < 1e-5


@needs_triton
@pytest.mark.parametrize("counts", [[100, 0, 156, 30], [0, 0, 5]])
def test_fp8_grouped_linear_matches_emulation_and_float64(counts):
    T, E, N, K = sum(counts), len(counts), 96, 192
    x = _randn(T, K, seed=15).requires_grad_()
    w = (_randn(E, N, K, seed=16) / K**0.5).requires_grad_()
    y = fp8_grouped_linear(x, w, torch.tensor(counts))
    dy = _randn(T, N, seed=17)
    y.backward(dy)
    bounds = torch.tensor([0] + counts).cumsum(0).tolist()
    per_expert = [(slice(bounds[e], bounds[e + 1]), e) for e in range(E)]
    emul = [_emulated_linear(x.detach()[r], w.detach()[e], dy[r]) for r, e in per_expert]
    exact = [_fp64_linear(x[r], w[e], dy[r]) for r, e in per_expert]
    for i, (name, got) in enumerate((("y", y), ("dx", x.grad))):
        assert _rel(got, torch.cat([em[i] for em in emul])) < 1e-5, name
        assert _rel(got, torch.cat([ex[i] for ex in exact])) < GRAD_BOUND, name
    assert _rel(w.grad, torch.stack([em[2] for em in emul])) < 1e-5
    assert _rel(w.grad, torch.stack([ex[2] for ex in exact])) < GRAD_BOUND
    assert torch.equal(w.grad[counts.index(0)], torch.zeros(N, K, device=DEVICE))


def test_fp8_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"got x \(4, 64\), weight \(32, 48\)"):
        fp8_linear(torch.randn(4, 64), torch.randn(32, 48))
    with pytest.raises(ValueError, match=r"tokens_per_expert=\[2, 3\] must have E=2 .* summing to T=4"):
        fp8_grouped_linear(torch.randn(4, 64), torch.randn(2, 32, 64), [2, 3])
    with pytest.raises(ValueError, match=r"x\[T, K\] and w\[E, N, K\]"):
        fp8_grouped_linear(torch.randn(4, 64), torch.randn(32, 64), [4])


# ---------------------------------------------------------------------------------------------------------- dispatch
def test_dispatch_uses_torch_reference_without_interpreter(monkeypatch):
    """Plain CPU (no TRITON_INTERPRET): every op takes its torch reference and never touches a Triton launcher."""
    def refuse(*args, **kwargs):
        raise AssertionError("Triton launcher called on the CPU reference path")

    for name in ("quant_1x128", "quant_128x1", "quant_128x128"):
        monkeypatch.setattr(Q, name + "_triton", refuse)
    for name in ("fp8_gemm", "fp8_grouped_gemm", "fp8_k_grouped_gemm"):
        monkeypatch.setattr(G, name + "_triton", refuse)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(10, 64, requires_grad=True), torch.randn(96, 64, requires_grad=True)
    y = fp8_linear(x, w)
    dy = torch.randn(10, 96)
    y.backward(dy)
    for got, e in zip((y, x.grad, w.grad), _emulated_linear(x.detach(), w.detach(), dy)):
        assert _rel(got, e) < 1e-5
    xg, wg = torch.randn(7, 64, requires_grad=True), torch.randn(2, 32, 64, requires_grad=True)
    fp8_grouped_linear(xg, wg, [3, 4]).sum().backward()
    assert wg.grad.abs().sum() > 0


@pytest.mark.skipif(not INTERPRET or DEVICE != "cpu", reason="checks the interpreter dispatch on CPU")
def test_dispatch_uses_triton_under_interpreter(monkeypatch):
    calls = []
    for mod, name in ((Q, "quant_1x128_triton"), (G, "fp8_gemm_triton")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    fp8_linear(torch.randn(4, 128), torch.randn(128, 128))
    assert calls == ["quant_1x128_triton", "fp8_gemm_triton"]


# --------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernels_on_gpu():
    """Re-run this file with compiled Triton kernels on CUDA tensors (DEVICE='cuda' there)."""
    if DEVICE == "cuda":
        pytest.skip("this process already runs every test compiled on CUDA")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-m", "not gpu", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
