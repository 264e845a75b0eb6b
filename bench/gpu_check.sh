#!/usr/bin/env bash
# The GPU check of the fast path, precision, DeepSpeed and FSDP: TWO device calls back to back on one H100/H200
# (the second reaches the machine while it is still warm, 30 s after the first, so no second start is paid).
#   PART=1 (default, ~9 min): 0. installs carried wheels (.whl/*.whl, from bench/fetch_wheels.sh) into /tmp/site;
#     1. the `gpu` tests (bf16 fast == eager, static and dynamic lengths; CUDA graphs + accumulation; no host sync
#        inside a step; FSDP == DDP, exact resume, plain export);
#     2. short runs of the tiny model: bf16, fp16 (loss scaling, train/skipped_steps), DeepSpeed ZeRO-2 and ZeRO-3
#        bf16 on one GPU (accelerate launch --num_processes 1);
#     3. end to end, RTE (the time-to-result target): process start -> dev results of a full 5-epoch run, random
#        bert-base, batch 16: the Trainer and the fast path with fast.dynamic=true on a cold compile cache.
#   PART=2 (~5 min): 4. throughput (the speed targets): MNLI-like lengths (fast.dynamic=true, with the profile of
#        20 more steps per loop path) and fixed 128 (its one bucket); 5. end to end, RTE again: the eager loop and
#        the fast path on the compile cache step 3 filled (warm); 6. MRPC and SST-2 (capped) if time is left.
#   PART=all: every step in one call (DRY_RUN's default).
# The static-shape fast path's cold compile was measured on 2026-12-04 (H200: 8 shapes in 180.6 s, against the
# Trainer's 74.6 s for the whole RTE run); the dynamic one compiles one graph per train/eval instead.
# Every step checks the time left first (BUDGET_S, default 540 s for a part) and is skipped, or cut short by
# `timeout`, rather than overrun the device call; summary.md says which ran, how long each took, and which did not.
# Files in OUT_DIR (at most 7 a part, the device call brings back at most 8): <stamp>-<card>-{end-to-end.jsonl,
#   throughput.jsonl, runs.jsonl, profile.txt, gpu-tests.txt, log.txt, summary.md}.
# Work files (compile caches, runs) live in WORK (default /tmp/gpu-check), which part 2 reuses on the warm machine.
# Usage: bash bench/gpu_check.sh [OUT_DIR]          (default bench/results)
# Knobs: PART, BUDGET_S, STEPS (timed throughput steps, default 200), WARMUP (default 30), E2E_SST2_STEPS (default
#        1000), PYTHON (default python3), WHEELS (default .whl), GLUE (task folders, default .glue, else
#        ../shared/glue), WORK, SKIP_TESTS=1, DRY_RUN=1 (no GPU: tiny model, a few steps, aot_eager, the bundled
#        GLUE sample unless GLUE is set, fp16 and DeepSpeed as `no`, no ZeRO-3 nor SST-2 run; what
#        tests/test_time_to_result.py runs to keep this script working).
# On the lent GPU machine (no registry there; its image lacks datasets and DeepSpeed's pure-Python needs):
#   here:   bash bench/fetch_wheels.sh        # -> .whl/ (wheels) and .glue/ (RTE, MRPC, SST-2); git-ignored
#   device: run(command="bash bench/gpu_check.sh $OUT", carry=[".whl", ".glue"], timeout_s=600)
#   then at once: run(command="PART=2 BUDGET_S=280 bash bench/gpu_check.sh $OUT", carry=[".whl", ".glue"],
#                     timeout_s=330)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
PY=${PYTHON:-python3}
STEPS=${STEPS:-200}
WARMUP=${WARMUP:-30}
BUDGET_S=${BUDGET_S:-540}
PART=${PART:-$([[ "${DRY_RUN:-0}" == 1 ]] && echo all || echo 1)}
E2E_SST2_STEPS=${E2E_SST2_STEPS:-1000}
export GLUE_TRAIN_CACHE=${GLUE_TRAIN_CACHE:-/tmp/glue-train-cache}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
mkdir -p "$OUT"
T0=$SECONDS

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "installing $WHEELS/*.whl failed"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import datasets, scipy, sklearn, yaml, accelerate, transformers, pytest, train.engine.loop" \
  || { echo "a package the loop needs is missing: run bench/fetch_wheels.sh here and carry .whl"; exit 2; }

