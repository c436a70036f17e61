#!/usr/bin/env bash
# The GPU check of ddn, for one machine with one CUDA GPU, in under 8 minutes. In this order, each
# step capped in time (the cap printed) and skipped once the budget is spent:
#   1. versions (torch, CUDA, cuDNN, GPU);
#   2. the peer comparisons: our training step in bf16 vs the author's in fp16 (its default), batch
#      256, the reference CIFAR-10 net (bench/train_step.py, bench/author_speed.py), then generation,
#      ours (bench/generate.py: exact, all-K and fast paths) vs the author's (fp16);
#   3. tests/test_cuda.py (every body also runs on the CPU in CI);
#   4. the options: bf16 + --compile (regional), + --channels-last (compiled only), fp32; the author's fp32;
#   5. a summary: every figure in OUTDIR/figures.json (img/s, peak memory, MFU from the FLOPs that
#      bench/step_cost.py measures) and, as the LAST lines, train_speedup_vs_author=,
#      gen_speedup_vs_author=, mfu_train_best=.
#
#   bench/gpu.sh OUTDIR [AUTHOR_DIR]
#   bench/gpu.sh --quick OUTDIR [AUTHOR_DIR]     # a dry run on the CPU: tiny sizes, checks the script
#
# OUTDIR receives gpu.log (everything printed), one JSON per benchmark and figures.json.
# AUTHOR_DIR (or $DDN_AUTHOR_DIR) holds the author's code, prepared on a machine with internet:
#   git clone https://github.com/DIYer22/discrete_distribution_networks AUTHOR_DIR/ddn
#   pip download --no-deps sddn==0.0.2 boxx scikit-image imageio tifffile lazy_loader snakeviz tornado pyopengl -d AUTHOR_DIR/wheels
# The wheels are installed without an index or dependencies into OUTDIR/author-pkgs (no virtual
# environment: one made from the machine's python would not see its torch) and reach the author's
# benchmark through PYTHONPATH; without AUTHOR_DIR the author's steps and the ratios are skipped.
# MFU: images/s x the training FLOPs per image of bench/step_cost.py (267.1 GFLOP for the reference
# net: 89.96 forward + 177.18 backward; $DDN_TRAIN_GFLOP overrides) / $DDN_PEAK_TFLOPS (default 989:
# dense bf16 of an H100 / H200).
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
OUT=${1:?usage: bench/gpu.sh [--quick] OUTDIR [AUTHOR_DIR]}
AUTHOR=${2:-${DDN_AUTHOR_DIR:-}}
PEAK=${DDN_PEAK_TFLOPS:-989}
GFLOP=${DDN_TRAIN_GFLOP:-267.1}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu.log") 2>&1
START=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - START )) s)"; }
# run CAP CMD...: run CMD for at most CAP seconds (x SCALE), never past the script's budget.
run() {
    local cap=$(( $1 * SCALE )); shift
    local left=$(( BUDGET - ($(date +%s) - START) ))
    (( left < cap )) && cap=$left
    if (( cap < 10 )); then echo "SKIPPED (time budget spent): $*"; return 124; fi
    echo "--- cap ${cap} s: $*"
    local t0=$(date +%s)
    timeout "$cap" "$@"
    local rc=$?
    echo "--- took $(( $(date +%s) - t0 )) s, exit $rc"
    (( rc == 124 )) && echo "TIMED OUT after $cap s: $*"
    (( rc != 0 && rc != 124 )) && echo "FAILED (exit $rc): $*"
    return $rc
}

if (( ! QUICK )) && python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    CUDA=1; DEV=cuda; B=256; TRAIN=(--steps=10 --warmup=3); ATRAIN=(--steps=5 --warmup=2); GEN=(--steps=10 --warmup=2)
    BUDGET=${DDN_GPU_BUDGET:-470}; SCALE=1
