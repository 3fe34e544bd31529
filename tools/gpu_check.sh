#!/usr/bin/env bash
# The prepared GPU check: on a CUDA machine without a package index, in under 10 minutes,
#   1. megatron-core 0.16.1 and what the machine lacks, from a wheel directory, installed with
#      `pip --target` into a site directory put first on PYTHONPATH: the machine's own CUDA torch stays (a
#      venv made from an interpreter that is itself a venv would not see that torch);
#   2. the GPU test subset: the `gpu` backend's SGTM model (TE's varlen attention where TE is installed,
#      else SDPA; bf16) fed megatron's PackedSeqParams against the dense document mask
#      (tests/distributed/test_packed_attention.py);
#   3. tools/bench_sgtm_overhead.py at ~1B parameters in bf16 (plain megatron layers vs SGTM layers);
#   4. tools/bench_train.py at ~1B, seq 2048, megatron engine, methods sgtm and none, with plain causal
#      attention (`--attention causal`: the trainer around the layers bench_sgtm_overhead measures), then
#      one short round with the trainer's packed document attention (without TE: one SDPA call per
#      distinct document length, the launch-bound path the first GPU run found 10x slower);
#   5. where DeepSpeed is installed: tools/bench_train.py at ~350M, DeepSpeed ZeRO-1 in bf16, one round;
# printing tokens/s, MFU (against the dense bf16 peak of megatron_sgtm.training.logging.PEAK_TFLOPS:
# H100/H200 989 TFLOPS) and CUDA max_memory_allocated. A failed step is reported and the next one runs
# (a GPU lease is short); the exit status is 1 if any step failed, with their names on the last line.
#
# Usage: tools/gpu_check.sh [--wheels DIR] [--site DIR] [--out DIR] [--python EXE] [--budget S]
#                           [--tiny] [--dry-run] [--print-download]
#   --wheels DIR      cp312 / py3 wheels (default: wheels/ in the checkout, git-ignored)
#   --site DIR        where the wheels are installed (default: $TMPDIR/sgtm-gpu-site)
#   --out DIR         logs and JSON results, and job_logs.tgz: the benchmark jobs' own logs (default:
#                     runs/gpu_check in the checkout)
#   --runs DIR        the benchmark jobs' data and run directories (default: $TMPDIR/sgtm-gpu-runs)
#   --python EXE      the interpreter that owns the machine's torch (default: python3)
#   --budget S        seconds for the whole check; each step's timeout is cut to what is left (default 570)
#   --tiny            tiny models on the CPU: rehearse the script on a machine without a GPU (figures mean
#                     nothing; the wheels must suit that machine's Python)
#   --dry-run         print every step's command and check that the tools, tests and flags they use
#                     exist (each python tool's --help, pytest's collection); installs and runs nothing
#   --print-download  print the commands that fill the wheel directory (run them on a machine with an
#                     index, then carry wheels/ along)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS="$ROOT/wheels"
SITE="${TMPDIR:-/tmp}/sgtm-gpu-site"
RUNS="${TMPDIR:-/tmp}/sgtm-gpu-runs"
OUT="$ROOT/runs/gpu_check"
PYTHON=python3
BUDGET=570
DRY_RUN=0
TINY=0

# What the checked paths import beyond a CUDA torch image (which has numpy, packaging, pyyaml, psutil,
# safetensors, tokenizers, transformers, einops and pytest: the `environment` step checks they import).
MEGATRON=megatron-core==0.16.1
PACKAGES=(webdataset==1.0.2 braceexpand==0.1.7)
DEEPSPEED=deepspeed==0.19.8  # an sdist: `pip wheel` builds a py3 wheel (no compiled ops)
DEEPSPEED_DEPS=(hjson pydantic pydantic_core annotated_types typing_inspection)
IMPORTS="numpy, packaging, yaml, psutil, safetensors, tokenizers, transformers, einops, pytest, webdataset"
PLATFORM_ARGS="--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64"
TEST_FILE=tests/distributed/test_packed_attention.py
TEST_SELECT="single_device or cu_seqlens"
# ~1B parameters (gpt2 shape: 12 x 20 x 2048^2 + embeddings), seq 2048, bf16; DeepSpeed at ~350M.
MODEL_ARGS=(--hidden 2048 --layers 20 --heads 16 --seq 2048 --micro-batch 4 --bf16)
DS_MODEL_ARGS=(--hidden 1024 --layers 24 --heads 16 --seq 2048 --micro-batch 4 --bf16)
DEVICE=cuda

die() { echo "tools/gpu_check.sh: $*" >&2; exit 2; }

