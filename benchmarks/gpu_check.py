"""GPU check kit: everything that can only be proven on a GPU, in one run under 8 minutes, as one JSON file (also the
plan's calibration table) and a readable table.

    bash benchmarks/gpu_check.sh --wheels .gpu_wheels OUT_DIR   # a lent GPU machine: install offline, then the kit
    python benchmarks/gpu_check.py --out OUT.json [--budget S]  # one NVIDIA GPU, HAI installed
    python benchmarks/gpu_check.py --smoke --out OUT.json       # CPU: the same code paths at toy sizes (tested)

Each section runs in a child process of its own with a timeout (its cap, or what is left of ``--budget``, the
smaller), and the JSON is rewritten after every section, so a timeout or a crash loses at most the section in flight
(a section that times out keeps the rows it had finished). Sections, in order:

1. ``env``: torch / Triton / CUDA versions, the GPU, and whether hydra, omegaconf and ``hai.kernels`` import;
2. ``kernels``: every Triton kernel compiled (not interpreted) against its torch reference: quantizers (bytes equal,
   scales' relative error), dense / grouped / K-grouped FP8 GEMMs (relative error);
3. ``gemm``: FP8 GEMM TFLOP/s at the calibration table's shapes (``hai/plan/calibration_h800.json``: DeepGEMM's
   dense N x K at M = 4096, grouped 8 x 4096 tokens, weight gradients), beside torch bf16 matmul and
   ``torch._scaled_mm`` (``benchmarks/fp8_gemm.py``);
4. ``attention``: ``model.attention=sdpa`` (fused kernels) against the reference core at V3's dimensions: time,
   TFLOP/s and relative errors;
   then ``calibration``: the table ``hai plan calibration=PATH`` reads, from sections 1, 3 and 4 (written into the
   report itself and into ``--calibration``, default calibration.json beside it);
5. ``aot``: ``benchmarks/kernels_aot.py`` for this GPU's target with this machine's Triton (registers, spills,
   shared memory, async copies per operand, e4m3 MMA: the checks of tests/test_kernels_aot.py);
6. ``train``: short single-GPU ``hai train model=small`` runs in bf16 and fp8 next to ``hai plan``'s prediction with
   the published and the measured calibration, and the V3 plan priced with both;
7. ``gpu_tests``: the ``@pytest.mark.gpu`` tests with TRITON_INTERPRET unset; fails if none ran or any skipped;
8. ``parity``: fp8 - bf16 and bf16 - fp32 paired loss gaps of model=small over seeds (benchmarks/fp8_parity.py's
   statistics), only with at least 90 s of the budget left and for at most 120 s: about one seed, too few to resolve
   DeepSeek's 0.25% (its ``resolvable`` says so). ``--timeouts parity=0`` turns it off (device time for a rerun);
   ``--only parity --timeouts parity=390`` gives it a call of its own.

Nothing in CI depends on a GPU: ``--smoke`` runs sections 1-6 on CPU at toy sizes (interpreter, torch references),
says which sections need a GPU, and ``tests/test_gpu_kit.py`` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PUBLISHED = ROOT / "hai" / "plan" / "calibration_h800.json"
sys.path.insert(0, str(HERE))

__all__ = ["SECTIONS", "Section", "build_calibration", "judge_gpu_tests", "main"]


@dataclass(frozen=True)
class Section:
    name: str
    cap_s: float  # its timeout at most
    gpu_only: bool = False  # skipped without CUDA (so in --smoke)
    min_s: float = 10.0  # not started with less than this left of the budget


SECTIONS = (Section("env", 20, min_s=5), Section("kernels", 35), Section("gemm", 70), Section("attention", 25),
            Section("aot", 40), Section("train", 100), Section("gpu_tests", 110, gpu_only=True),
            Section("parity", 120, gpu_only=True, min_s=90))
DEFAULT_BUDGET = 400  # seconds; the caps above (parity aside, which only takes what is left) sum to this
V3_LAYOUT = ["model=deepseek_v3_671b", "cluster=h800_2048", "parallel=v3_2048", "train=v3_pretrain"]
V3_PUBLISHED_TOKENS_PER_S = 1541  # DeepSeek-V3: 180K H800 GPU-hours per trillion tokens
# dense TFLOP/s (fp8, bf16) of known GPUs, matched in order against torch's device name
PEAKS = (("H800", 1979.0, 989.5), ("H200", 1979.0, 989.5), ("H100 PCIe", 1513.0, 756.5),
         ("H100 NVL", 1671.0, 835.5), ("H100", 1979.0, 989.5), ("H20", 296.0, 148.0), ("B200", 4500.0, 2250.0))


# ----------------------------------------------------------------------------------------------- the child side
@dataclass
class Ctx:
    """What a section's child gets: its device, toy sizes or not, its timeout, and where it writes."""

    device: str
    smoke: bool
    timeout: float
    part: Path
    work: Path
    calibration: str | None = None

    def emit(self, row: dict) -> None:
        """Keep one finished row: the parent reads it back even if the section times out later."""
        _append(self.part, {"row": row})


