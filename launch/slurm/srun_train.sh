#!/bin/bash
# The body both sbatch templates run: one training task per GPU under srun, requeue on 75.
#
# Rank, world size and local rank come from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID);
# fastdeit.distributed takes the master address from the first node of the allocation.
# Preemption and time limits: SLURM sends SIGUSR2 to every task before the limit (the
# templates' --signal, matching trainer.stop_signals) and SIGTERM on preemption; each rank finishes its step, the run
# checkpoints into trainer.run_dir and exits 75, and this script requeues the job. The
# requeued job resumes from the run dir automatically: keep it on a shared filesystem.
# --kill-on-bad-exit ends every task when one fails, so no rank waits forever in a collective;
# a preempted rank's exit 75 counts as a failure to srun too, and the others, which have
# written the same checkpoint, ignore that SIGTERM and exit 75 as well (fastdeit.preemption).
set -uo pipefail
CONFIG=${1:?usage: sbatch launch/slurm/<template>.sbatch CONFIG [key=value ...]}
shift

export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
# Threads: each rank splits its SLURM_CPUS_PER_TASK between DALI, its host threads and torch
# (fastdeit.threads.thread_budget; logged at start). Setting OMP_NUM_THREADS here would
# override torch's share: with the data on the GPU one intra-op thread is enough.
PYTHON=${PYTHON:-.venv/bin/python}

srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" launch/train.py --config "$CONFIG" "$@"
rc=$?
if [ "$rc" -eq 75 ]; then
    echo "preempted with a checkpoint written: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
