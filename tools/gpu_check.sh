#!/usr/bin/env bash
# The prepared GPU check: on a CUDA machine without a package index, in under 10 minutes,
#   1. a venv with --system-site-packages over the machine's own CUDA torch;
#   2. megatron-core 0.16.1 and the project's runtime deps from a wheel directory (plus Transformer
#      Engine and flash-attn when their wheels are there; without TE the `gpu` backend uses SDPA);
#   3. the GPU test subset: the `gpu` backend's SGTM model (TE's varlen attention, bf16) fed megatron's
#      PackedSeqParams against the dense document mask (tests/distributed/test_packed_attention.py);
#   4. tools/bench_sgtm_overhead.py at ~1B parameters in bf16 (plain megatron layers vs SGTM layers);
#   5. tools/bench_train.py at ~1B, seq 2048, megatron engine, methods sgtm and none;
# printing tokens/s, MFU (against the dense bf16 peak of megatron_sgtm.training.logging.PEAK_TFLOPS:
# H100/H200 989 TFLOPS) and CUDA max_memory_allocated.
#
# Usage: tools/gpu_check.sh [--wheels DIR] [--venv DIR] [--out DIR] [--python EXE] [--budget S]
#                           [--dry-run] [--print-download]
#   --wheels DIR      cp312 / py3 wheels (default: wheels/ in the checkout, git-ignored)
#   --venv DIR        the venv to create or reuse (default: $TMPDIR/sgtm-gpu-venv)
#   --out DIR         logs and JSON results (default: runs/gpu_check in the checkout)
#   --python EXE      the interpreter that owns the machine's torch (default: python3); with --dry-run
#                     the one that runs the checks
#   --budget S        seconds for the whole check; each step's timeout is cut to what is left (default 540)
#   --dry-run         print every step's command and check that the tools, tests and flags they use
#                     exist (each python tool's --help, pytest's collection); installs and runs nothing
#   --print-download  print the commands that fill the wheel directory (run them on a machine with an
#                     index, then carry wheels/ along)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS="$ROOT/wheels"
VENV="${TMPDIR:-/tmp}/sgtm-gpu-venv"
OUT="$ROOT/runs/gpu_check"
PYTHON=python3
BUDGET=540
DRY_RUN=0

# Runtime deps of the checked paths (megatron-core without its torch: the machine's torch stays).
PACKAGES=(numpy packaging pyyaml psutil safetensors tokenizers webdataset einops pytest)
MEGATRON=megatron-core==0.16.1
PLATFORM_ARGS="--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64"
TEST_FILE=tests/distributed/test_packed_attention.py
TEST_SELECT="single_device or cu_seqlens"
# ~1B parameters (gpt2 shape: 12 x 20 x 2048^2 + embeddings), seq 2048, bf16.
MODEL_ARGS=(--hidden 2048 --layers 20 --heads 16 --seq 2048 --micro-batch 4 --bf16)
OVERHEAD_ARGS=("${MODEL_ARGS[@]}" --arch gpt2 --steps 8 --warmup 2 --device cuda --backend gpu)
TRAIN_ARGS=("${MODEL_ARGS[@]}" --global-batch 16 --steps 15 --warmup 5 --engines megatron --timeout 120)

die() { echo "tools/gpu_check.sh: $*" >&2; exit 2; }

print_download() {
    echo "pip download $PLATFORM_ARGS -d wheels --no-deps $MEGATRON"
    echo "pip download $PLATFORM_ARGS -d wheels ${PACKAGES[*]}"
    echo "# optional, built for the machine's torch/CUDA: transformer_engine*.whl, flash_attn*.whl into wheels/"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
        --venv) VENV=${2:?--venv needs a directory}; shift 2 ;;
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --print-download) print_download; exit 0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget $BUDGET: expected whole seconds"
WHEELS=$(realpath -m "$WHEELS")
OUT=$(realpath -m "$OUT")
VPY="$VENV/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
cd "$ROOT"

# step NAME CAP_SECONDS CMD...: print the step; unless --dry-run, run it under what is left of the budget.
step() {
    local name=$1 cap=$2
    shift 2
    echo "[step] $name (<= ${cap}s): $(printf '%q ' "$@")"
    [[ $DRY_RUN == 1 ]] && return 0
    local left=$((BUDGET - SECONDS))
    ((left >= 10)) || die "step $name: the --budget of ${BUDGET}s is spent"
    ((cap <= left)) || cap=$left
    local start=$SECONDS
    timeout "$cap" "$@" || die "step $name failed (exit $?) after $((SECONDS - start))s"
    echo "[done] $name in $((SECONDS - start))s (total ${SECONDS}s)"
}

# optional_wheel PATTERN NAME: install the wheels matching PATTERN if any; a failure only warns.
optional_wheel() {
    local pattern=$1 name=$2
    local found=("$WHEELS"/$pattern)
    if [[ ! -e ${found[0]} ]]; then
        echo "[skip] $name: no $pattern in $WHEELS"
        return 0
    fi
    echo "[step] $name: $(printf '%q ' "$VPY" -m pip install --no-index --find-links "$WHEELS" "${found[@]}")"
    [[ $DRY_RUN == 1 ]] && return 0
    timeout 120 "$VPY" -m pip install -q --no-index --find-links "$WHEELS" "${found[@]}" \
        || echo "[warn] $name did not install; continuing without it"
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
    check_flags tools/bench_train.py "${TRAIN_ARGS[@]}" --json
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

echo "gpu_check: checkout $ROOT, wheels $WHEELS, venv $VENV, out $OUT, budget ${BUDGET}s"
step venv 60 "$PYTHON" -m venv --system-site-packages "$VENV"
step install 120 "$VPY" -m pip install -q --no-index --find-links "$WHEELS" "$MEGATRON" "${PACKAGES[@]}"
optional_wheel "transformer_engine*.whl" "transformer-engine"
optional_wheel "flash_attn*.whl" "flash-attn"
step environment 60 "$VPY" -c "import torch, megatron.core; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), \
'megatron-core', megatron.core.__version__)"
step tests 150 "$VPY" -m pytest -q -x "$TEST_FILE" -k "$TEST_SELECT"
step overhead 150 "$VPY" tools/bench_sgtm_overhead.py "${OVERHEAD_ARGS[@]}" --json "$OUT/overhead.json"
echo "[step] summary: tokens/s, MFU and memory from $OUT/overhead.json"
[[ $DRY_RUN == 1 ]] || overhead_summary
step train 300 "$VPY" tools/bench_train.py "${TRAIN_ARGS[@]}" --json "$OUT/train.json"

if [[ $DRY_RUN == 1 ]]; then
    validate
    echo "gpu_check: dry run OK (nothing installed or run)"
else
    echo "gpu_check: done in ${SECONDS}s; results in $OUT (overhead.json, train.json, gpu_check.log)"
fi
