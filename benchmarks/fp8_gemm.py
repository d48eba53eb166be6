"""TFLOP/s of HAI's Triton FP8 GEMMs against torch bf16 matmul and torch._scaled_mm (row-wise and block scales).

    python benchmarks/fp8_gemm.py [--warmup-ms 25 --rep-ms 100]

Shapes are DeepGEMM's DeepSeek-V3 ones, M x N x K (c[M, N] = a[M, K]·b[N, K]ᵀ): dense 4096x7168x16384 and
4096x2112x7168 in the fprop layout, the first also in the dgrad layout (b = Wᵀ written transposed by the 128x128
quantizer) and the wgrad layout (both operands 128x1 tiles written token-contiguous by the 128x1 quantizer): every
operand K-contiguous, as the training path quantizes them. Also the grouped 8x4096x4096x7168 (8 experts x 4096 tokens,
N=4096, K=7168). Timings exclude quantization (operands are
pre-quantized, as the GEMM sees them). The last column is the Triton result's relative error against the torch
reference (fp32 per-128-K-block dequantized matmul), a correctness smoke test on the GPU.

Needs a CUDA GPU with FP8 tensor cores (sm_89+). Without one it says so and exits 0; with TRITON_INTERPRET=1 it also
pushes one tiny shape through the Triton interpreter to show the kernels run (no timing).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _tflops(flops: float, ms: float) -> str:
    return f"{flops / ms / 1e9:8.1f}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _bench(fn, warmup_ms: int, rep_ms: int) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms)


def _scaled_mm_rowwise(a_bf16: torch.Tensor, b_bf16: torch.Tensor):
    """A callable for torch._scaled_mm with per-row (a) / per-column (b) fp32 scales, or the reason it is missing."""
    if not hasattr(torch, "_scaled_mm"):
        return None, "torch._scaled_mm missing"
    s_a = a_bf16.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0  # [M, 1]
    s_b = b_bf16.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0  # [N, 1]
    a_q = (a_bf16.float() / s_a).to(torch.float8_e4m3fn)
    b_q = (b_bf16.float() / s_b).to(torch.float8_e4m3fn)
    s_b_1N = s_b.t().contiguous()
    return _probe(lambda: torch._scaled_mm(a_q, b_q.t(), scale_a=s_a, scale_b=s_b_1N, out_dtype=torch.bfloat16))


def _probe(run):
    """(run, "") if this torch/GPU accepts the call, else (None, the reason)."""
    try:
        run()
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - report whatever this torch/GPU refuses
        return None, f"n/a ({type(err).__name__})"
    return run, ""


def _dense_operands(M: int, N: int, K: int, layout: str):
    """Quantized (a, a_s, b, b_s) in the a·bᵀ frame for one training product, plus bf16 a[M, K], b[N, K]."""
    from hai.kernels import quant_1x128, quant_128x1, quant_128x128

    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    if layout == "fprop":
        return (*quant_1x128(a), *quant_128x128(b)), a, b
    if layout == "dgrad":  # b = Wᵀ of W[K, N], its 128x128 blocks written transposed
        return (*quant_1x128(a), *quant_128x128(b.t().contiguous(), transpose=True)), a, b
    # wgrad: a = dyᵀ, b = xᵀ from token-major dy[K, M], x[K, N] (K = tokens), 128x1 tiles written transposed
    return (*quant_128x1(a.t().contiguous(), transpose=True), *quant_128x1(b.t().contiguous(), transpose=True)), a, b


def _scaled_mm_blockwise(a_bf16: torch.Tensor, b_bf16: torch.Tensor):
    """torch._scaled_mm with DeepSeek-V3's block scales (a: 1x128, b: 128x128), where this torch/GPU has it."""
    from hai.kernels import quant_1x128, quant_128x128

    if not hasattr(torch, "_scaled_mm"):
        return None, "torch._scaled_mm missing"
    a_q, a_s = quant_1x128(a_bf16)
    b_q, b_s = quant_128x128(b_bf16)
    a_s_cm = a_s.t().contiguous().t()  # the block-wise layout cuBLAS wants: scales outer-dim-major
    return _probe(lambda: torch._scaled_mm(a_q, b_q.t(), scale_a=a_s_cm, scale_b=b_s.t(), out_dtype=torch.bfloat16))


def _tf(flops: float, ms: float | None):
    return None if ms is None else flops / ms / 1e9


def dense_row(M: int, N: int, K: int, layout: str, args) -> dict:
    """TFLOP/s of one dense training product: HAI's FP8 GEMM, torch bf16, torch._scaled_mm row-wise and block-wise
    (fprop layout only), and the Triton result's error against the torch reference."""
    from hai.kernels.gemm import fp8_gemm_ref, fp8_gemm_triton

    ops, a, b = _dense_operands(M, N, K, layout)
    flops = 2.0 * M * N * K
    row = {"shape": f"{M}x{N}x{K}", "layout": layout,
           "fp8_hai": _tf(flops, _bench(lambda: fp8_gemm_triton(*ops, torch.bfloat16), args.warmup_ms, args.rep_ms)),
           "bf16_torch": _tf(flops, _bench(lambda: a @ b.t(), args.warmup_ms, args.rep_ms))}
    for key, make in (("scaled_mm_rowwise", _scaled_mm_rowwise), ("scaled_mm_blockwise", _scaled_mm_blockwise)):
        run, why = make(a, b) if layout == "fprop" or key == "scaled_mm_rowwise" else (None, "fprop only")
        row[key] = _tf(flops, _bench(run, args.warmup_ms, args.rep_ms)) if run else why
    row["rel_err_vs_ref"] = _rel(fp8_gemm_triton(*ops, torch.float32), fp8_gemm_ref(*ops, torch.float32))
    return row