print_download() {
    echo "pip download $PLATFORM_ARGS -d wheels --no-deps $MEGATRON ${PACKAGES[*]}"
    echo "# optional, DeepSpeed's step: a py3 wheel built from its sdist, and its deps the image lacks"
    echo "DS_BUILD_OPS=0 pip wheel --no-deps -w wheels $DEEPSPEED"
    echo "pip download $PLATFORM_ARGS -d wheels --no-deps ${DEEPSPEED_DEPS[*]}"
    echo "# optional, built for the machine's torch/CUDA: transformer_engine*.whl, flash_attn*.whl into wheels/"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
        --site) SITE=${2:?--site needs a directory}; shift 2 ;;
        --runs) RUNS=${2:?--runs needs a directory}; shift 2 ;;
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --tiny) TINY=1; shift ;;
        --print-download) print_download; exit 0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget $BUDGET: expected whole seconds"
if [[ $TINY == 1 ]]; then
    MODEL_ARGS=(--hidden 64 --layers 2 --heads 2 --seq 128 --micro-batch 2 --bf16)
    DS_MODEL_ARGS=("${MODEL_ARGS[@]}")
    DEVICE=cpu
fi
OVERHEAD_ARGS=("${MODEL_ARGS[@]}" --arch gpt2 --steps 8 --warmup 2 --device "$DEVICE" --backend gpu)
TRAIN_ARGS=("${MODEL_ARGS[@]}" --global-batch 16 --steps 12 --warmup 4 --engines megatron --repeats 2 --timeout 150
            --attention causal)
PACKED_ARGS=("${MODEL_ARGS[@]}" --global-batch 16 --steps 6 --warmup 2 --engines megatron --repeats 1 --timeout 150
             --attention packed)
DS_ARGS=("${DS_MODEL_ARGS[@]}" --global-batch 16 --steps 6 --warmup 2 --engines deepspeed --zero-stage 1 --repeats 1
         --timeout 150 --attention causal)
WHEELS=$(realpath -m "$WHEELS")
SITE=$(realpath -m "$SITE")
RUNS=$(realpath -m "$RUNS")
OUT=$(realpath -m "$OUT")
VPY=$PYTHON
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
FAILED=()
cd "$ROOT"

# step NAME CAP_SECONDS CMD...: print the step; unless --dry-run, run it under what is left of the budget.
# A failure is recorded in FAILED and the check goes on.
step() {
    local name=$1 cap=$2
    shift 2
    echo "[step] $name (<= ${cap}s): $(printf '%q ' "$@")"
    [[ $DRY_RUN == 1 ]] && return 0
    local left=$((BUDGET - SECONDS))
    if ((left < 10)); then
        echo "[fail] $name: the --budget of ${BUDGET}s is spent"
        FAILED+=("$name")
        return 0
    fi
    ((cap <= left)) || cap=$left
    local start=$SECONDS rc=0
    timeout "$cap" "$@" || rc=$?
    if ((rc != 0)); then
        echo "[fail] $name (exit $rc$( ((rc == 124)) && echo ": timed out")) after $((SECONDS - start))s"
        FAILED+=("$name")
        return 0
    fi
    echo "[done] $name in $((SECONDS - start))s (total ${SECONDS}s)"
}

# The MFU and memory lines of bench_sgtm_overhead's JSON (bench_train prints its own).
overhead_summary() {
    "$VPY" - "$OUT/overhead.json" <<'EOF'
import json, sys
from megatron_sgtm.training.config import from_dict
from megatron_sgtm.training.logging import PEAK_TFLOPS, model_flops_per_token

record = json.load(open(sys.argv[1]))
a = record["args"]
model = {"arch": a["arch"], "num_layers": a["layers"], "hidden_size": a["hidden"], "num_attention_heads": a["heads"],
         "vocab_size": a["vocab"], "seq_length": a["seq"]}
flops = model_flops_per_token(from_dict({"model": model}))
peak = next((v for k, v in PEAK_TFLOPS.items() if k in record["device"]), None)
print(f"bench_sgtm_overhead on {record['device']}: {record['params'] / 1e9:.2f}B params, peak {peak} TFLOPS bf16")
for name, f in record["variants"].items():
    mfu = f"{f['tokens_per_s'] * flops / (peak * 1e12):.2%}" if peak else "n/a"
    print(f"  {name:5s} {f['tokens_per_s']:,.0f} tokens/s  MFU {mfu}  memory: state {f['state_mib']:,.0f} MiB + step "
          f"peak {f['peak_step_extra_mib']:,.0f} MiB (CUDA max_memory_allocated above the step start)")
print(f"  step-time ratio sgtm/plain {record['ratio_sgtm_over_plain']:.3f}")
EOF
}

