#!/usr/bin/env bash
# One-shot GPU check of the fast path (issue 7), for a session that has a CUDA GPU:
#   0. installs carried wheels (.whl/*.whl, from bench/fetch_wheels.sh) into /tmp/site and checks the imports;
#   1. bench/compare_trainer.py at both lengths (MNLI-like, then fixed 128), random bert-base shape, batch 16;
#      the MNLI-like run also profiles 20 more fast-path steps (torch.profiler table: OUT/*-profile-*.txt);
#   2. the GPU correctness tests (bf16 fast == eager, CUDA graphs + accumulation, no host sync inside a step);
#   3. a markdown summary of every result file (paste it into bench/README.md with the card's name).
# Usage: bash bench/gpu_check.sh [OUT_DIR]          (default bench/results; about 8-10 minutes on one H100/H200)
# Knobs: STEPS (timed steps, default 200), WARMUP (untimed, default 30), PYTHON (default python3), SKIP_TESTS=1,
#        WHEELS (folder of carried wheels, default .whl),
#        DRY_RUN=1 (no GPU needed: tiny model, 3 steps, aot_eager; what tests/test_fastpath.py runs to keep this
#        script working).
# On the lent GPU machine (its image lacks `datasets`): here `bash bench/fetch_wheels.sh`, then
#   run(command="bash bench/gpu_check.sh $OUT", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
PY=${PYTHON:-python3}
STEPS=${STEPS:-200}
WARMUP=${WARMUP:-30}
export GLUE_TRAIN_CACHE=${GLUE_TRAIN_CACHE:-/tmp/glue-train-cache}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "installing $WHEELS/*.whl failed"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import datasets, scipy, sklearn, yaml, accelerate, transformers, pytest, train.loop" \
  || { echo "a package the loop needs is missing: run bench/fetch_wheels.sh here and carry .whl"; exit 2; }

model=bert-base
bench_args=(--steps "$STEPS" --warmup "$WARMUP")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  card=dry-run model=tiny
  bench_args=(--model tiny --max-length 32 --steps 3 --warmup 1 --fast-backend aot_eager)
else
  card=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") \
    || { echo "no CUDA GPU (DRY_RUN=1 checks this script on the CPU)"; exit 2; }
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
fi
stamp=$(date -u +%Y%m%d-%H%M)
status=0

# The benchmarks first: if the device call runs out of time, what is already in OUT still comes back.
rm -rf /tmp/gpu-check-profile
for lengths in mnli fixed128; do
  extra=()
  # MNLI-like: also profile 20 more steps. Fixed 128: every batch is 128 long, so compiling only that bucket
  # changes nothing timed and saves the warm-up of three unused ones.
  [[ $lengths == mnli ]] && extra=(--profile /tmp/gpu-check-profile) || extra=(--fast "fast.buckets=[128]")
  cmd=("$PY" bench/compare_trainer.py --lengths "$lengths" "${bench_args[@]}" "${extra[@]}"
       --out "$OUT/$stamp-$card-$model-$lengths.jsonl")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" 2> >(tee "$OUT/$stamp-$card-$lengths.log" >&2) || status=1
  # the profile tables travel back; the Chrome traces (tens of MB) stay in /tmp/gpu-check-profile
  if [[ $lengths == mnli ]]; then
    for path in loop_eager loop_fast; do
      cp "/tmp/gpu-check-profile/$path.txt" "$OUT/$stamp-$card-$model-mnli-profile-$path.txt" || status=1
    done
  fi
done

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  cmd=("$PY" -m pytest -m gpu tests/test_fastpath.py -q -p no:cacheprovider -x)
  echo "+ ${cmd[*]}"
  "${cmd[@]}" 2>&1 | tee "$OUT/$stamp-$card-gpu-tests.txt" || status=1
fi

"$PY" bench/summarize.py "$OUT"/*.jsonl
exit $status
