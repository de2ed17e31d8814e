#!/usr/bin/env bash
# Every GPU check and benchmark of fastdeit in one device call (at most 600 s on one H200, 16 cores),
# the wheel install included.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]             # on the GPU host
#   bash benchmarks/gpu_suite.sh --dry-run [OUT_DIR]   # the same script on the CPU at tiny sizes
#   bash benchmarks/gpu_suite.sh --plan                # the stages, their caps, and whether they fit
#
# Stages, in the order the performance table needs them (if time runs out, the last ones go):
#   smoke         versions, nvidia-smi, python -m fastdeit.doctor, the GPU data-path tests
#   jpegs         waits for the ImageNet-like JPEGs generated in the background since the start
#   e2e           end to end from JPEGs, distilled DeiT-B with the RegNetY-16GF teacher: fastdeit
#                 against the reference-style loop (ImageFolder + DataLoader + the DeiT reference
#                 step); the headline figure
#   step          the step alone, eager, distilled (MFU)
#   step_compile  the step alone, student-only, compile on and off in one run (model.compile: auto
#                 compiles on CUDA); its eager side is the suite's student-only step figure
#   data          the data path alone against the PIL/DataLoader reference at 16 workers, and ours
#                 with DeiT III's 3-Augment
#   memory        the memory of a distilled DeiT-B step and of one train pipeline
#   step_extras   EMA and LAMB cost, and one size of a resolution schedule (160 px)
#   infer         inference img/s of DeiT-Ti/S/B (distilled, 384) against ViT-B/L, ResNet-50,
#                 RegNetY-4/8/16GF and EfficientNet-B0..B7, eager, largest batch up to 256: the
#                 paper's Figure 1 (benchmarks/infer.py)
#   pytest_gpu    the full pytest -m gpu
#
# Every stage writes its records as it goes, and the summary and the archive are rewritten after
# every stage, so a stage stopped by its cap, or the call stopped by the device's limit, still
# returns what was measured; summary.md names the figures that are missing and why.
#
# OUT_DIR (default: $OUT, else runs/gpu-suite-<time>) receives three files, which fits what the
# device tool brings back: summary.md (the table), suite.log (every stage's output) and
# records.tar.gz (every JSON / markdown / chart / junit record, under records/). The exit status
# is 1 if any stage failed or was skipped, 2 if the plan does not fit the call.
#
# The plan: the stages' caps plus the wheel install plus the archive must fit one device call
# (DEVICE_CALL_S) with a margin. --plan and --dry-run check it before anything runs (make test runs
# the dry run); the GPU run checks it again with the install it measured, then gives every stage
# min(its cap, what is left of the call).
#
# DALI and DeepSpeed are not installed on the H200 host: python3 ../shared/gpu-host/stage_wheels.py
# (on this side) splits them into .devwheels/c1..cN; send them in order, the suite in the call
# that carries the last one. This script sources the last folder's install.sh when DALI or
# DeepSpeed does not import (or puts an earlier call's .devsite on PYTHONPATH), and times it.
# benchmarks/README.md ("The H200 suite") has the calls.
set -uo pipefail

DRY=0
PLAN_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --plan) PLAN_ONLY=1; shift ;;
        *) break ;;
    esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
START=$SECONDS

# ---------------------------------------------------------------- the plan
# Caps in seconds on the H200. Nothing has run there yet: they are estimates from the sizes
# (DeiT-B at batch 256, ~0.1-0.3 s a step; inductor compiling DeiT-B in ~40-60 s on 16 cores;
# process start, imports and DeepSpeed's set-up ~10-15 s per process), kept so that the sum fits.
#
# Room for `infer` (35 s), taken from two places whose measurement does not need it:
# * step 50 -> 30: it times the distilled step only. Its student-only variant was measured three
#   times per suite with the same settings (DeiT-B, 224 px, batch 256, eager): here, as the eager
#   side of step_compile (warm-up 3, 10 steps x 2 rounds, beside the compiled one) and as the
#   baseline of step_extras. One engine and half the steps fewer: ~20 s of set-up (DeiT-B and
#   RegNetY-16GF built, one DeepSpeed engine) + 36 steps at ~0.15 s.
# * the install's plan 30 -> 20: measured 3.4 s (below); 20 is still ~6x that, and the GPU run
#   re-plans with what its own install took.
STAGES=(smoke jpegs e2e step step_compile data memory step_extras infer pytest_gpu)
declare -A CAP=([smoke]=35 [jpegs]=20 [e2e]=115 [step]=30 [step_compile]=100 [data]=55 [memory]=35
                [step_extras]=45 [infer]=35 [pytest_gpu]=70)
