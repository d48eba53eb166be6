"""Every FP8 kernel variant HAI launches, compiled ahead of time for Hopper (sm_90) and Blackwell (sm_100) on this CPU.

hai.kernels.aot records the launches of HAI's FP8 sites at DeepSeek-V3 sizes (meta tensors, nothing runs), lets
Triton's own binder specialize them, compiles each variant with Triton's bundled ptxas and reads the code. Checked
against the hardware's published limits: H100/H800 (and B200) give a block at most 227 KB of shared memory; fp8
wgmma / tcgen05 take e4m3 operands from shared memory; a GEMM mainloop is pipelined only where both operand tiles are
copied asynchronously. One compile of both targets (~10-25 s cold; Triton's cache makes reruns faster).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 100)
SMEM_LIMIT = 227 * 1024  # bytes per block, H100/H800 (cudaDevAttrMaxSharedMemoryPerBlockOptin); B200 the same
KERNELS = {"_quant_1x128_kernel", "_quant_128x1_kernel", "_quant_128x128_kernel",
           "_fp8_gemm_kernel", "_fp8_grouped_gemm_kernel", "_fp8_k_grouped_gemm_kernel"}
GEMMS = {k for k in KERNELS if "gemm" in k}
_OPERAND_OFFSET = re.compile(r"tt\.addptr %(a_ptr|as_ptr|b_ptr|bs_ptr|c_ptr), %\w+ : !tt\.ptr<\w+>, (i\d+)")

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """The compiled table, from a process where the kernels are JITFunctions (TRITON_INTERPRET unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "hai.kernels.aot", "--json", "--ir", "--arch", *map(str, ARCHS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _gemm_rows(rows):
    return [r for r in rows if r["kernel"] in GEMMS]


def test_every_kernel_and_gemm_role_is_recorded_and_compiles_for_each_target(rows):
    for arch in ARCHS:
        mine = [r for r in rows if r["arch"] == f"sm_{arch}"]
        assert {r["kernel"] for r in mine} == KERNELS, arch
        assert all(r["registers"] > 0 for r in mine)
        roles = {(r["kernel"], site.split(" ", 1)[1]) for r in _gemm_rows(mine) for site in r["sites"]}
        for kernel, role in [("_fp8_gemm_kernel", "fprop"), ("_fp8_gemm_kernel", "dgrad"),
                             ("_fp8_gemm_kernel", "wgrad"), ("_fp8_gemm_kernel", "wgrad(recompute)"),
                             ("_fp8_grouped_gemm_kernel", "fprop"), ("_fp8_grouped_gemm_kernel", "dgrad"),
                             ("_fp8_k_grouped_gemm_kernel", "wgrad")]:
            assert (kernel, role) in roles, (arch, kernel, role)


def test_every_gemm_multiplies_e4m3_operands_on_tensor_cores(rows):
    for r in _gemm_rows(rows):
        assert r["mma"] and r["mma_e4m3"], r
        if r["arch"] == "sm_90":
            assert all(m.startswith("wgmma.mma_async") and m.endswith(".f32.e4m3.e4m3") for m in r["mma"]), r
    assert not any(r["mma"] for r in rows if r["kernel"] not in GEMMS)


def test_no_register_spills_and_shared_memory_within_the_limit(rows):
    for r in rows:
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, (r["kernel"], r["arch"], r["variant"])
        assert 0 < r["smem"] <= SMEM_LIMIT, (r["kernel"], r["arch"], r["smem"])


def test_every_gemm_copies_both_operands_asynchronously_in_every_stage(rows):
    """K-major operands (issue 27): a and b tiles are cp.async'd for the prologue's stages and in the loop."""
    for r in _gemm_rows(rows):
        n = r["async_copies"]
        assert set(n) == {"a", "b"} and n["a"] == n["b"] >= r["num_stages"] - 1, (r["kernel"], r["arch"], n)


def test_fp_fusion_is_pinned_off_at_every_launch(rows):
    """Every launch says enable_fp_fusion=False (Triton 3.9's default is on), and no kernel has an FMA the torch
    references would not compute."""
    for r in rows:
        assert r["fp_fusion"] is False and r["fma"] == 0, (r["kernel"], r["arch"], r["fma"])


def test_gemm_operand_and_output_offsets_are_64_bit(rows):
    """c_ptr + g * stride_ce wrapped at group 147 for V3's expert wgrad (2048 x 7168 per expert) in int32; every
    scalar offset added to an operand, scale or output base pointer must be i64."""
    seen = set()
    for r in _gemm_rows(rows):
        for ptr, ty in _OPERAND_OFFSET.findall(r["ttir"]):
            assert ty == "i64", (r["kernel"], r["arch"], ptr)
            seen.add((r["kernel"], ptr))
    assert ("_fp8_k_grouped_gemm_kernel", "c_ptr") in seen and ("_fp8_grouped_gemm_kernel", "b_ptr") in seen