def grouped_row(E: int, m: int, N: int, K: int, args) -> dict:
    from hai.kernels import quant_1x128, quant_128x128
    from hai.kernels.gemm import fp8_grouped_gemm_ref, fp8_grouped_gemm_triton

    a = torch.randn(E * m, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16)
    ops = (*quant_1x128(a), *quant_128x128(w), [m] * E)
    flops = 2.0 * E * m * N * K
    a_EmK = a.view(E, m, K)
    row = {"shape": f"{E}x{m}x{N}x{K}", "layout": "grouped",
           "fp8_hai": _tf(flops, _bench(lambda: fp8_grouped_gemm_triton(*ops, torch.bfloat16), args.warmup_ms,
                                        args.rep_ms)),
           "bf16_torch": _tf(flops, _bench(lambda: torch.bmm(a_EmK, w.transpose(1, 2)), args.warmup_ms, args.rep_ms))}
    for key, make in (("scaled_mm_rowwise", _scaled_mm_rowwise), ("scaled_mm_blockwise", _scaled_mm_blockwise)):
        runs = [make(a_EmK[e], w[e]) for e in range(E)]
        ok = all(r for r, _ in runs)
        row[key] = _tf(flops, _bench(lambda: [r() for r, _ in runs], args.warmup_ms, args.rep_ms)) if ok \
            else runs[0][1]
    row["rel_err_vs_ref"] = _rel(fp8_grouped_gemm_triton(*ops, torch.float32),
                                 fp8_grouped_gemm_ref(*ops, torch.float32))
    return row


# V3 shapes: the (M x N x K = tokens x out x in) plus DeepGEMM's, and 8 grouped experts
DENSE_SHAPES = [(4096, 7168, 2048, "fprop"), (4096, 2048, 7168, "fprop"), (4096, 7168, 16384, "fprop"),
                (4096, 7168, 16384, "dgrad"), (4096, 7168, 16384, "wgrad"), (4096, 2112, 7168, "fprop")]
GROUPED_SHAPES = [(8, 4096, 4096, 7168), (8, 512, 2048, 7168)]


def gpu_rows(args) -> list[dict]:
    return ([dense_row(M, N, K, layout, args) for M, N, K, layout in DENSE_SHAPES]
            + [grouped_row(E, m, N, K, args) for E, m, N, K in GROUPED_SHAPES])


def format_rows(rows: list[dict]) -> str:
    def cell(v):
        return f"{v:>9.1f}" if isinstance(v, float) else f"{str(v)[:9]:>9}"

    out = [f"{'shape':<22}{'layout':<8}{'fp8 HAI':>9}{'bf16 mm':>9}{'_sc row':>9}{'_sc blk':>9}{'err/ref':>10}"]
    for r in rows:
        out.append(f"{r['shape']:<22}{r['layout']:<8}{cell(r['fp8_hai'])}{cell(r['bf16_torch'])}"
                   f"{cell(r['scaled_mm_rowwise'])}{cell(r['scaled_mm_blockwise'])}{r['rel_err_vs_ref']:>10.1e}")
    return "\n".join(out)


def _gpu_table(args) -> None:
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; TFLOP/s (dense 2·M·N·K), bf16 outputs")
    print(format_rows(gpu_rows(args)))
    print("_sc row / _sc blk = torch._scaled_mm with row-wise fp32 scales / 1x128 x 128x128 block scales (per-group "
          "loop for grouped); fp8 HAI = Triton block-scaled (1x128 x 128x128 or 128x1) GEMM with FP32 promotion "
          "every 128 of K")


def _interpreter_smoke() -> None:
    from hai.kernels.gemm import fp8_gemm_ref, fp8_gemm_triton
    from hai.kernels.quant import quant_1x128, quant_128x128

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    ops = (*quant_1x128(a), *quant_128x128(b))
    err = _rel(fp8_gemm_triton(*ops, torch.float32), fp8_gemm_ref(*ops, torch.float32))
    exact = _rel(fp8_gemm_ref(*ops, torch.float32), a.double() @ b.double().t())
    print(f"interpreter smoke 256x256x256: Triton vs torch reference rel err {err:.1e}; reference vs fp64 product "
          f"of the unquantized operands {exact:.3f} (e4m3)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        _gpu_table(args)
        return 0
    print("benchmarks/fp8_gemm.py needs a CUDA GPU with FP8 tensor cores (sm_89+); none found, so no TFLOP/s table.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_smoke()
    else:
        print("Set TRITON_INTERPRET=1 to push one tiny shape through the Triton interpreter instead.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