# --dry-run: the tools, the test selection and every flag the steps pass must exist.
validate() {
    local tool flag help
    for tool in tools/bench_sgtm_overhead.py tools/bench_train.py "$TEST_FILE"; do
        [[ -f $tool ]] || die "$tool is missing"
    done
    check_flags() {
        local tool=$1
        shift
        help=$("$PYTHON" "$tool" --help 2>&1) || die "$tool --help failed: $help"
        for flag in "$@"; do
            [[ $flag == --* ]] || continue
            grep -q -- "$flag\b" <<<"$help" || die "$tool has no flag $flag"
        done
        echo "[ok] $tool takes ${*}"
    }
    check_flags tools/bench_sgtm_overhead.py "${OVERHEAD_ARGS[@]}" --json
    check_flags tools/bench_train.py "${TRAIN_ARGS[@]}" "${PACKED_ARGS[@]}" "${DS_ARGS[@]}" --json
    local collected
    collected=$("$PYTHON" -m pytest --collect-only -q "$TEST_FILE" -k "$TEST_SELECT" 2>&1 | grep -Eo '^[0-9]+(/[0-9]+)? tests? collected' || true)
    [[ -n $collected ]] || die "pytest selects no test in $TEST_FILE with -k '$TEST_SELECT'"
    echo "[ok] $TEST_FILE -k '$TEST_SELECT': $collected"
    if ls "$WHEELS"/megatron_core-0.16.1-*.whl >/dev/null 2>&1; then
        echo "[ok] $WHEELS holds megatron-core 0.16.1"
    else
        echo "[note] $WHEELS holds no megatron_core-0.16.1 wheel yet; fill it with (tools/gpu_check.sh --print-download):"
        print_download | sed 's/^/    /'
    fi
}

if [[ $DRY_RUN == 0 ]]; then
    ls "$WHEELS"/megatron_core-0.16.1-*.whl >/dev/null 2>&1 \
        || die "--wheels $WHEELS: no megatron_core-0.16.1 wheel (see --print-download)"
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi

echo "gpu_check: checkout $ROOT, wheels $WHEELS, site $SITE, runs $RUNS, out $OUT, budget ${BUDGET}s"
step install 120 "$VPY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
CUDA_CHECK="assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
[[ $TINY == 1 ]] && CUDA_CHECK="print('--tiny: on the CPU')"
step environment 60 "$VPY" -c "import torch, megatron.core, importlib.util as u; $CUDA_CHECK; \
import $IMPORTS; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'megatron-core', megatron.core.__version__); \
[print(m, 'installed' if u.find_spec(m) else 'absent') for m in ('transformer_engine', 'flash_attn', 'deepspeed')]"
step tests 150 "$VPY" -m pytest -q -x "$TEST_FILE" -k "$TEST_SELECT"
step overhead 150 "$VPY" tools/bench_sgtm_overhead.py "${OVERHEAD_ARGS[@]}" --json "$OUT/overhead.json"
echo "[step] summary: tokens/s, MFU and memory from $OUT/overhead.json"
[[ $DRY_RUN == 1 || ! -f $OUT/overhead.json ]] || overhead_summary || FAILED+=(summary)
step train 250 "$VPY" tools/bench_train.py "${TRAIN_ARGS[@]}" --keep "$RUNS/train" --json "$OUT/train.json"
step train-packed 170 "$VPY" tools/bench_train.py "${PACKED_ARGS[@]}" --keep "$RUNS/packed" \
    --json "$OUT/train_packed.json"
if [[ $DRY_RUN == 1 ]] || "$VPY" -c "import deepspeed" >/dev/null 2>&1; then
    step deepspeed 200 "$VPY" tools/bench_train.py "${DS_ARGS[@]}" --keep "$RUNS/deepspeed" \
        --json "$OUT/train_deepspeed.json"
else
    echo "[skip] deepspeed: not importable (its wheels are optional: --print-download)"
fi

if [[ $DRY_RUN == 0 && -d $RUNS ]]; then
    (cd "$RUNS" && find . -name '*.log' -print0 | tar czf "$OUT/job_logs.tgz" --null -T -) || true
fi
if [[ $DRY_RUN == 1 ]]; then
    validate
    echo "gpu_check: dry run OK (nothing installed or run)"
elif ((${#FAILED[@]})); then
    echo "gpu_check: ${SECONDS}s; results in $OUT; FAILED steps: ${FAILED[*]}"
    exit 1
else
    echo "gpu_check: done in ${SECONDS}s; results in $OUT (overhead.json, train.json, gpu_check.log)"
fi