def _append(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _stream(cmd: list[str], env: dict) -> tuple[int, list[str]]:
    """Run ``cmd`` with its output copied live into this section's log (which the parent keeps on a timeout: no
    timeout here, the parent kills the whole process group) and returned: (returncode, lines)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line.rstrip("\n"))
    return proc.wait(), lines


def section_env(ctx: Ctx) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"), "executable": sys.executable}
    info["device"] = "cuda" if info["cuda_available"] and not ctx.smoke else "cpu"
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 1e9, 1), cuda=torch.version.cuda)
    imports = {}
    for mod in ("triton", "hydra", "omegaconf", "hai.kernels", "hai.config.compose"):
        try:
            m = importlib.import_module(mod)
            imports[mod] = getattr(m, "__version__", None) or getattr(m, "__file__", "ok")
        except Exception as err:  # noqa: BLE001 - record why, the parent decides what still runs
            imports[mod] = f"error: {type(err).__name__}: {err}"
    info["imports"] = imports
    info["triton"] = imports["triton"]
    broken = [m for m, v in imports.items() if str(v).startswith("error") and m != "triton"]
    if broken:
        info.update(status="failed", reason=f"{', '.join(broken)} do not import: run the install step "
                                            f"(bash benchmarks/gpu_check.sh --wheels .gpu_wheels)")
    return info


def section_kernels(ctx: Ctx) -> dict:
    """Triton launcher vs torch reference for every kernel, on ``ctx.device`` (the interpreter on CPU)."""
    import torch

    from hai.kernels import gemm as G
    from hai.kernels import quant as Q

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    M, N, K = (256, 256, 256) if ctx.smoke else (4096, 2048, 7168)
    x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
    for name in ("quant_1x128", "quant_128x1", "quant_128x128"):
        (q_t, s_t), (q_r, s_r) = getattr(Q, name + "_triton")(x), getattr(Q, name + "_ref")(x)
        ctx.emit({"kernel": name, "bytes_equal": (q_t.view(torch.uint8) == q_r.view(torch.uint8)).float()
                  .mean().item(), "scale_rel_err": _rel(s_t, s_r)})
    a = (*Q.quant_1x128_ref(x), *Q.quant_128x128_ref(torch.randn(N, K, device=dev, generator=g)))
    ctx.emit({"kernel": "fp8_gemm", "rel_err": _rel(G.fp8_gemm_triton(*a, torch.float32),
                                                    G.fp8_gemm_ref(*a, torch.float32))})
    E = 4
    w_q, w_s = Q.quant_128x128_ref(torch.randn(E * N, K, device=dev, generator=g))
    ga = (*Q.quant_1x128_ref(x), w_q.view(E, N, K), w_s.view(E, N // 128, K // 128), [M // 2, 0, M // 4, M // 4])
    ctx.emit({"kernel": "fp8_grouped_gemm", "rel_err": _rel(G.fp8_grouped_gemm_triton(*ga, torch.float32),
                                                            G.fp8_grouped_gemm_ref(*ga, torch.float32))})
    dy, xt = torch.randn(M, N, device=dev, generator=g), torch.randn(M, K, device=dev, generator=g)
    dq, ds = Q.quant_128x1_ref(dy)
    xq, xs = Q.quant_128x1_ref(xt)
    ka = (dq.t(), ds.t(), xq.t(), xs.t(), [M // 2, 0, M // 2])
    ctx.emit({"kernel": "fp8_k_grouped_gemm", "rel_err": _rel(G.fp8_k_grouped_gemm_triton(*ka),
                                                              G.fp8_k_grouped_gemm_ref(*ka))})
    rows = [json.loads(line)["row"] for line in open(ctx.part)]
    bad = [r["kernel"] for r in rows if r.get("bytes_equal", 1.0) < 1.0 or r.get("rel_err", 0.0) > 1e-3]
    out = {"rows": rows}
    if bad:
        out.update(status="failed", reason=f"{', '.join(bad)}: bytes differ from or error > 1e-3 against the "
                                           f"torch reference")
    return out


def _gemm_shapes() -> list[tuple]:
    """(kind, n, k, M, E) at the published table's shapes: dense N x K at M tokens, grouped E x M tokens, and the
    weight gradient dW[n, k] = dyᵀ x over M tokens."""
    pub = json.loads(PUBLISHED.read_text())["gemm_fp8_tflops"]
    m = pub["m"]
    return ([("dense", e["n"], e["k"], m, 1) for e in pub["dense"]]
            + [("grouped", e["n"], e["k"], 4096, 8) for e in pub["grouped"]]
            + [("wgrad", n, k, m, 1) for n, k in ((7168, 2048), (2112, 7168), (4096, 7168))])


def _gemm_row_gpu(kind: str, n: int, k: int, m: int, e: int) -> dict:
    import fp8_gemm

    args = argparse.Namespace(warmup_ms=25, rep_ms=100)
    if kind == "grouped":
        return fp8_gemm.grouped_row(e, m, n, k, args)
    if kind == "wgrad":  # a·bᵀ frame: a = dyᵀ [n, m], b = xᵀ [k, m], both 128x1-quantized token-contiguous
        return fp8_gemm.dense_row(n, k, m, "wgrad", args)
    return fp8_gemm.dense_row(m, n, k, "fprop", args)


def _gemm_row_cpu(kind: str, n: int, k: int, m: int, e: int) -> dict:
    """--smoke: the torch reference at toy sizes (no Triton timing on CPU), so the rows and the table are built."""
    import torch

    from hai.kernels import gemm as G
    from hai.kernels import quant as Q

    M, N, K = 128, 256, 256
    a, b = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(N, K, dtype=torch.bfloat16)
    ops = (*Q.quant_1x128_ref(a), *Q.quant_128x128_ref(b))
    row = {"shape": f"{M}x{N}x{K} (toy)", "layout": kind}
    for key, fn in (("fp8_hai", lambda: G.fp8_gemm_ref(*ops, torch.bfloat16)), ("bf16_torch", lambda: a @ b.t())):
        fn()
        t0 = time.perf_counter()
        fn()
        row[key] = 2.0 * M * N * K / (time.perf_counter() - t0) / 1e12
    row.update(scaled_mm_rowwise="cpu", scaled_mm_blockwise="cpu", rel_err_vs_ref=0.0)
    return row


def section_gemm(ctx: Ctx) -> dict:
    """One row per shape (a shape that fails is recorded and the next one measured)."""
    rows = []
    for kind, n, k, m, e in _gemm_shapes():
        t0 = time.perf_counter()
        try:
            row = (_gemm_row_cpu if ctx.smoke else _gemm_row_gpu)(kind, n, k, m, e)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at one shape: keep the others
            row = {"error": f"{type(err).__name__}: {err}"[:500]}
        row.update(kind=kind, n=n, k=k, m=m, groups=e, seconds=round(time.perf_counter() - t0, 2))
        ctx.emit(row)
        rows.append(row)
    out = {"rows": rows}
    bad = [f"{r['kind']} {r['n']}x{r['k']}" for r in rows if "error" in r or r.get("rel_err_vs_ref", 0) > 1e-3]
    if bad:
        out.update(status="failed", reason=f"{', '.join(bad)}: failed or error > 1e-3 against the torch reference")
    return out


def _attention_available() -> str | None:
    """None if ``model.attention=sdpa`` exists in this checkout, else why not."""
    schema = (ROOT / "hai" / "config" / "schema.py").read_text()
    if '"sdpa"' not in schema or importlib.util.find_spec("hai.model.fused_attention") is None:
        return "model.attention=sdpa does not exist in this checkout (hai/config/schema.py, fused_attention.py)"
    return None


def _time_ms(fn, device: str, reps: int) -> float:
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def section_attention(ctx: Ctx) -> dict:
    """sdpa (fused) vs the reference attention core, causal, at V3's dimensions (heads 128, qk 192, v 128)."""
    why = _attention_available()
    if why:
        return {"status": "skipped", "reason": why}
    import torch

    from hai.model.attention import attention_backward, attention_forward
    from hai.model.fused_attention import sdpa_backward, sdpa_forward

    dev = ctx.device
    B, S, H, K, V = (1, 256, 2, 32, 16) if ctx.smoke else (1, 4096, 128, 192, 128)
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(B, S, H, d, generator=g, device=dev).to(dtype) for d in (K, K, V, V))
    scale = K ** -0.5
    out = {"shape": {"B": B, "S": S, "H": H, "qk": K, "v": V}, "dtype": str(dtype).split(".")[-1]}
    for name, fwd, bwd in (("sdpa", sdpa_forward, sdpa_backward), ("reference", attention_forward,
                                                                    attention_backward)):
        o, lse = fwd(q, k, v, scale)
        out[f"{name}_fwd_ms"] = _time_ms(lambda: fwd(q, k, v, scale), dev, 3)
        out[f"{name}_bwd_ms"] = _time_ms(lambda: bwd(q, k, v, o, lse, do, scale), dev, 3)
        out[name] = (o, lse, *bwd(q, k, v, o, lse, do, scale))
    errs = [_rel(a, b) for a, b in zip(out.pop("sdpa"), out.pop("reference"))]
    out["rel_err"] = dict(zip(("o", "lse", "dq", "dk", "dv"), errs))
    fwd_flops = 2.0 * B * H * (S * S / 2) * (K + V)  # causal: the plan's convention (hai.plan.cost.spec_flops)
    out["flops_fwd"] = fwd_flops
    for name in ("sdpa", "reference"):  # backward = 2 x forward, as the plan prices it (hai.plan.cost.B_OVER_F)
        out[f"{name}_tflops"] = 3 * fwd_flops / (out[f"{name}_fwd_ms"] + out[f"{name}_bwd_ms"]) / 1e9
    out["speedup"] = out["sdpa_tflops"] / out["reference_tflops"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if max(errs) > tol:
        out.update(status="failed", reason=f"sdpa differs from the reference by {max(errs):.1e} > {tol:.0e}")
    return out


def section_aot(ctx: Ctx) -> dict:
    """benchmarks/kernels_aot.py with this machine's Triton, and the checks tests/test_kernels_aot.py makes."""
    import torch

    major, minor = torch.cuda.get_device_capability() if ctx.device == "cuda" else (9, 0)
    path = ctx.work / "aot.json"  # this GPU's target only (CI's tests/test_kernels_aot.py compiles sm_90 and sm_100)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rc, lines = _stream([sys.executable, str(HERE / "kernels_aot.py"), "--arch", f"{major}{minor}", "--json",
                         str(path)], env)
    if rc:
        return {"status": "failed", "reason": f"kernels_aot.py exited {rc}", "tail": lines[-30:]}
    rows = json.loads(path.read_text())
    gemms = [r for r in rows if r["mma"]]
    checks = {"all_gemms_e4m3": all(r["mma_e4m3"] for r in gemms),
              "both_operands_async": all({"a", "b"} <= set(r["async_copies"]) for r in gemms),
              "no_spills": all(r["spill_stores"] == r["spill_loads"] == 0 for r in rows),
              "smem_within_227kb": all(r["smem"] <= 227 * 1024 for r in rows)}
    keep = ("kernel", "arch", "registers", "spill_stores", "spill_loads", "smem", "num_warps", "num_stages", "mma",
            "mma_e4m3", "async_copies", "fma")
    out = {"summary": next((ln for ln in lines if "variants compiled" in ln), ""),
           "checks": checks, "rows": [{k: r.get(k) for k in keep} for r in rows]}
    if not all(checks.values()):
        out.update(status="failed", reason="failed: " + ", ".join(k for k, v in checks.items() if not v))
    return out


