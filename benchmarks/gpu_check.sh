#!/usr/bin/env bash
# The GPU check kit (benchmarks/gpu_check.py): on a machine with one NVIDIA GPU, after the README's install,
#   bash benchmarks/gpu_check.sh [OUT.json]
# writes OUT.json (default gpu_check.json) and prints the table; capped at 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
timeout 480 python benchmarks/gpu_check.py --out "${1:-gpu_check.json}"