DEVICE_CALL_S=600      # one device call at most
# The staged wheels' install (reassemble + pip install --target .devsite + the import check):
# measured at 3.4 s for the 262 MB of DALI 2.4.0 (cuda130) + DeepSpeed 0.19.8 on a 2-core builder
# (benchmarks/results/2026-12-03-gpu-suite-plan.md); planned at 20 s, since the host's disk is
# unknown. The GPU run measures its own and plans with that.
INSTALL_PLAN_S=20
ARCHIVE_S=10           # the summary and the archive after the last stage
MARGIN_S=30            # the shell's start, the device tool's own bookkeeping, a slow stage's kill
cap_sum() { local s=0 n; for n in "${STAGES[@]}"; do s=$(( s + CAP[$n] )); done; echo "$s"; }

# plan_fits INSTALL_S: 0 if the stages' caps + the install + the archive + the margin fit one call.
plan_fits() {
    local need=$(( $(cap_sum) + $1 + ARCHIVE_S + MARGIN_S ))
    local n line="plan: install ${1}s"
    for n in "${STAGES[@]}"; do line+=" + $n ${CAP[$n]}s"; done
    line+=" + archive ${ARCHIVE_S}s + margin ${MARGIN_S}s = ${need}s of a ${DEVICE_CALL_S}s device call"
    if [ "$need" -le "$DEVICE_CALL_S" ]; then
        echo "$line: fits ($(( DEVICE_CALL_S - need ))s to spare)"
        return 0
    fi
    echo "$line: DOES NOT FIT (over by $(( need - DEVICE_CALL_S ))s): lower the caps in benchmarks/gpu_suite.sh" >&2
    return 1
}

if [ "$PLAN_ONLY" = 1 ]; then
    plan_fits "$INSTALL_PLAN_S" || exit 2
    exit 0
fi
if [ "$DRY" = 1 ]; then
    plan_fits "$INSTALL_PLAN_S" || exit 2
fi

OUT_DIR="${1:-${OUT:-runs/gpu-suite-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")"
REC="$WORK/records"
mkdir -p "$REC"
LOG="$OUT_DIR/suite.log"
: > "$LOG"
# The checkout's venv when there is one (the README's command, from a shell with no venv
# activated), else python3 (the GPU host's system Python); $PYTHON wins.
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FAILED=0
# The whole call's budget (SUITE_BUDGET overrides). A dry run on a small shared CPU gets more,
# and caps 4x as long (imports alone take seconds per stage, inductor compiles on 2 cores):
# there the point is that every line runs, not the clock.
BUDGET="${SUITE_BUDGET:-$([ "$DRY" = 1 ] && echo 2400 || echo $(( DEVICE_CALL_S - MARGIN_S )))}"
CAP_SCALE=$([ "$DRY" = 1 ] && echo 4 || echo 1)
# ... and at least 200 s a stage: a cap cut for the GPU (step's 30 s) must not starve the dry run,
# whose DeepSpeed start alone takes a minute on a busy 2-core builder.
CAP_FLOOR=$([ "$DRY" = 1 ] && echo 200 || echo 0)

say() { echo "[gpu-suite $(( SECONDS - START ))s] $*" | tee -a "$LOG"; }

# The table and the archive as they stand: rewritten after every stage, so that whatever stops
# the call, OUT_DIR holds what was measured up to then.
checkpoint() {
    "$PY" -m benchmarks.suite_summary "$REC" --wall "$(( SECONDS - START ))" > "$OUT_DIR/summary.md.tmp" 2>> "$LOG" \
        && mv "$OUT_DIR/summary.md.tmp" "$OUT_DIR/summary.md" \
        || { echo "summary failed (see suite.log)" > "$OUT_DIR/summary.md"; rm -f "$OUT_DIR/summary.md.tmp"; FAILED=1; }
    tar -czf "$OUT_DIR/records.tar.gz.tmp" -C "$WORK" records && mv "$OUT_DIR/records.tar.gz.tmp" "$OUT_DIR/records.tar.gz"
}

