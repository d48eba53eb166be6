"""GPU check kit: everything that can only be proven on a GPU, in one run, as one JSON file and a readable table.

    bash benchmarks/gpu_check.sh [OUT.json]         # one NVIDIA GPU; finishes in well under 8 minutes
    python benchmarks/gpu_check.py --smoke          # CPU: the same code paths at toy sizes (a test runs this)

Sections:

1. ``gpu_tests``: ``pytest -m gpu`` (the ``gpu``-marked tests: tests/test_fp8_kernels.py re-run with compiled
   Triton kernels on CUDA tensors);
2. ``kernels``: every Triton kernel compiled (not interpreted) against its torch reference: quantizers (bytes equal,
   scales' relative error) and the dense / grouped / K-grouped FP8 GEMMs (relative error);
3. ``gemm``: FP8 GEMM TFLOP/s at DeepSeek-V3 shapes (4096x7168x2048, 4096x2048x7168, DeepGEMM's, 8 grouped experts)
   against torch bf16 matmul and ``torch._scaled_mm`` with row-wise and 1x128/128x128 block scales where this torch
   has them (``benchmarks/fp8_gemm.py``);
4. ``train``: a 50-step single-GPU ``hai train model=small`` in bf16 and in fp8: final loss, tokens/s, MFU and peak
   memory (``torch.cuda.max_memory_allocated``), next to ``hai plan``'s prediction for the same layout.

Nothing in CI depends on a GPU: without one, ``--smoke`` runs sections 2 and 4 on CPU (interpreter, tiny model) so
the kit itself is tested, and says which sections need a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _env(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gb=p.total_memory / 1e9,
                    cuda=torch.version.cuda)
    return info


def _gpu_tests() -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=420,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "tail": tail,
            "seconds": time.time() - t0}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _kernels(device: str, smoke: bool) -> list[dict]:
    """Triton launcher vs torch reference for every kernel, on ``device``."""
    import torch

    from hai.kernels import gemm as G
    from hai.kernels import quant as Q

    g = torch.Generator(device=device).manual_seed(0)
    M, N, K = (256, 256, 256) if smoke else (4096, 2048, 7168)
    rows = []
    x = torch.randn(M, K, device=device, generator=g, dtype=torch.bfloat16)
    for name in ("quant_1x128", "quant_128x1", "quant_128x128"):
        (q_t, s_t), (q_r, s_r) = getattr(Q, name + "_triton")(x), getattr(Q, name + "_ref")(x)
        rows.append({"kernel": name, "bytes_equal": (q_t.view(torch.uint8) == q_r.view(torch.uint8)).float()
                     .mean().item(), "scale_rel_err": _rel(s_t, s_r)})
    a = (*Q.quant_1x128_ref(x), *Q.quant_128x128_ref(torch.randn(N, K, device=device, generator=g)))
    rows.append({"kernel": "fp8_gemm", "rel_err": _rel(G.fp8_gemm_triton(*a, torch.float32),
                                                       G.fp8_gemm_ref(*a, torch.float32))})
    E = 4
    w_q, w_s = Q.quant_128x128_ref(torch.randn(E * N, K, device=device, generator=g))
    counts = [M // 2, 0, M // 4, M // 4]
    ga = (*Q.quant_1x128_ref(x), w_q.view(E, N, K), w_s.view(E, N // 128, K // 128), counts)
    rows.append({"kernel": "fp8_grouped_gemm", "rel_err": _rel(G.fp8_grouped_gemm_triton(*ga, torch.float32),
                                                               G.fp8_grouped_gemm_ref(*ga, torch.float32))})
    dy, xt = torch.randn(M, N, device=device, generator=g), torch.randn(M, K, device=device, generator=g)
    dq, ds = Q.quant_128x1_ref(dy)
    xq, xs = Q.quant_128x1_ref(xt)
    ka = (dq.t(), ds.t(), xq.t(), xs.t(), [M // 2, 0, M // 2])
    rows.append({"kernel": "fp8_k_grouped_gemm", "rel_err": _rel(G.fp8_k_grouped_gemm_triton(*ka),
                                                                 G.fp8_k_grouped_gemm_ref(*ka))})
    return rows


def _gemm_tflops() -> list[dict]:
    import fp8_gemm

    return fp8_gemm.gpu_rows(argparse.Namespace(warmup_ms=25, rep_ms=100))


def _train(device: str, smoke: bool, out_dir: str) -> list[dict]:
    """Short training runs through the CLI, each next to hai plan's prediction for the same layout."""
    from hai.config.compose import compose
    from hai.train.metrics import read_metrics
    from hai.plan import plan

    if smoke:
        layout = ["model=tiny", "cluster=cpu1", "parallel=single", "train=test", "train.steps=3"]
    else:
        layout = ["model=small", "cluster=gpu1", "parallel=single", "train.steps=50", "train.seq_len=1024",
                  "train.global_batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=10"]
    rows = []
    for precision in ("bf16", "fp8"):
        run = os.path.join(out_dir, precision)
        ov = [*layout, f"model.precision={precision}", "wandb.mode=disabled", "train.progress=false",
              f"out_dir={run}"]
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "hai.cli", "train", *ov], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})  # smoke: torch ref
        row = {"precision": precision, "returncode": proc.returncode, "seconds": time.time() - t0}
        if proc.returncode != 0:
            row["error"] = (proc.stdout + proc.stderr)[-2000:]
            rows.append(row)
            continue
        steps = read_metrics(run)
        timed = steps[min(5, len(steps) - 1):]
        pred = plan(compose(ov), build_topology=False)
        row.update(steps=len(steps), first_loss=steps[0]["loss"], final_loss=steps[-1]["loss"],
                   tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
                   mfu=statistics.median(r["mfu"] for r in timed),
                   peak_memory_gb=max(r["memory_bytes"] for r in steps) / 1e9,
                   plan_tokens_per_s=pred["throughput"]["tokens_per_s_per_gpu"], plan_mfu=pred["throughput"]["mfu_bf16"],
                   plan_memory_gb=pred["memory"]["total"] / 1e9)
        rows.append(row)
    return rows


