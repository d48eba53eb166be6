#!/usr/bin/env bash
# The GPU check kit (benchmarks/gpu_check.py) on a lent GPU machine: a bare image with no network (Python 3.12, torch
# with CUDA, Triton; no hydra-core, omegaconf, antlr4, wandb), reached by one command line over a copy of the checkout
# with at most 64 MiB of ignored paths carried beside it. Everything below takes under 8 minutes.
#
# Here, once (needs PyPI; ~2.2 MiB of wheels into the ignored .gpu_wheels/):
#   python benchmarks/gpu_prepare.py
# There, the one command line (56 characters; run it with carry=[".gpu_wheels"] and timeout_s=540):
#   bash benchmarks/gpu_check.sh --wheels .gpu_wheels "$OUT"
# It installs the wheels and HAI itself offline (pip --no-index, HAI editable with --no-deps: benchmarks/gpu_prepare.py
# --install), runs the kit, and writes into $OUT: gpu_check.json (the report; also a calibration table),
# calibration.json (the table alone: hai plan calibration=PATH), gpu_check.log (this output) and install.log (pip's).
#
# Usage: bash benchmarks/gpu_check.sh [--wheels DIR] [--install-only] [OUT_DIR | OUT.json] [-- KIT_OPTIONS...]
#   --wheels DIR    install DIR's wheels and HAI first, offline (skip it where HAI is installed already)
#   --install-only  stop after the install step (what tests/test_gpu_kit.py runs in a fresh venv)
#   OUT             a directory (default gpu_check/) or the report's path (*.json)
#   KIT_OPTIONS     more benchmarks/gpu_check.py options: --only env,gemm,..., --timeouts name=s,... (name=0 turns
#                   a section off, e.g. parity=0 to leave device time for a rerun), --budget S, --smoke
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TOTAL=470          # seconds for the install and the kit together: under 8 minutes
INSTALL_CAP=150    # the install step at most (typically ~20 s)
KIT_BUDGET=400     # the kit's sections at most (benchmarks/gpu_check.py DEFAULT_BUDGET)
wheels="" install_only=0 out="gpu_check"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --install-only) install_only=1; shift ;;
    --) shift; break ;;
    *) out="$1"; shift ;;
  esac
done
case "$out" in
  *.json) report="$out"; out_dir="$(dirname "$out")" ;;
  *) report="$out/gpu_check.json"; out_dir="$out" ;;
esac
mkdir -p "$out_dir"
# the image's python3 is a venv; where it is a system Python, pip may install there all the same (a throwaway machine)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  PIP_BREAK_SYSTEM_PACKAGES=1

main() {
  if [ -n "$wheels" ]; then
    echo "== install from $wheels (pip --no-index; log: $out_dir/install.log)"
    local rc=0
    timeout "$INSTALL_CAP" "$PYTHON" benchmarks/gpu_prepare.py --install "$wheels" --log "$out_dir/install.log" \
      || rc=$?
    if [ "$rc" != 0 ]; then
      echo "== install step failed (rc $rc): see $out_dir/install.log; the kit runs what it can"
      [ "$install_only" = 1 ] && return "$rc"
    fi
  fi
  [ "$install_only" = 1 ] && return 0
  local left=$((TOTAL - SECONDS - 15))
  local budget=$((left < KIT_BUDGET ? left : KIT_BUDGET))
  budget=$((budget < 10 ? 10 : budget))
  echo "== kit: budget ${budget} s (${SECONDS} s spent)"
  timeout $((budget + 12)) "$PYTHON" benchmarks/gpu_check.py --out "$report" --budget "$budget" "$@"
}

main "$@" 2>&1 | tee "$out_dir/gpu_check.log"