model=bert-base
bench_args=(--steps "$STEPS" --warmup "$WARMUP")
e2e_args=(--model bert-base)
e2e_sst2=(--max-steps "$E2E_SST2_STEPS")
run_args=() half=fp16 ds_precision=bf16
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  card=dry-run model=tiny GLUE=${GLUE:-train/assets/glue_sample}
  bench_args=(--model tiny --max-length 32 --steps 3 --warmup 1 --fast-backend aot_eager)
  e2e_args=(--model tiny --max-length 32 --epochs 1 --max-train-samples 32 --fast-backend aot_eager)
  e2e_sst2=()
  run_args=(train.max_steps=4 data.max_length=32) half=no ds_precision=no  # fp16 needs CUDA
else
  GLUE=${GLUE:-.glue}
  [[ -d $GLUE/RTE ]] || GLUE=../shared/glue
  card=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") \
    || { echo "no CUDA GPU (DRY_RUN=1 checks this script on the CPU)"; exit 2; }
fi
stamp=$(date -u +%Y%m%d-%H%M)
base="$OUT/$stamp-$card"
LOG="$base-log.txt" SUMMARY="$base-summary.md" E2E="$base-end-to-end.jsonl" RUNS="$base-runs.jsonl"
WORK=${WORK:-/tmp/gpu-check}  # models, runs, compile caches, Chrome traces: nothing of it travels; part 2 reuses it
[[ $PART == 2 ]] || rm -rf "$WORK"/{e2e-rte,e2e-rte-warm,e2e-mrpc,e2e-sst2,runs,profile}  # this script's own
mkdir -p "$WORK"
status=0
{
  echo "# GPU check $stamp on $card (part $PART)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  "$PY" - <<'EOF' 2>&1 || true
import importlib.metadata as m


def version(name: str) -> str:
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"


names = ("torch", "triton", "transformers", "accelerate", "datasets", "pyarrow", "deepspeed", "pydantic")
print(", ".join(f"{name} {version(name)}" for name in names))
EOF
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
} >"$SUMMARY"

# step NAME SECONDS_NEEDED CMD...: run CMD (output -> LOG) if the budget has SECONDS_NEEDED left, at most that long.
step() {
  local name=$1 need=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - T0)))
  if ((left < need)); then
    echo "| $name | skipped: ${left} s left, needs ~${need} s | 0 |" >>"$SUMMARY"
    echo "=== $name: skipped (${left} s left)" >>"$LOG"
    return 0
  fi
  echo "=== $name: $*" >>"$LOG"
  echo "+ $name"
  local t=$SECONDS rc
  timeout --kill-after=15 "$left" "$@" >>"$LOG" 2>&1
  rc=$?
  local what="ok"
  ((rc == 124 || rc == 137)) && what="cut short at the budget (rc $rc)"
  ((rc != 0 && rc != 124 && rc != 137)) && what="FAILED (rc $rc; see log)"
  echo "| $name | $what | $((SECONDS - t)) |" >>"$SUMMARY"
  ((rc == 0)) || status=1
}

in_part() { [[ $PART == all || $PART == "$1" ]]; }
WARM_CACHE=$WORK/e2e-rte/compile-loop_fast  # filled by step 3 (cold), reused by steps 4-6
DYNAMIC=(--fast fast.dynamic=true)