# stage NAME CMD...: run CMD with at most min(its cap, what is left of the budget) seconds;
# output to the log and to records/NAME.log; one line per stage in records/stages.tsv
# (name, status, seconds, cap).
stage() {
    local name="$1"; shift
    local cap=$(( CAP[$name] * CAP_SCALE > CAP_FLOOR ? CAP[$name] * CAP_SCALE : CAP_FLOOR ))
    local left=$(( BUDGET - ARCHIVE_S - (SECONDS - START) ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ]; then
        say "$name: skipped, no time left"
        printf '%s\tskipped\t0\t%s\n' "$name" "$cap" >> "$REC/stages.tsv"
        FAILED=1
        return 1
    fi
    say "$name: start (at most ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$REC/$name.log" 2>&1
    local rc=$?
    cat "$REC/$name.log" >> "$LOG"
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status="failed($rc)"; fi
    [ "$status" = ok ] || FAILED=1
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" "$limit" >> "$REC/stages.tsv"
    say "$name: $status in $(( SECONDS - t0 ))s"
    checkpoint
    return 0
}

# ---------------------------------------------------------------- sizes
CORES=$(nproc)
if [ "$DRY" = 1 ]; then
    # CPU, tiny: the point is that every line of this script runs. 48 JPEGs: 6 batches of 8 per
    # epoch, so that the e2e's timed windows fit inside an epoch as on the GPU.
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
    GEN=(--classes 2 --train-per-class 24 --val-per-class 1)
    TINY='{"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}'
    MODEL=(--model ti --model-kwargs "$TINY")
    TEACHER=(--teacher resnet10t)
    SMALL=(--img-size 32 --batch 4 --classes 5 --threads 1 --warmup 1 --steps 1 --rounds 1 --rewarm 0)
    E2E=("${MODEL[@]}" "${TEACHER[@]}" --img-size 32 --batch 8 --workers 1 --warmup 1 --steps 2 --rounds 2
         --rewarm 1 --threads 1)
    STEP=("${MODEL[@]}" "${TEACHER[@]}" "${SMALL[@]}" --variants fastdeit)
    STEP_COMPILE=("${MODEL[@]}" "${TEACHER[@]}" "${SMALL[@]}" --variants fastdeit-student --compile both)
    # Dynamo off for this stage: inductor's C++ build of the tiny graphs took 25 of the dry run's
    # 85 s on 2 cores, and the compiled path of benchmarks.step has its own test
    # (tests/test_benchmarks.py, compiled and eager in one run); here every line still runs.
    COMPILE_ENV=(env TORCH_COMPILE_DISABLE=1)
    STEP_EXTRAS=("${MODEL[@]}" "${TEACHER[@]}" --img-size 32 16 --batch 4 --classes 5 --threads 1 --warmup 1
                 --steps 1 --rounds 1 --rewarm 0 --variants fastdeit-student fastdeit-ema fastdeit-lamb)
    DATA=(--batch 8 --workers 1 --epochs 2 --img-size 32 --three-augment)
    MEMSTEP=("${MODEL[@]}" "${TEACHER[@]}" --img-size 32 --batch 4 --classes 5 --warmup 1 --steps 1)
    PIPE=(--batch 8 --img-size 32 --batches 2)
    INFER=(--models deit_tiny_patch16_224 resnet50 --img-size 32 --batch-cap 2 --compile off --warmup 1
           --seconds 0.2 --threads 1)
    IMAGES="$WORK/inet"
else
    unset DS_ACCELERATOR                 # DeepSpeed picks the GPU
    # 100 classes x 64 = 6,400 ImageNet-like JPEGs (~0.7 GB, ~40 s on 16 cores, while the smoke
    # stage runs): 25 batches of 256 per epoch, room for the e2e's 13-step windows.
    GEN=(--classes 100 --train-per-class 64 --val-per-class 2)
    MODEL=(--model b)
    TEACHER=(--teacher regnety_160)
    E2E=("${MODEL[@]}" "${TEACHER[@]}" --img-size 224 --batch 256 --workers "$CORES" --warmup 5 --steps 10
         --rounds 3 --rewarm 3)
    STEP=("${MODEL[@]}" "${TEACHER[@]}" --img-size 224 --batch 256 --variants fastdeit
          --warmup 3 --steps 10 --rounds 3)
    # Student-only: inductor compiling DeiT-B fits the cap; the distilled step would compile the
    # teacher and a second student too (~2x), which does not.
    COMPILE_ENV=()
    STEP_COMPILE=("${MODEL[@]}" --img-size 224 --batch 256 --variants fastdeit-student
                  --compile both --warmup 3 --steps 10 --rounds 2)
    STEP_EXTRAS=("${MODEL[@]}" "${TEACHER[@]}" --img-size 224 160 --batch 256
                 --variants fastdeit-student fastdeit-ema fastdeit-lamb --warmup 3 --steps 5 --rounds 2)
    DATA=(--batch 256 --workers "$CORES" --epochs 3 --three-augment)
    MEMSTEP=("${MODEL[@]}" "${TEACHER[@]}" --img-size 224 --batch 256 --warmup 3 --steps 5)
    PIPE=(--batch 256 --batches 20)
    # All 22 models eager, largest batch up to 256 (none should need less on 141 GB), 2 warm-up
    # iterations (cuDNN autotunes the convnets there) and 0.3 s timed each; models are measured
    # smallest inputs first and none is started after 22 s of its run (imports come first), so
    # the stage ends inside its cap and the record names what was left. Compiled: one inductor compile per model does not fit the
    # call (run python -m benchmarks.infer --compile both outside the suite).
    INFER=(--batch-cap 256 --compile off --warmup 2 --seconds 0.3 --budget 22)
    IMAGES="${SUITE_DATA:-/tmp/fastdeit-inet-suite}"
fi

# ---------------------------------------------------------------- DALI and DeepSpeed
INSTALL_S=0
if [ "$DRY" = 0 ] && ! "$PY" -c "import nvidia.dali, deepspeed" > /dev/null 2>&1; then
    if [ -d .devsite ]; then
        export PYTHONPATH="$ROOT/.devsite:$PYTHONPATH"
    fi
    if ! "$PY" -c "import nvidia.dali, deepspeed" > /dev/null 2>&1; then
        LAST=$(ls -d .devwheels/c* 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$LAST" ] && [ -f "$LAST/install.sh" ]; then
            say "installing the staged wheels: source $LAST/install.sh"
            t0=$SECONDS
            # shellcheck disable=SC1090
            source "$LAST/install.sh" >> "$LOG" 2>&1
            INSTALL_S=$(( SECONDS - t0 ))
            export PYTHONPATH="$ROOT/.devsite:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        else
            say "DALI or DeepSpeed missing and no .devwheels/cN/install.sh: see benchmarks/README.md"
        fi
    fi
fi
printf 'install\tok\t%s\t%s\n' "$INSTALL_S" "$INSTALL_PLAN_S" >> "$REC/stages.tsv"
say "mode: $([ "$DRY" = 1 ] && echo "dry run (CPU, tiny sizes)" || echo GPU), python: $PY, out: $OUT_DIR"
say "$(plan_fits "$(( SECONDS - START ))" 2>&1)"   # with what the install took here

# ---------------------------------------------------------------- stages
export PY REC
# JPEGs on every core while the smoke stage runs (the timed benchmarks wait for them).
say "generating ImageNet-like JPEGs in $IMAGES (background)"
( timeout $(( (CAP[smoke] + CAP[jpegs]) * CAP_SCALE )) "$PY" -m fastdeit.data.synthetic --mode imagenet --out "$IMAGES" "${GEN[@]}" --workers "$CORES" \
    > "$REC/jpegs-generate.log" 2>&1; echo $? > "$REC/jpegs.rc" ) &
GEN_PID=$!

stage smoke bash -c '"$PY" -m benchmarks.suite_summary --versions; nvidia-smi || echo "nvidia-smi: not found"
    "$PY" -m fastdeit.doctor && "$PY" -m pytest -m gpu -x -q -rfEs -p no:cacheprovider tests/test_data_loader.py'

# The generator's status as a stage: the wait for it is capped.
stage jpegs bash -c 'until [ -f "$REC/jpegs.rc" ]; do sleep 1; done; cat "$REC/jpegs-generate.log"; exit "$(cat "$REC/jpegs.rc")"'
wait "$GEN_PID"       # the generator's own timeout ends it at the latest as the jpegs cap does

stage e2e "$PY" -m benchmarks.e2e --data "$IMAGES" "${E2E[@]}" --out "$REC" --name suite
stage step "$PY" -m benchmarks.step "${STEP[@]}" --out "$REC" --name suite
stage step_compile "${COMPILE_ENV[@]}" "$PY" -m benchmarks.step "${STEP_COMPILE[@]}" --out "$REC" --name compile
stage data "$PY" benchmarks/data.py --data "$IMAGES" "${DATA[@]}" --out "$REC/data"
# The step's memory, then one train pipeline's (two processes, one cap; MEMSTEP's length first).
stage memory bash -c 'n=$1; shift; "$PY" -m benchmarks.memory step "${@:1:n}" --out "$REC/memory-step.json"; rc=$?
    shift "$n"; "$PY" -m benchmarks.memory pipeline "$@" --out "$REC/memory-pipeline.json" || rc=$?; exit "$rc"' \
    memory "${#MEMSTEP[@]}" "${MEMSTEP[@]}" --data "$IMAGES" "${PIPE[@]}"
stage step_extras "$PY" -m benchmarks.step "${STEP_EXTRAS[@]}" --out "$REC" --name extras
stage infer "$PY" -m benchmarks.infer "${INFER[@]}" --out "$REC" --name suite
stage pytest_gpu "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider --junitxml="$REC/pytest_gpu.xml" tests

# ---------------------------------------------------------------- the table, the archive
checkpoint
rm -rf "$WORK"
cat "$OUT_DIR/summary.md" | tee -a "$LOG"
exit "$FAILED"