def _train_layout(ctx: Ctx) -> list[str]:
    if ctx.smoke:
        return ["model=tiny", "cluster=cpu1", "parallel=single", "train=test", "train.steps=3"]
    sdpa = [] if _attention_available() else ["model.attention=sdpa"]
    return ["model=small", "cluster=gpu1", "parallel=single", "train.steps=30", "train.seq_len=1024",
            "train.global_batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=5", *sdpa]


def _plan_row(overrides: list[str], calibration: str | None) -> dict:
    from hai.config.compose import compose
    from hai.plan import plan

    pred = plan(compose([*overrides, *([f"calibration={calibration}"] if calibration else [])]), build_topology=False)
    return {"tokens_per_s": pred["throughput"]["tokens_per_s_per_gpu"], "mfu": pred["throughput"]["mfu_bf16"],
            "memory_gb": pred["memory"]["total"] / 1e9}


def _train_run(ctx: Ctx, precision: str, layout: list[str], timeout: float) -> dict:
    from hai.train.metrics import read_metrics

    run = str(ctx.work / f"train_{precision}")
    ov = [*layout, f"model.precision={precision}", "wandb.mode=disabled", "train.progress=false", f"out_dir={run}"]
    t0 = time.time()
    row = {"precision": precision, "overrides": ov}
    try:  # TRITON_INTERPRET=0: compiled kernels on CUDA, the torch reference on CPU
        proc = subprocess.run([sys.executable, "-m", "hai.cli", "train", *ov], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "TRITON_INTERPRET": "0"})
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "timeout_s": round(timeout), "seconds": time.time() - t0}
    row.update(returncode=proc.returncode, seconds=time.time() - t0)
    if proc.returncode != 0:
        return {**row, "status": "failed", "error": (proc.stdout + proc.stderr)[-2000:]}
    steps = read_metrics(run)
    timed = steps[min(5, len(steps) - 1):]
    row.update(status="ok", steps=len(steps), first_loss=steps[0]["loss"], final_loss=steps[-1]["loss"],
               tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
               mfu=statistics.median(r["mfu"] for r in timed),
               peak_memory_gb=max(r["memory_bytes"] for r in steps) / 1e9)
    for which, cal in (("plan", None), ("plan_measured", ctx.calibration)):
        if which == "plan" or cal:
            row[which] = _plan_row(ov, cal)
    return row


