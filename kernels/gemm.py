"""Block-scaled FP8 GEMMs: c = a · bᵀ with FP32 promotion every 128 elements of K (DeepSeek-V3 / DeepGEMM style).

For each 128-wide K block kb the fp32 partial product of the e4m3 tiles is multiplied by both operands' scales and
added to an fp32 accumulator:  c[m, n] = Σ_kb (Σ_{k in kb} a[m, k]·b[n, k]) · sa[m, kb] · sb[n (or n//128), kb].

Operand layouts (in the a·bᵀ frame):
  a[M, K] e4m3 with a_scale[M, K/128] (per row per K block: 1x128 tiles, or 128x1 tiles of a transposed operand)
  b[N, K] e4m3 with b_scale[N, K/128] (per row, as a) or b_scale[ceil(N/128), K/128] (128x128 blocks); the shape
  of b_scale selects which. K % 128 == 0 (ValueError otherwise; fp8_linear pads).
Any strides work, but only K-contiguous operands (stride 1 along K, "K-major", DeepGEMM's NT rule on SM90) are copied
asynchronously into shared memory and pipelined: the quantizers write each operand in that layout.
The three training products of y = x·Wᵀ:
  fprop  y[M, N]  = fp8_gemm(x_q, x_s(1x128), W_q, W_s(128x128))
  dgrad  dx[M, K] = fp8_gemm(dy_q, dy_s(1x128), Wᵀ_q, Wᵀ_s)              # quant_128x128(W, transpose=True): 128x128
                                                                          # blocks are square, Wᵀ's bytes are W's
  wgrad  dW[N, K] = fp8_gemm(dyᵀ_q, dyᵀ_s, xᵀ_q, xᵀ_s)                    # quant_128x1(·, transpose=True): 128-token
                                                                          # blocks, written token-contiguous
Grouped (experts): fp8_grouped_gemm splits the rows of a by `tokens_per_expert` (contiguous per-expert layout, empty
groups allowed) against b[E, N, K]; fp8_k_grouped_gemm splits K (tokens, 128-aligned per group) for expert wgrad.
The launchers build their small metadata (tile table, K offsets) on the host and copy it from pinned memory without
waiting (hai.kernels._common.to_device).

Each GEMM comes three ways: dispatching `fp8_*`, typed launcher `fp8_*_triton`, torch reference `fp8_*_ref`
(dequantize per 128-K block in fp32, same order of scale multiplications).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ._common import BLOCK, FP8_DTYPE, FP_FUSION, capability, compiled, tl, to_device, triton, use_triton

__all__ = [
    "fp8_gemm", "fp8_grouped_gemm", "fp8_k_grouped_gemm",
    "fp8_gemm_triton", "fp8_grouped_gemm_triton", "fp8_k_grouped_gemm_triton",
    "fp8_gemm_ref", "fp8_grouped_gemm_ref", "fp8_k_grouped_gemm_ref",
]

Counts = Union[Sequence[int], torch.Tensor]
_OUT_DTYPES = (torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------- Triton
@triton.jit
def _block_scaled_acc(a_ptr, as_ptr, b_ptr, bs_ptr, offs_m, offs_n, mask_m, mask_n, k_blocks,
                      stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                      B_SCALE_DIV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc[BM, BN] = Σ_kb dot(a_kb, b_kbᵀ) · sa[:, kb] · sb[:, kb], one 128-wide K block per step."""
    offs_k = tl.arange(0, 128)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # [BM, 128]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk  # [128, BN]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + (offs_n // B_SCALE_DIV).to(tl.int64) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(k_blocks):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        sa = tl.load(as_ptrs, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptrs, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]  # promotion: scale this block's partial, add (no FMA)
        a_ptrs += 128 * stride_ak
        b_ptrs += 128 * stride_bk
        as_ptrs += stride_ask
        bs_ptrs += stride_bsk
    return acc


