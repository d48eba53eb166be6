"""Every FP8 kernel variant HAI launches, compiled for Hopper (sm_90) and Blackwell (sm_100) without a GPU.

    python benchmarks/kernels_aot.py [--arch 90 100] [--json OUT.json]

Records the launches of HAI's FP8 sites at DeepSeek-V3 sizes (hai.kernels.aot: meta tensors, nothing runs), lets
Triton's binder specialize them as it would on the GPU, compiles each variant with Triton's bundled ptxas and prints
one row per (variant, target): registers and spill bytes (ptxas -v), shared memory per block (limit 227 KB on
H100/H800), warps/stages, the MMA instruction and its operand types, async copies (cp.async / TMA) per operand of the
mainloop (prologue stages + loop), and the launch sites (V3 layer, GEMM role) that use it. tests/test_kernels_aot.py
asserts the same table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JITFunctions: set before triton is imported
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # every launch sets enable_fp_fusion itself


def _summary(rows: list[dict]) -> str:
    gemms = [r for r in rows if r["mma"]]
    both = sum(1 for r in gemms if {"a", "b"} <= set(r["async_copies"]))
    worst = max(rows, key=lambda r: r["smem"])
    return (f"{len(rows)} variants compiled; GEMMs {len(gemms)}, all e4m3 MMA: "
            f"{all(r['mma_e4m3'] for r in gemms)}, both operands async: {both}/{len(gemms)}; spill bytes "
            f"{sum(r['spill_stores'] + r['spill_loads'] for r in rows)}; max smem {worst['smem'] / 1024:.1f} KB "
            f"({worst['kernel']}, {worst['arch']}); FMAs {sum(r['fma'] for r in rows)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 100], help="compute capabilities to compile for")
    p.add_argument("--json", help="also write the rows (without IR) to this file")
    args = p.parse_args(argv)
    from hai.kernels import aot

    t0 = time.time()
    rows = aot.compile_all(tuple(args.arch))
    seconds = time.time() - t0
    print(aot.table(rows))
    print(f"\n{_summary(rows)}; {seconds:.1f} s (Triton's cache makes reruns faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "ttir"} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