def section_train(ctx: Ctx) -> dict:
    """Short training runs through the CLI, each next to hai plan's prediction for the same layout."""
    layout, rows = _train_layout(ctx), []
    end = time.monotonic() + ctx.timeout - (5 if ctx.smoke else 25)  # the rest: the plans below
    for i, precision in enumerate(("bf16", "fp8")):  # bf16 gets half, fp8 what bf16 left
        rows.append(_train_run(ctx, precision, layout, max(5.0, (end - time.monotonic()) / (2 - i))))
        ctx.emit(rows[-1])
    out = {"runs": rows}
    if ctx.calibration:
        from hai.plan.calibration import load_calibration

        out["calibration_loaded"] = load_calibration(ctx.calibration).summary()["name"]
        if not ctx.smoke:
            out["plan_v3"] = {"published_tokens_per_s": V3_PUBLISHED_TOKENS_PER_S,
                              "default": _plan_row(V3_LAYOUT, None), "measured": _plan_row(V3_LAYOUT, ctx.calibration)}
    bad = [r["precision"] for r in rows if r["status"] != "ok"]
    if bad:
        out.update(status="failed", reason=f"{', '.join(bad)} run(s) did not finish")
    return out


def _gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def judge_gpu_tests(counts: dict, returncode: int, cuda: bool) -> tuple[str, str]:
    """(status, reason) of a ``pytest -m gpu`` run: with CUDA it must have run (passed) at least one test and skipped
    none; a run of zero tests, or all of them skipped, proves nothing."""
    if not cuda:
        return "skipped", "needs CUDA"
    ran = counts["tests"] - counts["skipped"]
    if counts["tests"] == 0 or ran == 0:
        return "failed", (f"vacuous: {counts['tests']} gpu tests collected, {counts['skipped']} skipped, none ran "
                          f"(pytest rc {returncode})")
    if counts["skipped"]:
        return "failed", f"{counts['skipped']} gpu tests skipped with CUDA present: {counts.get('skip_reasons')}"
    if returncode or counts["failures"] or counts["errors"]:
        return "failed", f"pytest rc {returncode}: {counts['failures']} failed, {counts['errors']} errors"
    return "ok", f"{ran} gpu tests passed"


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "skip_reasons": []}
    if not path.exists():
        return counts
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
        counts["skip_reasons"] += [f"{c.get('name')}: {s.get('message')}" for c in suite.iter("testcase")
                                   for s in c.iter("skipped")]
    return counts