@triton.jit
def _store_tile(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_cm, stride_cn, OUT_BF16: tl.constexpr):
    ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    mask = mask_m[:, None] & mask_n[None, :]
    if OUT_BF16:  # round to nearest even on the fp32 bits: the interpreter's fp32->bf16 cast truncates
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        tl.store(ptrs, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                     stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                     stride_cm, stride_cn,
                     B_SCALE_DIV: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = _block_scaled_acc(a_ptr, as_ptr, b_ptr, bs_ptr, offs_m, offs_n, mask_m, mask_n, K // 128,
                            stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                            B_SCALE_DIV, BLOCK_M, BLOCK_N)
    _store_tile(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_cm, stride_cn, OUT_BF16)


@triton.jit
def _fp8_grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tiles_ptr, n_tiles, N, K,
                             stride_am, stride_ak, stride_asm, stride_ask,
                             stride_be, stride_bn, stride_bk, stride_bse, stride_bsn, stride_bsk, stride_cm, stride_cn,
                             B_SCALE_DIV: tl.constexpr, OUT_BF16: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # tiles_3T: (expert, first row, end row of that expert) of each BLOCK_M-row tile of a
    t = tl.program_id(0)
    expert = tl.load(tiles_ptr + t).to(tl.int64)
    row0 = tl.load(tiles_ptr + n_tiles + t)
    row_end = tl.load(tiles_ptr + 2 * n_tiles + t)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < row_end, offs_n < N
    acc = _block_scaled_acc(a_ptr, as_ptr, b_ptr + expert * stride_be, bs_ptr + expert * stride_bse,
                            offs_m, offs_n, mask_m, mask_n, K // 128,
                            stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                            B_SCALE_DIV, BLOCK_M, BLOCK_N)
    _store_tile(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_cm, stride_cn, OUT_BF16)


@triton.jit
def _fp8_k_grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, koff_ptr, M, N,
                               stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn,
                               stride_bsk, stride_ce, stride_cm, stride_cn,
                               B_SCALE_DIV: tl.constexpr, OUT_BF16: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # group g reduces over K columns koff[g] .. koff[g+1] (128-aligned) and writes c[g]; g in int64: g * stride_ce
    # passes 2**31 at V3's expert wgrad sizes (2048 x 7168 per expert: from group 147 on)
    g = tl.program_id(2).to(tl.int64)
    k0 = tl.multiple_of(tl.load(koff_ptr + g).to(tl.int64), 128)  # 128-aligned: the compiler may then copy the
    k1 = tl.load(koff_ptr + g + 1).to(tl.int64)                    # K-major tiles asynchronously (16-byte aligned)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = _block_scaled_acc(a_ptr + k0 * stride_ak, as_ptr + (k0 // 128) * stride_ask,
                            b_ptr + k0 * stride_bk, bs_ptr + (k0 // 128) * stride_bsk,
                            offs_m, offs_n, mask_m, mask_n, (k1 - k0) // 128,
                            stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                            B_SCALE_DIV, BLOCK_M, BLOCK_N)
    _store_tile(c_ptr + g * stride_ce, acc, offs_m, offs_n, mask_m, mask_n, stride_cm, stride_cn, OUT_BF16)


# --------------------------------------------------------------------------------------------------------- checks
def _check_fp8(name: str, q: torch.Tensor, s: torch.Tensor, dims: int) -> None:
    if q.dtype != FP8_DTYPE or q.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D torch.float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}: "
                         f"quantize it with quant_1x128 / quant_128x1 / quant_128x128")
    if s.dtype != torch.float32 or s.dim() != dims:
        raise ValueError(f"{name} scale must be a {dims}-D float32 tensor, got {s.dtype} {tuple(s.shape)}")
    if s.device != q.device:
        raise ValueError(f"{name} is on {q.device} but its scale is on {s.device}: move both to one device")


def _check_k(name: str, K: int) -> None:
    if K % BLOCK != 0:
        raise ValueError(f"{name}: K={K} is not a multiple of {BLOCK} (the scale/promotion block): zero-pad K to "
                         f"{-(-K // BLOCK) * BLOCK} before quantizing (fp8_linear does this)")


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype} is not supported: use torch.bfloat16 or torch.float32 and cast")