else
    CUDA=0; DEV=cpu; B=1; TRAIN=(--steps=1 --warmup=0); ATRAIN=("${TRAIN[@]}"); GEN=(--steps=1 --warmup=0)
    BUDGET=${DDN_GPU_BUDGET:-3000}; SCALE=6    # A CPU step of the full net takes tens of seconds.
    echo "NO GPU (or --quick): a CPU run at batch $B to check this script; its figures are NOT GPU measurements."
fi

step versions
python - <<'EOF'
import platform, torch
print(f'python {platform.python_version()}; torch {torch.__version__}; CUDA {torch.version.cuda}; '
      f'cuDNN {torch.backends.cudnn.version()}')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}')
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

APY=()
if [ -n "$AUTHOR" ]; then
    AUTHOR=$(cd "$AUTHOR" && pwd)
    if python -c 'import sddn, boxx' 2> /dev/null; then
        APY=(python)
    else
        run 40 python -m pip install --quiet --no-index --no-deps --target "$OUT/author-pkgs" "$AUTHOR"/wheels/*.whl
        APY=(env "PYTHONPATH=$OUT/author-pkgs${PYTHONPATH:+:$PYTHONPATH}" python)
    fi
fi

step "peers: training, ours bf16 vs the author's fp16, batch $B"
run 50 python bench/train_step.py --device=$DEV --batch=$B --precision=bf16 "${TRAIN[@]}" --json="$OUT/train_bf16.json"
if (( ${#APY[@]} )); then
    if (( CUDA )); then
        run 60 "${APY[@]}" bench/author_speed.py --author-repo="$AUTHOR/ddn" --mode=train --precision=fp16 --batch=$B "${ATRAIN[@]}" --json="$OUT/author_train_fp16.json"
    else
        echo "the author's fp16 training step is skipped on the CPU (half-precision convolutions take minutes there)"
    fi
else
    echo "no AUTHOR_DIR: the author's code is not measured"
fi

step "peers: generation, ours (exact, all-K, fast) vs the author's fp16, batch $B"
run 45 python bench/generate.py --device=$DEV --batch=$B "${GEN[@]}" --json="$OUT/gen_ours.json"
if (( ${#APY[@]} )); then
    run 30 "${APY[@]}" bench/author_speed.py --author-repo="$AUTHOR/ddn" --mode=generate --precision=fp16 --batch=$B "${GEN[@]}" --json="$OUT/author_gen_fp16.json"
fi

step tests/test_cuda.py
if (( CUDA )); then
    run 100 python -m pytest -q -p no:cacheprovider tests/test_cuda.py -k cuda
else
    run 60 python -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "cpu and split_prune"
fi
echo "test_cuda_rc=$?"

step "options: bf16 + compile (regional), + channels-last, fp32; the author's fp32"
if (( CUDA )); then
    run 120 python bench/train_step.py --device=$DEV --batch=$B --precision=bf16 --compile=True "${TRAIN[@]}" --json="$OUT/train_bf16_compile.json"
    # Channels-last is offered with the compiled blocks only (eager GroupNorm copies NHWC to NCHW).
    run 90 python bench/train_step.py --device=$DEV --batch=$B --precision=bf16 --compile=True --channels-last=True "${TRAIN[@]}" --json="$OUT/train_bf16_channels_last.json"
else
    echo "bf16 + compile (and channels-last, which needs it) skipped on the CPU (inductor's C++ build of the 63-layer net takes many minutes there)"
fi
run 50 python bench/train_step.py --device=$DEV --batch=$B --precision=fp32 "${TRAIN[@]}" --json="$OUT/train_fp32.json"
if (( ${#APY[@]} )); then
    run 50 "${APY[@]}" bench/author_speed.py --author-repo="$AUTHOR/ddn" --mode=train --precision=fp32 --batch=$B "${ATRAIN[@]}" --json="$OUT/author_train_fp32.json"
fi

step summary
python bench/gpu_summary.py "$OUT" --peak-tflops="$PEAK" --train-gflop="$GFLOP"
echo "total $(( $(date +%s) - START )) s"