# 1. the GPU tests
if in_part 1 && [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  step gpu-tests 150 bash -c "set -o pipefail; '$PY' -m pytest -m gpu tests/test_fastpath.py tests/test_fsdp.py -q -p no:cacheprovider -rA \
    2>&1 | tee '$base-gpu-tests.txt'"
fi

# 2. short runs of the tiny model (the bundled SST-2 sample, 64 steps): precision and DeepSpeed on one GPU
one_run() {  # one_run NAME PRECISION LAUNCHER...: python -m train under LAUNCHER; a JSON line in RUNS
  local name=$1 precision=$2
  shift 2
  step "run-$name" "$need" "$PY" bench/run_summary.py "$name" "$WORK/runs/$name" --out "$RUNS" -- "$@" -m train \
    --config configs/smoke.yaml output_dir="$WORK/runs/$name" eval.predict_test=false precision="$precision" \
    "${run_args[@]}"
}
if in_part 1; then
  accel=("$PY" -m accelerate.commands.launch --num_processes 1)
  need=25
  one_run bf16 bf16 "$PY"
  one_run fp16 "$half" "$PY"
  if "$PY" -c "import deepspeed" >>"$LOG" 2>&1; then
    need=40
    one_run zero2-bf16 "$ds_precision" "${accel[@]}" --config_file configs/accelerate/zero2.yaml
    [[ "${DRY_RUN:-0}" == 1 ]] ||  # the same command with another launch config: one of them is checked on the CPU
      one_run zero3-bf16 "$ds_precision" "${accel[@]}" --config_file configs/accelerate/zero3.yaml
  else
    echo "| run-zero2-bf16, run-zero3-bf16 | skipped: deepspeed does not import (bench/fetch_wheels.sh) | 0 |" >>"$SUMMARY"
  fi
fi

# 3. end to end, RTE, cold: the Trainer against the fast path with one graph for all lengths (fills WARM_CACHE)
if in_part 1; then
  paths=trainer,loop_fast
  [[ $PART == all ]] && paths=trainer,loop_eager,loop_fast
  step e2e-rte 180 "$PY" bench/compare_trainer.py --end-to-end --task-dir "$GLUE/RTE" "${e2e_args[@]}" \
    --paths "$paths" --warm-paths "" "${DYNAMIC[@]}" --workdir "$WORK/e2e-rte" --out "$E2E"
fi

# 4. throughput at both lengths; MNLI-like on the dynamic graphs step 3 compiled (same model shape and batch),
#    fixed 128 on its one bucket (every batch is 128 long)
if in_part 2; then
  for lengths in mnli fixed128; do
    extra=(--cache-dir "$WARM_CACHE")
    [[ $lengths == mnli ]] && extra+=(--profile "$WORK/profile" "${DYNAMIC[@]}") || extra+=(--fast "fast.buckets=[128]")
    step "throughput-$lengths" 60 "$PY" bench/compare_trainer.py --lengths "$lengths" "${bench_args[@]}" \
      "${extra[@]}" --out "$base-throughput.jsonl"
  done
  for path in loop_eager loop_fast; do  # the tables travel back; the Chrome traces (tens of MB) stay
    [[ -f $WORK/profile/$path.txt ]] && cat "$WORK/profile/$path.txt" >>"$base-profile.txt"
  done
fi

# 5. end to end, RTE: the eager loop (in part 2), and the fast path on the cache step 3 filled (warm)
if in_part 2; then
  paths=loop_eager,loop_fast
  [[ $PART == all ]] && paths=loop_fast  # step 3 ran the eager loop
  step e2e-rte-warm 120 "$PY" bench/compare_trainer.py --end-to-end --task-dir "$GLUE/RTE" "${e2e_args[@]}" \
    --paths "$paths" --warm-paths "" "${DYNAMIC[@]}" --cache-dir "$WARM_CACHE" \
    --workdir "$WORK/e2e-rte-warm" --out "$E2E"
fi

# 6. end to end, MRPC and SST-2, on the warm cache (same model shape, dynamic graphs)
if in_part 2; then
  step e2e-mrpc 100 "$PY" bench/compare_trainer.py --end-to-end --task-dir "$GLUE/MRPC" "${e2e_args[@]}" \
    --paths loop_fast "${DYNAMIC[@]}" --cache-dir "$WARM_CACHE" --warm-paths "" --workdir "$WORK/e2e-mrpc" --out "$E2E"
  [[ "${DRY_RUN:-0}" == 1 ]] ||  # on the CPU: the MRPC step's command, and 67k rows to tokenize
    step e2e-sst2 150 "$PY" bench/compare_trainer.py --end-to-end --task-dir "$GLUE/SST-2" "${e2e_args[@]}" \
    "${e2e_sst2[@]}" --paths trainer,loop_fast "${DYNAMIC[@]}" --cache-dir "$WARM_CACHE" --warm-paths "" \
    --workdir "$WORK/e2e-sst2" --out "$E2E"
fi

# 7. the tables
{
  echo
  echo "total: $((SECONDS - T0)) s of a ${BUDGET_S} s budget"
  echo
  "$PY" bench/summarize.py "$OUT"/"$stamp-$card"-*.jsonl
} >>"$SUMMARY" 2>>"$LOG"
cat "$SUMMARY"
exit $status