def section_gpu_tests(ctx: Ctx, stream=_stream, cuda: bool | None = None) -> dict:
    """``pytest -m gpu`` over the files holding gpu tests, TRITON_INTERPRET unset (tests/test_fp8_kernels.py then
    re-runs itself with compiled kernels on CUDA tensors), judged by :func:`judge_gpu_tests`."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    files, junit = _gpu_test_files(), ctx.work / "gpu_tests.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
    t0 = time.time()
    rc, lines = stream(cmd, env)
    tail = [ln for ln in lines if ln.strip()][-20:]
    counts = _junit_counts(junit)
    status, reason = judge_gpu_tests(counts, rc, cuda)
    return {"status": status, "reason": reason, "files": files, "counts": counts, "returncode": rc,
            "command": " ".join(cmd[1:]), "summary": tail[-1] if tail else "", "tail": tail,
            "seconds": time.time() - t0}


PARITY_STEPS = 200


def parity_layout() -> list[str]:
    return ["model=small", "cluster=gpu1", "parallel=single", "train.seq_len=512", "train.global_batch_size=16",
            "train.micro_batch_size=16", "train.warmup_steps=20", f"train.steps={PARITY_STEPS}", "wandb.mode=disabled",
            "train.progress=false", *([] if _attention_available() else ["model.attention=sdpa"])]


def section_parity(ctx: Ctx) -> dict:
    """fp8 - bf16 and bf16 - fp32 paired gaps of model=small on the GPU (benchmarks/fp8_parity.py's statistics),
    over as many seeds as the time allows."""
    import fp8_parity

    from hai.train.metrics import read_metrics

    steps, last, t0 = PARITY_STEPS, 20, time.time()
    deadline, layout = t0 + ctx.timeout - 5, parity_layout()
    finals = {}
    for seed in range(16):
        row = {}
        for p in fp8_parity.PRECISIONS:
            run = str(ctx.work / f"parity_{p}_{seed}")
            try:
                proc = subprocess.run([sys.executable, "-m", "hai.cli", "train", *layout, f"train.seed={seed}",
                                       f"model.precision={p}", f"out_dir={run}"], cwd=ROOT, capture_output=True,
                                      text=True, timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                break
            if proc.returncode:
                return {"status": "failed", "reason": f"{p} seed {seed}: rc {proc.returncode}",
                        "tail": (proc.stdout + proc.stderr)[-2000:]}
            losses = [r["loss"] for r in read_metrics(run)]
            row[p] = sum(losses[-last:]) / last
        if len(row) < len(fp8_parity.PRECISIONS):
            break  # out of time inside this seed
        finals[seed] = row
        ctx.emit({"seed": seed, **row})
        if time.time() + 1.2 * (time.time() - t0) / (seed + 1) > deadline:
            break  # another seed would not fit
    if not finals:
        return {"status": "timeout", "reason": "not one seed (fp32, bf16, fp8) fitted in the time left"}
    return fp8_parity.report(finals, steps, last, layout)


def _child(args) -> int:
    ctx = Ctx(device=args.device, smoke=args.smoke, timeout=args.timeout, part=Path(args.part),
              work=Path(args.work), calibration=args.calibration)
    try:
        result = globals()[f"section_{args.section}"](ctx)
    except Exception:  # noqa: BLE001 - the parent records it and goes on with the next section
        _append(ctx.part, {"error": traceback.format_exc()[-4000:]})
        return 1
    _append(ctx.part, {"result": result})
    return 0


# ---------------------------------------------------------------------------------------------- the calibration
def _peaks(gpu: str) -> tuple[float, float, str]:
    for key, fp8, bf16 in PEAKS:
        if key in gpu:
            return fp8, bf16, f"{key} dense peaks (datasheet)"
    return 1979.0, 989.5, f"unknown GPU {gpu!r}: H100 SXM dense peaks assumed"


def _round(x: float) -> float:
    return float(f"{x:.4g}")  # 4 significant digits: 1346.0 on a GPU, 0.02113 on CPU (--smoke)


def _tflops(rows: list[dict], kind: str, key: str = "fp8_hai") -> list[tuple[int, int, float]]:
    return [(r["n"], r["k"], r[key]) for r in rows if r.get("kind") == kind and isinstance(r.get(key), float)]


def build_calibration(env: dict, gemm_rows: list[dict], attention: dict | None, smoke: bool = False) -> dict:
    """The table hai.plan.calibration reads, from what this GPU measured; what it could not measure (all-to-all
    links, SMs given to communication; a section that failed) is the published H800 table's, and ``sources`` says
    which is which."""
    pub = json.loads(PUBLISHED.read_text())
    gpu = env.get("gpu", "cpu (smoke)")
    fp8_peak, bf16_peak, peaks_from = _peaks(gpu)
    where = "--smoke: the torch reference at toy sizes on CPU, NOT a calibration" if smoke else \
        f"measured by benchmarks/gpu_check.py on {gpu} (torch {env.get('torch')}, triton {env.get('triton')})"
    g, src = pub["gemm_fp8_tflops"], {}
    table = {kind: [{"n": n, "k": k, "tflops": _round(t)} for n, k, t in _tflops(gemm_rows, kind)]
             for kind in ("dense", "grouped")}
    for kind in ("dense", "grouped"):
        if not table[kind]:
            table[kind], src[kind] = g[kind], f"{kind}: published H800 (not measured here)"
    wgrad = [t for _, _, t in _tflops(gemm_rows, "wgrad")]
    wg = ({"tflops": _round(statistics.fmean(wgrad)), "range": [_round(min(wgrad)), _round(max(wgrad))]}
          if wgrad else g["wgrad"])
    bf16 = [t / bf16_peak for _, _, t in _tflops(gemm_rows, "dense", "bf16_torch")]
    att = (attention or {}).get("sdpa_tflops") if (attention or {}).get("status", "ok") == "ok" else None
    src["gemm_fp8_tflops"] = (f"HAI's Triton FP8 GEMMs (1x128 x 128x128 block scales, bf16 out), {where}: dense at "
                              f"M = {g['m']}, grouped 8 x 4096 tokens, wgrad over {g['m']} tokens ({len(wgrad)} "
                              f"shapes). " + "; ".join(v for k, v in src.items() if k in ("dense", "grouped")))
    return {
        "name": "cpu_smoke" if smoke else "".join(c if c.isalnum() else "_" for c in gpu.lower()) + "_measured",
        "gpu": gpu, "nominal": {**pub["nominal"], "peak_tflops_fp8": fp8_peak, "peak_tflops_bf16": bf16_peak},
        "sms": {"total": env.get("sms", pub["sms"]["total"]), "communication": pub["sms"]["communication"]},
        "gemm_fp8_tflops": {"m": g["m"], "dense": table["dense"], "grouped": table["grouped"], "wgrad": wg},
        "gemm_bf16_efficiency": _round(statistics.median(bf16)) if bf16 else pub["gemm_bf16_efficiency"],
        "attention_tflops_bf16": _round(att) if att else pub["attention_tflops_bf16"],
        "all_to_all_gbps": pub["all_to_all_gbps"],
        "sources": {
            "gemm_fp8_tflops": src["gemm_fp8_tflops"],
            "gemm_bf16_efficiency": (f"torch bf16 matmul at the dense shapes / {bf16_peak} ({where})" if bf16 else
                                     "published H800 table's assumption (bf16 not measured here)"),
            "attention_tflops_bf16": (f"model.attention=sdpa, causal, V3 dims, (fwd + 2 x fwd) FLOPs / (fwd + bwd "
                                      f"time) ({where})" if att else
                                      "published H800 table's assumption (sdpa not measured here)"),
            "nominal": f"{peaks_from}; NVLink / IB GB/s: the published H800 table's (one GPU measures no link)",
            "all_to_all_gbps": "published H800 table (DeepEP): one GPU measures no all-to-all",
            "sms": f"total: this GPU's; communication: V3's {pub['sms']['communication']} (published)"}}


# ---------------------------------------------------------------------------------------------- the parent side
def _read_part(path: Path) -> tuple[list, dict | None, str | None]:
    rows, result, error = [], None, None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            rows += [obj["row"]] if "row" in obj else []
            result = obj.get("result", result)
            error = obj.get("error", error)
    return rows, result, error


def _child_env(smoke: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # the kernels under the interpreter on CPU (set before triton is imported)
    return {**env, "PYTHONUNBUFFERED": "1"}


class Stopped(Exception):
    """SIGTERM / SIGINT (gpu_check.sh's outer timeout): the section in flight is killed, the report written."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def _kill(proc: subprocess.Popen) -> int:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()


def run_section(name: str, timeout: float, work: Path, device: str, smoke: bool, calibration: str | None) -> dict:
    """Run one section in a child process (its own process group, killed whole on timeout) and record it."""
    part, log = work / f"{name}.jsonl", work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--part", str(part), "--work", str(work),
           "--device", device, "--timeout", str(timeout), *(["--smoke"] if smoke else []),
           *(["--calibration", calibration] if calibration else [])]
    t0 = time.monotonic()
    with open(log, "w") as out:  # its own process group (same session): killed whole, grandchildren too
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=_child_env(smoke),
                                preexec_fn=os.setpgrp)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            rc, timed_out = _kill(proc), True
        except Stopped:
            _kill(proc)
            raise
    rows, result, error = _read_part(part)
    rec = {"status": "ok", "seconds": round(time.monotonic() - t0, 1), "timeout_s": round(timeout, 1),
           "returncode": rc}
    if timed_out:
        rec.update(status="timeout", reason=f"killed after {timeout:.0f} s", rows=rows)
    elif error or result is None:
        rec.update(status="failed", reason=error.strip().splitlines()[-1] if error else f"exited {rc} without a "
                   f"result", error=error, rows=rows)
    else:
        rec.update(status=result.pop("status", "ok"), result=result)
        rec.update({"reason": result.pop("reason")} if "reason" in result else {})
    text = log.read_text(errors="replace")
    if rec["status"] not in ("ok", "skipped"):
        rec["tail"] = text.strip().splitlines()[-30:]
    if text.strip():
        print(f"---- {name}: output ----\n{text.rstrip()}", flush=True)
    return rec


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)  # a kill never leaves half a file


