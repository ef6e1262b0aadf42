#!/usr/bin/env bash
# Issue 5's H200 check as one device command (the device tool's `run`), from the repository root:
#   bash bench/gpu_check.sh            (timeout_s 600; about 6–9 minutes with the compiled variants)
# Runs under the GPU image's own python3 and packages (torch, transformers, peft are there; our pins do not
# apply), so the versions are printed in the table's heading. Each variant's row is written to
# $OUT/train_throughput.md as soon as it is measured; copy that table into docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 560 python3 bench/train_throughput.py --out "$OUT/train_throughput.md" --tmp /tmp/train_throughput "$@" \
  2>&1 | tee "$OUT/log.txt"
echo "--- results ($OUT/train_throughput.md)"
cat "$OUT/train_throughput.md"
