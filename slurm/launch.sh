#!/bin/bash
# One preemption-safe training run inside a SLURM allocation (called by the sbatch templates):
#   launch.sh CONFIG [--section.key=value ...]
# srun starts one task per GPU (or per CPU task) of the allocation, each running
# `python -m megatron_sgtm.sweep.job` (= `megatron-sgtm train` with checkpoint.resume=auto); the
# tasks derive RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from SLURM's variables.
# USR1 (sbatch --signal=B:USR1@120 before the time limit, or `scancel --batch --signal=USR1 JOB`) and
# TERM are forwarded to the tasks, which save a checkpoint and stop; after USR1 a run that stopped so
# requeues its job (`scontrol requeue`), which resumes from that checkpoint. After TERM
# (scancel, `scontrol requeue`, preemption) SLURM itself decides whether the job comes back.
set -uo pipefail
# shellcheck source=slurm/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ $# -lt 1 ]; then echo "usage: launch.sh CONFIG [--section.key=value ...]" >&2; exit 2; fi

status_file=$(mktemp "${TMPDIR:-/tmp}/sgtm-status.XXXXXX")
export SGTM_STATUS_FILE="$status_file"
trap 'rm -f "$status_file"' EXIT
echo "[sgtm] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} task(s), $*"

signal=""
step=""
forward() {
    signal=$1
    echo "[sgtm] SIG$1 received: the tasks checkpoint and stop"
    kill -"$1" "$step" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --kill-on-bad-exit=1 "$SGTM_PYTHON" -m megatron_sgtm.sweep.job "$@" &
step=$!
# `wait` returns early when a trapped signal arrives: keep waiting until srun has exited.
while :; do
    wait "$step"
    rc=$?
    kill -0 "$step" 2>/dev/null || break
done
status=$(cat "$status_file" 2>/dev/null)
echo "[sgtm] srun exited with $rc; run ${status:-did not report}"
if [ "$status" = finished ]; then exit 0; fi
# Only a run that stopped on USR1 after saving its checkpoint ("stopped") comes back: one that failed (a
# non-finite loss, a refused checkpoint, a crash) would fail again, requeued forever; it exits non-zero.
if [ "$signal" = USR1 ] && [ "$status" = stopped ]; then
    echo "[sgtm] requeueing job ${SLURM_JOB_ID} to resume from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[sgtm] scontrol requeue failed: resubmit to resume" >&2
fi
exit $(( rc == 0 ? 1 : rc ))