def _skip_reason(sec: Section, args, device: str | None, hai_ok: bool, left: float) -> str | None:
    if args.only and sec.name not in args.only and sec.name != "env":
        return "not selected (--only)"
    if sec.gpu_only and device != "cuda":
        return f"needs CUDA (device: {device})"
    if args.timeouts.get(sec.name) == 0:
        return f"turned off (--timeouts {sec.name}=0)"
    if not hai_ok and sec.name != "env":
        return "hai.kernels / hydra do not import (see env): run the install step"
    if left < sec.min_s:
        return f"budget: {left:.0f} s left, needs at least {sec.min_s:.0f} s"
    return None


def _calibrate(report: dict, cal_path: Path, smoke: bool) -> str | None:
    """Build the table from env / gemm / attention, write it beside the report and into it; its path, or None."""
    secs = report["sections"]
    gemm = secs.get("gemm", {})
    rows = gemm.get("result", {}).get("rows") or gemm.get("rows") or []
    if not rows:
        secs["calibration"] = {"status": "skipped", "reason": "no GEMM rows measured"}
        return None
    att = secs.get("attention", {})
    table = build_calibration(report["env"] or {}, rows, {**att.get("result", {}), "status": att.get("status")},
                              smoke)
    _write(cal_path, table)
    report.update(table)  # the report itself is a calibration table too: hai plan calibration=REPORT.json
    secs["calibration"] = {"status": "ok", "path": str(cal_path), "name": table["name"],
                           "measured_gemm_rows": len(rows)}
    return str(cal_path)


