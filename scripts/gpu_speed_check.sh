#!/usr/bin/env bash
# One GPU session's speed checks, in one call (about 8 minutes on an H100):
#   gpt2-small at seq 1024 (remat minimal, batch 64) and llama-1b at seq 2048 (minimal, batch 16),
#   each with its layers scanned one per loop iteration, scanned two per iteration
#   (model.scan_unroll=2) and unrolled; gpt2-small also with the whole-vocabulary loss
#   (loss.chunked=never) against the chunked one its 50k vocabulary gets by default.
# Each model's table (table.md under $OUT/<model>) ends with every form's step time against the
# scanned one's. The same path runs on the CPU with a tiny model:
#
#   bash scripts/gpu_speed_check.sh           # on the GPU; results in $OUT (default ./gpu_speed)
#   bash scripts/gpu_speed_check.sh --tiny    # a check on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_speed}
FORMS=(scan scan_unroll2 unrolled)
if [[ "${1:-}" == "--tiny" ]]; then
  OUT="$OUT/tiny" bash scripts/gpu_benchmark.sh --tiny --remats full --batches 4 --warmup 1 \
    --steps 2 --windows 2 --profile-steps 0 --forms "${FORMS[@]}" unchunked_loss
  exit
fi
OUT="$OUT/gpt2-small" bash scripts/gpu_benchmark.sh --models gpt2-small --remats minimal \
  --batches 64 --forms "${FORMS[@]}" unchunked_loss --deadline-s 240
OUT="$OUT/llama-1b" bash scripts/gpu_benchmark.sh --models llama-1b --remats minimal \
  --batches 16 --forms "${FORMS[@]}" --deadline-s 240
