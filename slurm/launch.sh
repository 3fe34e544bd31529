#!/bin/bash
# One preemption-safe training run inside a SLURM allocation (called by the sbatch templates):
#   launch.sh CONFIG [--section.key=value ...]
# srun starts one task per GPU (or per CPU task) of the allocation, each running
# `python -m megatron_sgtm.sweep.job` (= `megatron-sgtm train` with checkpoint.resume=auto); the
# tasks derive RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from SLURM's variables.
# USR1 (sbatch --signal=B:USR1@120 before the time limit, or `scancel --batch --signal=USR1 JOB`) and
# TERM are forwarded to the tasks, which save a checkpoint and stop with exit status 75; after USR1 a run
# that stopped so requeues its job (`scontrol requeue`), which resumes from that checkpoint. After TERM
# (scancel, `scontrol requeue`, preemption) SLURM itself decides whether the job comes back, and the
# script exits 75 (sacct shows ExitCode 75:0 for a stopped, unfinished run).
set -uo pipefail
# shellcheck source=slurm/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ $# -lt 1 ]; then echo "usage: launch.sh CONFIG [--section.key=value ...]" >&2; exit 2; fi

STOPPED_EXIT_STATUS=75  # megatron_sgtm.training.loop.STOPPED_EXIT_STATUS
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
# The tasks of a run that stopped on a signal after saving its checkpoint exit with 75 (EX_TEMPFAIL) and
# rank 0 reports "stopped" (the status line also covers an srun that ended the last tasks itself).
if [ "$status" = stopped ] || [ "$rc" -eq "$STOPPED_EXIT_STATUS" ]; then
    # Only after USR1 (the time limit is near) does the script requeue: after TERM, SLURM decides (scancel
    # ends the job, preemption and `scontrol requeue` bring it back). A failed run (a non-finite loss, a
    # refused checkpoint, a crash) is never requeued: it would fail again, forever.
    if [ "$signal" = USR1 ]; then
        echo "[sgtm] requeueing job ${SLURM_JOB_ID} to resume from the newest checkpoint"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "[sgtm] scontrol requeue failed: resubmit to resume" >&2
    fi
    exit "$STOPPED_EXIT_STATUS"
fi
exit $(( rc == 0 ? 1 : rc ))
