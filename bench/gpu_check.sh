#!/usr/bin/env bash
# One-shot GPU check of the fast path (issue 7), for a session that has a CUDA GPU:
#   1. the GPU correctness tests (bf16 fast == eager, CUDA graphs + accumulation, no host sync inside a step);
#   2. bench/compare_trainer.py at both lengths (MNLI-like, then fixed 128), random bert-base shape, batch 16;
#   3. a markdown summary of every result file (paste it into bench/README.md with the card's name).
# Usage: bash bench/gpu_check.sh [OUT_DIR]          (default bench/results; about 8-10 minutes on one H100/H200)
# Knobs: STEPS (timed steps, default 200), WARMUP (untimed, default 30), PYTHON (default python), SKIP_TESTS=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
PY=${PYTHON:-python}
STEPS=${STEPS:-200}
WARMUP=${WARMUP:-30}
export GLUE_TRAIN_CACHE=${GLUE_TRAIN_CACHE:-/tmp/glue-train-cache}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
status=0
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || { echo "no CUDA GPU"; exit 2; }
stamp=$(date -u +%Y%m%d-%H%M)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  cmd=("$PY" -m pytest -m gpu tests/test_fastpath.py -q -p no:cacheprovider -x)
  echo "+ ${cmd[*]}"
  "${cmd[@]}" 2>&1 | tee "$OUT/$stamp-$card-gpu-tests.txt" || status=1
fi

for lengths in mnli fixed128; do
  cmd=("$PY" bench/compare_trainer.py --lengths "$lengths" --steps "$STEPS" --warmup "$WARMUP"
       --out "$OUT/$stamp-$card-bert-base-$lengths.jsonl")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" || status=1
done

"$PY" bench/summarize.py "$OUT"/*.jsonl
exit $status