def _sections(args, report: dict, out: Path, cal_path: Path, caps: dict) -> None:
    """Run (or skip, with the reason) every section in order, rewriting the report after each."""
    deadline, device, hai_ok, cal = time.monotonic() + args.budget, "cpu" if args.smoke else None, True, None
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for sec in SECTIONS:
            left = deadline - time.monotonic() - 2
            why = _skip_reason(sec, args, device, hai_ok, left)
            rec = {"status": "skipped", "reason": why} if why else \
                run_section(sec.name, min(caps[sec.name], left), Path(work), device or "cpu", args.smoke, cal)
            report["sections"][sec.name] = rec
            if sec.name == "env":
                env = report["env"] = rec.get("result") or {}
                device = device or env.get("device")
                hai_ok = not str(env.get("imports", {}).get("hai.kernels", "error")).startswith("error")
            if sec.name == "attention":
                cal = _calibrate(report, cal_path, args.smoke)
            print(f"== {sec.name}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else "")
                  + (f" in {rec['seconds']} s" if "seconds" in rec else ""), flush=True)
            _write(out, report)
            if sec.name == "env" and device != "cuda" and not args.smoke:
                report["kit"]["no_cuda"] = True
                _write(out, report)
                print("no CUDA GPU here (see env): run with --smoke for the CPU code paths", file=sys.stderr)
                return


def _kit(args) -> int:
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cal_path = Path(args.calibration or out.with_name("calibration.json")).resolve()
    caps = {s.name: args.timeouts.get(s.name, s.cap_s) for s in SECTIONS}
    report = {"kit": {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget, "smoke": args.smoke,
                      "caps_s": caps, "argv": sys.argv[1:]}, "env": None, "sections": {}}
    _write(out, report)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        _sections(args, report, out, cal_path, caps)
    except Stopped as why:
        name = next((s.name for s in SECTIONS if s.name not in report["sections"]), "?")
        report["sections"][name] = {"status": "timeout", "reason": f"the kit was stopped ({why}) in this section"}
        report["kit"].update(stopped=str(why), verdict="failed")
        _write(out, report)
        print(f"== stopped ({why}) during {name}; wrote {out}", file=sys.stderr)
        return 124
    if report["kit"].get("no_cuda"):
        return 2
    failed = [n for n, r in report["sections"].items() if r["status"] in ("failed", "timeout")]
    report["kit"].update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), failed=failed,
                         verdict="failed" if failed else "ok")
    _write(out, report)
    print(table(report))
    print(f"wrote {out}" + (f" and {cal_path} (hai plan calibration={cal_path})" if "calibration" in
                            report["sections"] and report["sections"]["calibration"]["status"] == "ok" else ""))
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------- the table
def _cell(v) -> str:
    return f"{v:>9.1f}" if isinstance(v, float) else f"{str(v)[:9]:>9}"


def _lines_gemm(rows: list[dict]) -> list[str]:
    out = [f"  {'kind':<8}{'N':>6}{'K':>6}{'M':>6}{'fp8 HAI':>9}{'bf16 mm':>9}{'_sc row':>9}{'_sc blk':>9}"
           f"{'err/ref':>9}   (TFLOP/s)"]
    for r in rows:
        out.append(f"  {r.get('kind', '?'):<8}{r.get('n', 0):>6}{r.get('k', 0):>6}{r.get('m', 0):>6}"
                   f"{_cell(r.get('fp8_hai'))}{_cell(r.get('bf16_torch'))}{_cell(r.get('scaled_mm_rowwise'))}"
                   f"{_cell(r.get('scaled_mm_blockwise'))}{r.get('rel_err_vs_ref', float('nan')):>9.1e}")
    return out


