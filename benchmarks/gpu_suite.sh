#!/usr/bin/env bash
# Every GPU check and benchmark of fastdeit in one call: at most 8 minutes on one H200 (16 cores).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]             # on the GPU host
#   bash benchmarks/gpu_suite.sh --dry-run [OUT_DIR]   # the same script on the CPU at tiny sizes
#
# In order: versions, nvidia-smi and python -m fastdeit.doctor; ImageNet-like JPEGs generated on
# the host's cores (in the background, while the tests run); pytest -m gpu (the GPU tests,
# the 20-step run under torch.cuda.set_sync_debug_mode("error") among them); the step
# benchmark (DeiT-B, batch 256, against the bare loop and baselines A and B); the memory of a
# distilled DeiT-B step and of one train pipeline; the data and end-to-end benchmarks; the
# pipeline's memory without the nvJPEG preallocation. A short table is printed last.
#
# OUT_DIR (default: $OUT, else runs/gpu-suite-<time>) receives three files, which fits what the
# device tool brings back (at most 8 files): summary.md (the table), suite.log (every stage's
# output) and records.tar.gz (every JSON / markdown / chart / junit record, under records/).
# A stage that fails or runs out of time is recorded as such and the suite goes on; the exit
# status is 1 if any stage failed. SUITE_BUDGET (seconds, default 450) caps the whole run: each
# stage gets at most what is left, so the suite ends inside one 8-minute call.
#
# DALI and DeepSpeed are not installed on the H200 host: python3 ../shared/gpu-host/stage_wheels.py
# (on this side) splits them into .devwheels/c1..cN; send them in order, the suite in the call
# that carries the last one. This script sources the last folder's install.sh when DALI or
# DeepSpeed does not import (or puts an earlier call's .devsite on PYTHONPATH).
# benchmarks/README.md ("The H200 suite") has the calls.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-runs/gpu-suite-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")"
REC="$WORK/records"
mkdir -p "$REC"
LOG="$OUT_DIR/suite.log"
: > "$LOG"
BUDGET="${SUITE_BUDGET:-450}"
START=$SECONDS
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FAILED=0

say() { echo "[gpu-suite $(( SECONDS - START ))s] $*" | tee -a "$LOG"; }

# stage NAME CAP_SECONDS CMD...: run CMD with at most min(CAP, budget left) seconds; output to
# the log and to records/NAME.log; one line per stage in records/stages.tsv.
stage() {
    local name="$1" cap="$2"; shift 2
    local left=$(( BUDGET - (SECONDS - START) - 20 ))   # 20 s kept for the table and the archive
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ]; then
        say "$name: skipped, no time left"
        printf '%s\tskipped\t0\n' "$name" >> "$REC/stages.tsv"
        FAILED=1
        return 1
    fi
    say "$name: start (at most ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$REC/$name.log" 2>&1
    local rc=$?
    cat "$REC/$name.log" >> "$LOG"
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status="failed($rc)"; fi
    [ "$status" = ok ] || FAILED=1
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" >> "$REC/stages.tsv"
    say "$name: $status in $(( SECONDS - t0 ))s"
    return 0
}

# ---------------------------------------------------------------- sizes
CORES=$(nproc)
if [ "$DRY" = 1 ]; then
    # CPU, tiny: the point is that every line of this script runs.
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
    GEN=(--classes 2 --train-per-class 8 --val-per-class 1)
    TINY='{"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}'
    MODEL=(--model ti --model-kwargs "$TINY" --img-size 32)
    TEACHER=(--teacher resnet10t)
    PIPE=(--batch 8 --img-size 32 --batches 2)
    MEMSTEP=("${MODEL[@]}" "${TEACHER[@]}" --batch 4 --classes 5 --warmup 1 --steps 1)
    STEP=("${MODEL[@]}" "${TEACHER[@]}" --batch 4 --classes 5 --zero-stage 1 --variants fastdeit bare
          --warmup 1 --steps 1 --rounds 1 --rewarm 0 --threads 1)
    DATA=(--batch 8 --workers 1 --epochs 2 --img-size 32)
    E2E=("${MODEL[@]}" --batch 8 --workers 1 --warmup 1 --steps 2 --rounds 1 --rewarm 0 --threads 1)
    IMAGES="$WORK/inet"