def _table(report: dict) -> str:
    out = [f"== GPU check ({report['env'].get('gpu', report['env']['device'])}, torch {report['env']['torch']}, "
           f"triton {report['env']['triton']})"]
    t = report.get("gpu_tests")
    out.append(f"gpu tests: {t['summary']} (rc {t['returncode']}, {t['seconds']:.0f} s)" if t else
               "gpu tests: not run (no GPU)")
    for k in report["kernels"]:
        detail = (f"bytes equal {k['bytes_equal']:.6f}, scale rel err {k['scale_rel_err']:.1e}" if "bytes_equal" in k
                  else f"rel err {k['rel_err']:.1e}")
        out.append(f"kernel {k['kernel']:<20} {detail}")
    if report.get("gemm"):
        import fp8_gemm

        out.append(fp8_gemm.format_rows(report["gemm"]))
    else:
        out.append("gemm TFLOP/s: not run (no GPU)")
    for r in report["train"]:
        if r["returncode"]:
            out.append(f"train {r['precision']}: FAILED (rc {r['returncode']}): {r['error'][-300:]}")
            continue
        out.append(f"train {r['precision']:<5} {r['steps']} steps: loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}; "
                   f"{r['tokens_per_s']:,.0f} tok/s (plan {r['plan_tokens_per_s']:,.0f}); MFU {100 * r['mfu']:.1f}% "
                   f"(plan {100 * r['plan_mfu']:.1f}%); peak memory {r['peak_memory_gb']:.2f} GB "
                   f"(plan {r['plan_memory_gb']:.2f} GB)")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: test the kit itself")
    args = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        print("no CUDA GPU here: run with --smoke for the CPU code paths, or on a GPU machine", file=sys.stderr)
        return 2
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before hai.kernels is imported
    report = {"env": _env(device), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["gpu_tests"] = _gpu_tests() if device == "cuda" else None
    report["kernels"] = _kernels(device, args.smoke)
    report["gemm"] = _gemm_tflops() if device == "cuda" else None
    with tempfile.TemporaryDirectory() as d:
        report["train"] = _train(device, args.smoke, d)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(_table(report))
    print(f"wrote {args.out}")
    ok = all(r["returncode"] == 0 for r in report["train"]) and (report["gpu_tests"] or {}).get("returncode", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