def _b_scale_div(b_s: torch.Tensor, N: int, Kb: int, name: str) -> int:
    """1 when b_scale has a row per row of b, 128 when it has one per 128-row block."""
    if tuple(b_s.shape) == (N, Kb):
        return 1
    if tuple(b_s.shape) == (-(-N // BLOCK), Kb):
        return BLOCK
    raise ValueError(f"{name}: b_scale shape {tuple(b_s.shape)} fits neither per-row ({N}, {Kb}) nor 128x128 "
                     f"({-(-N // BLOCK)}, {Kb}) scales for b with N={N}, K={Kb * BLOCK}")


def _check_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype) -> int:
    _check_fp8("fp8_gemm operand a", a, a_s, 2)
    _check_fp8("fp8_gemm operand b", b, b_s, 2)
    (M, K), N = a.shape, b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"fp8_gemm computes a[M, K]·b[N, K]ᵀ: a is {tuple(a.shape)}, b is {tuple(b.shape)}; "
                         f"their K differ (pass b, not bᵀ; use .t() views for transposed products)")
    _check_k("fp8_gemm", K)
    if tuple(a_s.shape) != (M, K // BLOCK):
        raise ValueError(f"fp8_gemm: a_scale must be ({M}, {K // BLOCK}) for a{tuple(a.shape)}, got "
                         f"{tuple(a_s.shape)}")
    _check_out_dtype(out_dtype)
    return _b_scale_div(b_s, N, K // BLOCK, "fp8_gemm")


def _counts(tokens_per_expert: Counts, groups: int, total: int, name: str) -> list[int]:
    counts = [int(c) for c in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
                               else tokens_per_expert)]
    if len(counts) != groups or any(c < 0 for c in counts) or sum(counts) != total:
        raise ValueError(f"{name}: tokens_per_expert={counts} must have {groups} non-negative entries summing to "
                         f"{total} (the rows of the contiguous per-expert layout)")
    return counts


def _check_grouped(a, a_s, b, b_s, tokens_per_expert, out_dtype) -> tuple[int, list[int]]:
    _check_fp8("fp8_grouped_gemm operand a", a, a_s, 2)
    _check_fp8("fp8_grouped_gemm operand b", b, b_s, 3)
    (T, K), (E, N, Kb_) = a.shape, b.shape
    if Kb_ != K:
        raise ValueError(f"fp8_grouped_gemm: a is {tuple(a.shape)} but b is {tuple(b.shape)}; need b[E, N, K={K}]")
    _check_k("fp8_grouped_gemm", K)
    if tuple(a_s.shape) != (T, K // BLOCK):
        raise ValueError(f"fp8_grouped_gemm: a_scale must be ({T}, {K // BLOCK}), got {tuple(a_s.shape)}")
    if b_s.shape[0] != E:
        raise ValueError(f"fp8_grouped_gemm: b_scale {tuple(b_s.shape)} needs a leading expert dim of {E}")
    _check_out_dtype(out_dtype)
    div = _b_scale_div(b_s[0], N, K // BLOCK, "fp8_grouped_gemm") if E else 1
    return div, _counts(tokens_per_expert, E, T, "fp8_grouped_gemm")


def _check_k_grouped(a, a_s, b, b_s, k_per_group, out_dtype) -> tuple[int, list[int]]:
    div = _check_gemm(a, a_s, b, b_s, out_dtype)
    counts = _counts(k_per_group, len(k_per_group), a.shape[1], "fp8_k_grouped_gemm")
    if any(c % BLOCK for c in counts):
        raise ValueError(f"fp8_k_grouped_gemm: every group's K must be a multiple of {BLOCK}, got {counts}: "
                         f"pad each expert's tokens to a multiple of {BLOCK} with zero rows")
    return div, counts


# ------------------------------------------------------------------------------------------------------ launchers
def _launch_opts(t: torch.Tensor, b_scale_div: int) -> dict:
    """Tiles and options; fp_fusion pinned (hai.kernels._common). On sm_100 a 128x128 tile with per-row b scales (the
    weight gradients) spills registers in tcgen05's accumulator round trips; 128x64 does not (hai.kernels.aot)."""
    opts = dict(BLOCK_M=128, BLOCK_N=128, enable_fp_fusion=FP_FUSION)
    if not compiled(t):
        return opts
    if b_scale_div == 1 and capability(t) >= (10, 0):
        opts["BLOCK_N"] = 64
    return dict(opts, num_warps=8, num_stages=3)


def fp8_gemm_triton(a_fp8, a_scale, b_fp8, b_scale, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton launcher: a[M, K]·b[N, K]ᵀ -> c[M, N] (out_dtype) with per-128-K-block scaled fp32 accumulation."""
    div = _check_gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    (M, K), N = a_fp8.shape, b_fp8.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_fp8.device)
    if M == 0 or N == 0:
        return c
    opts = _launch_opts(a_fp8, div)
    grid = (triton.cdiv(M, opts["BLOCK_M"]), triton.cdiv(N, opts["BLOCK_N"]))
    _fp8_gemm_kernel[grid](a_fp8, a_scale, b_fp8, b_scale, c, M, N, K, *a_fp8.stride(), *a_scale.stride(),
                           *b_fp8.stride(), *b_scale.stride(), *c.stride(),
                           B_SCALE_DIV=div, OUT_BF16=out_dtype == torch.bfloat16, **opts)
    return c


def _group_tiles(counts: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """tiles_3T: rows (expert, first row, end row) for each block_m-row tile; empty groups get no tile."""
    experts, starts, ends, row = [], [], [], 0
    for e, c in enumerate(counts):
        for r in range(row, row + c, block_m):
            experts.append(e), starts.append(r), ends.append(row + c)
        row += c
    return to_device(torch.tensor([experts, starts, ends], dtype=torch.int32, device="cpu"), device)


def fp8_grouped_gemm_triton(a_fp8, a_scale, b_fp8, b_scale, tokens_per_expert: Counts,
                            out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton launcher: rows of a[T, K] grouped by expert (contiguous) times b[E, N, K]ᵀ -> c[T, N]."""
    div, counts = _check_grouped(a_fp8, a_scale, b_fp8, b_scale, tokens_per_expert, out_dtype)
    (T, K), N = a_fp8.shape, b_fp8.shape[1]
    c = torch.empty((T, N), dtype=out_dtype, device=a_fp8.device)
    if T == 0 or N == 0:
        return c
    opts = _launch_opts(a_fp8, div)
    tiles_3T = _group_tiles(counts, opts["BLOCK_M"], a_fp8.device)
    n_tiles = tiles_3T.shape[1]
    _fp8_grouped_gemm_kernel[(n_tiles, triton.cdiv(N, opts["BLOCK_N"]))](
        a_fp8, a_scale, b_fp8, b_scale, c, tiles_3T, n_tiles, N, K, *a_fp8.stride(), *a_scale.stride(),
        *b_fp8.stride(), *b_scale.stride(), *c.stride(),
        B_SCALE_DIV=div, OUT_BF16=out_dtype == torch.bfloat16, **opts)
    return c


def fp8_k_grouped_gemm_triton(a_fp8, a_scale, b_fp8, b_scale, k_per_group: Sequence[int],
                              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton launcher: c[g] = a[:, Kg]·b[:, Kg]ᵀ for consecutive 128-aligned K segments Kg -> c[G, M, N]."""
    div, counts = _check_k_grouped(a_fp8, a_scale, b_fp8, b_scale, k_per_group, out_dtype)
    M, N, G = a_fp8.shape[0], b_fp8.shape[0], len(counts)
    c = torch.empty((G, M, N), dtype=out_dtype, device=a_fp8.device)
    if c.numel() == 0:
        return c
    koff = to_device(torch.tensor([0] + counts, device="cpu").cumsum(0).to(torch.int32), a_fp8.device)
    opts = _launch_opts(a_fp8, div)
    grid = (triton.cdiv(M, opts["BLOCK_M"]), triton.cdiv(N, opts["BLOCK_N"]), G)
    _fp8_k_grouped_gemm_kernel[grid](a_fp8, a_scale, b_fp8, b_scale, c, koff, M, N, *a_fp8.stride(),
                                     *a_scale.stride(), *b_fp8.stride(), *b_scale.stride(), *c.stride(),
                                     B_SCALE_DIV=div, OUT_BF16=out_dtype == torch.bfloat16, **opts)
    return c


# ----------------------------------------------------------------------------------------------- torch references
def _row_scales(b_s: torch.Tensor, N: int, div: int) -> torch.Tensor:
    return b_s if div == 1 else b_s.repeat_interleave(BLOCK, dim=-2)[..., :N, :]


def _gemm_fp32_ref(a, a_s, b, b_s_rows) -> torch.Tensor:
    """Σ_kb (a_kb·b_kbᵀ)·sa[:, kb]·sb[:, kb] in fp32, in the kernel's order; b_s_rows has one row per row of b."""
    a32, b32 = a.float(), b.float()
    acc = torch.zeros((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.device)
    for kb in range(a.shape[1] // BLOCK):
        ks = slice(kb * BLOCK, (kb + 1) * BLOCK)
        # three separately rounded ops (x sa, x sb, + acc), never an FMA: the kernels' rule (FP_FUSION, _common)
        acc += (a32[:, ks] @ b32[:, ks].T) * a_s[:, kb, None] * b_s_rows[None, :, kb]
    return acc


def fp8_gemm_ref(a_fp8, a_scale, b_fp8, b_scale, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Torch reference of fp8_gemm."""
    div = _check_gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    return _gemm_fp32_ref(a_fp8, a_scale, b_fp8, _row_scales(b_scale, b_fp8.shape[0], div)).to(out_dtype)


def fp8_grouped_gemm_ref(a_fp8, a_scale, b_fp8, b_scale, tokens_per_expert: Counts,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Torch reference of fp8_grouped_gemm (a loop of per-expert fp8_gemm_ref)."""
    div, counts = _check_grouped(a_fp8, a_scale, b_fp8, b_scale, tokens_per_expert, out_dtype)
    N = b_fp8.shape[1]
    c = torch.zeros((a_fp8.shape[0], N), dtype=torch.float32, device=a_fp8.device)
    row = 0
    for e, n_rows in enumerate(counts):
        rows = slice(row, row + n_rows)
        if n_rows:
            c[rows] = _gemm_fp32_ref(a_fp8[rows], a_scale[rows], b_fp8[e], _row_scales(b_scale[e], N, div))
        row += n_rows
    return c.to(out_dtype)


def fp8_k_grouped_gemm_ref(a_fp8, a_scale, b_fp8, b_scale, k_per_group: Sequence[int],
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference of fp8_k_grouped_gemm (a loop of fp8_gemm_ref over K segments)."""
    div, counts = _check_k_grouped(a_fp8, a_scale, b_fp8, b_scale, k_per_group, out_dtype)
    b_s_rows = _row_scales(b_scale, b_fp8.shape[0], div)
    c = torch.zeros((len(counts), a_fp8.shape[0], b_fp8.shape[0]), dtype=torch.float32, device=a_fp8.device)
    k0 = 0
    for g, k in enumerate(counts):
        ks, kbs = slice(k0, k0 + k), slice(k0 // BLOCK, (k0 + k) // BLOCK)
        if k:
            c[g] = _gemm_fp32_ref(a_fp8[:, ks], a_scale[:, kbs], b_fp8[:, ks], b_s_rows[:, kbs])
        k0 += k
    return c.to(out_dtype)


# ------------------------------------------------------------------------------------------------------- dispatch
def fp8_gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """c[M, N] = a[M, K]·b[N, K]ᵀ with per-128-K-block scaled fp32 accumulation (layouts: module docstring)."""
    fn = fp8_gemm_triton if use_triton(a_fp8) else fp8_gemm_ref
    return fn(a_fp8, a_scale, b_fp8, b_scale, out_dtype)


def fp8_grouped_gemm(a_fp8, a_scale, b_fp8, b_scale, tokens_per_expert: Counts,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """c[T, N]: rows of a[T, K] (contiguous per expert, counts in tokens_per_expert) times b[E, N, K]ᵀ.

    tokens_per_expert is read on the host (a device tensor costs one sync)."""
    fn = fp8_grouped_gemm_triton if use_triton(a_fp8) else fp8_grouped_gemm_ref
    return fn(a_fp8, a_scale, b_fp8, b_scale, tokens_per_expert, out_dtype)


def fp8_k_grouped_gemm(a_fp8, a_scale, b_fp8, b_scale, k_per_group: Sequence[int],
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """c[G, M, N]: c[g] = a[:, Kg]·b[:, Kg]ᵀ over consecutive K segments of k_per_group[g] (% 128 == 0) columns.

    The expert weight-gradient product: a = dyᵀ, b = xᵀ with tokens (K) padded to 128 per expert."""
    fn = fp8_k_grouped_gemm_triton if use_triton(a_fp8) else fp8_k_grouped_gemm_ref
    return fn(a_fp8, a_scale, b_fp8, b_scale, k_per_group, out_dtype)