else
    unset DS_ACCELERATOR                 # DeepSpeed picks the GPU
    # 100 classes x 64 = 6,400 ImageNet-like JPEGs (~0.7 GB, ~40 s on 16 cores): a few
    # epochs of the data benchmark and the e2e run's 44 steps of 256 per side.
    GEN=(--classes 100 --train-per-class 64 --val-per-class 2)
    MODEL=(--model b --img-size 224)
    TEACHER=(--teacher regnety_160)
    PIPE=(--batch 256 --batches 20)
    MEMSTEP=("${MODEL[@]}" "${TEACHER[@]}" --batch 256 --warmup 3 --steps 5)
    STEP=("${MODEL[@]}" "${TEACHER[@]}" --batch 256 --zero-stage 1
          --variants fastdeit fastdeit-student bare baseline-a baseline-b --warmup 3 --steps 10 --rounds 2)
    DATA=(--batch 256 --workers $(( CORES - 1 )) --epochs 3)
    E2E=("${MODEL[@]}" --batch 256 --workers $(( CORES - 1 )) --warmup 5 --steps 10 --rounds 3 --rewarm 3)
    IMAGES="${SUITE_DATA:-/tmp/fastdeit-inet-suite}"
fi

# ---------------------------------------------------------------- DALI and DeepSpeed
if [ "$DRY" = 0 ] && ! "$PY" -c "import nvidia.dali, deepspeed" > /dev/null 2>&1; then
    if [ -d .devsite ]; then
        export PYTHONPATH="$ROOT/.devsite:$PYTHONPATH"
    fi
    if ! "$PY" -c "import nvidia.dali, deepspeed" > /dev/null 2>&1; then
        LAST=$(ls -d .devwheels/c* 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$LAST" ] && [ -f "$LAST/install.sh" ]; then
            say "installing the staged wheels: source $LAST/install.sh"
            # shellcheck disable=SC1090
            source "$LAST/install.sh" >> "$LOG" 2>&1
            export PYTHONPATH="$ROOT/.devsite:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        else
            say "DALI or DeepSpeed missing and no .devwheels/cN/install.sh: see benchmarks/README.md"
        fi
    fi
fi

# ---------------------------------------------------------------- stages
say "mode: $([ "$DRY" = 1 ] && echo "dry run (CPU, tiny sizes)" || echo GPU), out: $OUT_DIR, budget ${BUDGET}s"
export PY
stage versions 60 bash -c '"$PY" -m benchmarks.suite_summary --versions; nvidia-smi || echo "nvidia-smi: not found"
    "$PY" -m fastdeit.doctor'

# JPEGs on every core while the tests run on the GPU (the timed benchmarks wait for them).
say "generating ImageNet-like JPEGs in $IMAGES (background)"
( timeout $(( BUDGET / 2 )) "$PY" -m fastdeit.data.synthetic --mode imagenet --out "$IMAGES" "${GEN[@]}" \
    --workers "$CORES" > "$REC/jpegs.log" 2>&1; echo $? > "$REC/jpegs.rc" ) &
GEN_PID=$!

stage pytest_gpu 150 "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider --junitxml="$REC/pytest_gpu.xml" tests

wait "$GEN_PID"
cat "$REC/jpegs.log" >> "$LOG"
if [ "$(cat "$REC/jpegs.rc" 2>/dev/null)" = 0 ]; then
    printf 'jpegs\tok\t-\n' >> "$REC/stages.tsv"
else
    printf 'jpegs\tfailed\t-\n' >> "$REC/stages.tsv"; FAILED=1
fi

# Most telling first: if the budget runs out, the last stages are the ones that go.
stage step 180 "$PY" -m benchmarks.step "${STEP[@]}" --out "$REC" --name suite
stage memory_step 90 "$PY" -m benchmarks.memory step "${MEMSTEP[@]}" --out "$REC/memory-step.json"
stage memory_pipeline 60 "$PY" -m benchmarks.memory pipeline --data "$IMAGES" "${PIPE[@]}" \
    --out "$REC/memory-pipeline.json"
stage data 100 "$PY" benchmarks/data.py --data "$IMAGES" "${DATA[@]}" --out "$REC/data"
stage e2e 150 "$PY" -m benchmarks.e2e --data "$IMAGES" "${E2E[@]}" --out "$REC" --name suite
stage memory_pipeline_noprealloc 60 "$PY" -m benchmarks.memory pipeline --data "$IMAGES" "${PIPE[@]}" \
    --no-prealloc --out "$REC/memory-pipeline-noprealloc.json"

# ---------------------------------------------------------------- the table, the archive
"$PY" -m benchmarks.suite_summary "$REC" --wall "$(( SECONDS - START ))" > "$OUT_DIR/summary.md" 2>> "$LOG" \
    || { echo "summary failed (see suite.log)" > "$OUT_DIR/summary.md"; FAILED=1; }
tar -czf "$OUT_DIR/records.tar.gz" -C "$WORK" records
rm -rf "$WORK"
cat "$OUT_DIR/summary.md" | tee -a "$LOG"
exit "$FAILED"