def _lines_train(res: dict) -> list[str]:
    out = []
    for r in res.get("runs", []):
        if r.get("status") != "ok":
            out.append(f"  {r['precision']}: {r.get('status')} {str(r.get('error', ''))[-200:]}")
            continue
        plan = r["plan"]
        measured = f", with the measured table {r['plan_measured']['tokens_per_s']:,.0f}" if "plan_measured" in r \
            else ""
        out.append(f"  {r['precision']:<5} {r['steps']} steps: loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}; "
                   f"{r['tokens_per_s']:,.0f} tok/s (plan {plan['tokens_per_s']:,.0f}{measured}); MFU "
                   f"{100 * r['mfu']:.1f}% (plan {100 * plan['mfu']:.1f}%); peak memory {r['peak_memory_gb']:.2f} GB "
                   f"(plan {plan['memory_gb']:.2f} GB)")
    if "plan_v3" in res:
        v3 = res["plan_v3"]
        out.append(f"  V3 plan ({' '.join(V3_LAYOUT)}): {v3['default']['tokens_per_s']:,.0f} tok/s/GPU with the "
                   f"published table, {v3['measured']['tokens_per_s']:,.0f} with this GPU's; DeepSeek published "
                   f"{V3_PUBLISHED_TOKENS_PER_S:,}")
    return out


def _lines_section(name: str, rec: dict) -> list[str]:
    res = rec.get("result") or {}
    if rec["status"] != "ok" and name not in ("gpu_tests",):
        return [f"  {line}" for line in rec.get("tail", [])[-5:]]
    if name == "kernels":
        return [f"  {k['kernel']:<20} " + (f"bytes equal {k['bytes_equal']:.6f}, scale rel err "
                                          f"{k['scale_rel_err']:.1e}" if "bytes_equal" in k else
                                          f"rel err {k['rel_err']:.1e}") for k in res.get("rows", [])]
    if name == "gemm":
        return _lines_gemm(res.get("rows", []))
    if name == "attention":
        return [f"  sdpa {res['sdpa_fwd_ms']:.2f} + {res['sdpa_bwd_ms']:.2f} ms ({res['sdpa_tflops']:.1f} TFLOP/s), "
                f"reference {res['reference_fwd_ms']:.2f} + {res['reference_bwd_ms']:.2f} ms "
                f"({res['reference_tflops']:.1f}); x{res['speedup']:.1f}; max rel err "
                f"{max(res['rel_err'].values()):.1e} ({res['dtype']}, {res['shape']})"]
    if name == "aot":
        return [f"  {res.get('summary', '')}", f"  checks: {res.get('checks')}"]
    if name == "train":
        return _lines_train(res)
    if name == "gpu_tests":
        return [f"  {res.get('summary', '')} ({res.get('files')})"] if res else []
    if name == "parity":
        fp8 = res.get("fp8 - bf16 (/ bf16)", {})
        return [f"  fp8 - bf16: mean {100 * fp8.get('mean', 0):+.3f}% SE {100 * fp8.get('se', 0):.3f}% over seeds "
                f"{res.get('seeds')}; resolvable at 0.25%: {res.get('resolvable')}"] if fp8 else []
    return []


def table(report: dict) -> str:
    env, kit = report.get("env") or {}, report["kit"]
    out = [f"== GPU check: {env.get('gpu', env.get('device', '?'))} (capability {env.get('capability', '-')}, "
           f"{env.get('sms', '-')} SMs), torch {env.get('torch')}, triton {env.get('triton')}; verdict "
           f"{kit.get('verdict')}" + (f" (failed: {', '.join(kit['failed'])})" if kit.get("failed") else "")]
    for name, rec in report["sections"].items():
        out.append(f"{name:<12}{rec['status']:<9}{rec.get('seconds', ''):>7}  {rec.get('reason', '')}")
        out += _lines_section(name, rec)
    return "\n".join(out)


def _timeouts(text: str) -> dict:
    """``name=seconds,name=seconds``: override section caps (e.g. more for gpu_tests on a slow first compile)."""
    pairs = [p.split("=", 1) for p in text.split(",") if p]
    known = {s.name for s in SECTIONS}
    bad = [n for n, _ in pairs if n not in known]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown sections {bad}: choose from {sorted(known)}")
    return {n: float(v) for n, v in pairs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the report (JSON; also a calibration table)")
    ap.add_argument("--calibration", help="the calibration table alone (default: calibration.json beside --out)")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: test the kit itself")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all sections together")
    ap.add_argument("--only", type=lambda t: set(t.split(",")), help="run only these sections (env always runs)")
    ap.add_argument("--timeouts", type=_timeouts, default={}, help="override caps: name=seconds,...")
    for hidden in ("--section", "--part", "--work", "--device"):  # the child side (one section)
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return _child(args) if args.section else _kit(args)


if __name__ == "__main__":
    sys.exit(main())
