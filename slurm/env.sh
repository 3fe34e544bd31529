# Shared environment of every megatron-sgtm job step; sourced by launch.sh.
# SGTM_HOME: the megatron-sgtm checkout (sbatch copies job scripts away, so it cannot be found from
# the script's path): set by `megatron-sgtm sweep`, otherwise the directory sbatch was run from.
# SGTM_PYTHON: the interpreter (default: $SGTM_HOME/.venv/bin/python, else python3 on PATH).
# Site-specific set-up (module load, conda activate, NCCL/network variables) goes in
# $SGTM_HOME/slurm/site.sh, which is sourced when it exists.
export SGTM_HOME="${SGTM_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [ -f "$SGTM_HOME/slurm/site.sh" ]; then
    # shellcheck disable=SC1091
    . "$SGTM_HOME/slurm/site.sh"
fi
if [ -z "${SGTM_PYTHON:-}" ]; then
    if [ -x "$SGTM_HOME/.venv/bin/python" ]; then SGTM_PYTHON="$SGTM_HOME/.venv/bin/python"; else SGTM_PYTHON=python3; fi
fi
export SGTM_PYTHON
export PYTHONPATH="$SGTM_HOME${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
# One OpenMP thread per CPU the task was given (torch would otherwise start one per core of the node).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
