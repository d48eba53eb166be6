"""The GPU check kit (benchmarks/gpu_check.py) runs its CPU code paths end to end, so the first GPU run is not its
first run: under the Triton interpreter every kernel's launcher gives its torch reference's bytes, and the two short
training runs (bf16, fp8) finish with a falling loss and a plan row beside them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gpu_tests"] is None and report["gemm"] is None  # GPU-only sections say they did not run
    kernels = {k["kernel"]: k for k in report["kernels"]}
    assert set(kernels) == {"quant_1x128", "quant_128x1", "quant_128x128", "fp8_gemm", "fp8_grouped_gemm",
                            "fp8_k_grouped_gemm"}
    for k in kernels.values():
        assert k.get("bytes_equal", 1.0) == 1.0 and k.get("scale_rel_err", 0.0) == 0.0
        assert k.get("rel_err", 0.0) < 1e-6, k
    assert [r["precision"] for r in report["train"]] == ["bf16", "fp8"]
    for r in report["train"]:
        assert r["returncode"] == 0 and r["steps"] == 3 and r["final_loss"] < r["first_loss"], r
        assert r["plan_tokens_per_s"] > 0 and r["plan_memory_gb"] > 0
    assert "train fp8" in proc.stdout and "not run (no GPU)" in proc.stdout
