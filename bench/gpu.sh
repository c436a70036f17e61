#!/usr/bin/env bash
# The GPU check of ddn, for one machine with one CUDA GPU, in under 8 minutes:
#   1. versions (torch, CUDA, cuDNN, GPU);
#   2. tests/test_cuda.py (training steps fp32/bf16/fp16, Split-and-Prune rows, per-seed generation, compile);
#   3. bench/split_prune.py on the GPU (kernels per Split-and-Prune pass, before/after batching);
#   4. bench/train_step.py, reference CIFAR-10 net, batch 256: fp32, bf16, bf16 + torch.compile;
#   5. the author's training step (bench/author_speed.py) on the same configuration, fp32 and fp16;
#   6. generation: bench/generate.py (ours, single head) and the author's (all K heads), fp32 and fp16;
#   7. a summary: every figure in OUTDIR/figures.json and, as the LAST lines,
#      train_speedup_vs_author=, gen_speedup_vs_author=, mfu_train_best=.
#
#   bench/gpu.sh OUTDIR [AUTHOR_DIR]
#
# OUTDIR receives gpu.log (everything printed), one JSON per benchmark and figures.json.
# AUTHOR_DIR (or $DDN_AUTHOR_DIR) holds the author's code, prepared on a machine with internet:
#   git clone https://github.com/DIYer22/discrete_distribution_networks AUTHOR_DIR/ddn
#   pip download sddn==0.0.2 boxx -d AUTHOR_DIR/wheels
# The wheels are installed offline into a virtual environment under OUTDIR (seeing this
# machine's torch); without AUTHOR_DIR the author's steps are skipped and so are the ratios.
# Model FLOPs: the reference net costs 88 GFLOP forward per 32x32 image, a training step 3x that;
# the MFU is against $DDN_PEAK_TFLOPS (default 989: dense bf16 of an H100 / H200).
# Without a GPU the same steps run at a tiny size on the CPU to check the script: those figures
# are no GPU measurement.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu.sh OUTDIR [AUTHOR_DIR]}
AUTHOR=${2:-${DDN_AUTHOR_DIR:-}}
PEAK=${DDN_PEAK_TFLOPS:-989}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu.log") 2>&1
START=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - START )) s)"; }
# run CAP CMD...: run CMD for at most CAP (x SCALE) seconds, and never past the script's budget.
run() {
    local cap=$(( $1 * SCALE )); shift
    local left=$(( BUDGET - ($(date +%s) - START) ))
    (( left < cap )) && cap=$left
    if (( cap < 10 )); then echo "SKIPPED (time budget spent): $*"; return 124; fi
    timeout "$cap" "$@"
    local rc=$?
    (( rc == 124 )) && echo "TIMED OUT after $cap s: $*"
    (( rc != 0 && rc != 124 )) && echo "FAILED (exit $rc): $*"
    return $rc
}

if python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    CUDA=1; B=256; TRAIN=(--steps=10 --warmup=3); ATRAIN=(--steps=5 --warmup=2); GEN=(--steps=10 --warmup=2); SP=(--steps=20)
    BUDGET=${DDN_GPU_BUDGET:-450}; SCALE=1
else
    CUDA=0; B=2; TRAIN=(--steps=1 --warmup=1); ATRAIN=("${TRAIN[@]}"); GEN=(--steps=1 --warmup=1); SP=(--steps=5)
    BUDGET=${DDN_GPU_BUDGET:-2400}; SCALE=5    # A CPU step of the full net takes tens of seconds.
    echo "NO GPU: a CPU run at batch $B to check this script; its figures are NOT GPU measurements."
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

step tests/test_cuda.py
run 100 python -m pytest -q -p no:cacheprovider tests/test_cuda.py
echo "test_cuda_rc=$?"

step "bench/split_prune.py"
run 40 python bench/split_prune.py "${SP[@]}" | tee "$OUT/split_prune.txt"

step "bench/train_step.py fp32 / bf16 / bf16 + compile, batch $B"
run 60 python bench/train_step.py --batch=$B --precision=fp32 "${TRAIN[@]}" --json="$OUT/train_fp32.json"
run 45 python bench/train_step.py --batch=$B --precision=bf16 "${TRAIN[@]}" --json="$OUT/train_bf16.json"
if (( CUDA )); then
    run 150 python bench/train_step.py --batch=$B --precision=bf16 --compile=True "${TRAIN[@]}" --json="$OUT/train_bf16_compile.json"
else
    echo "bf16 + compile skipped on the CPU (inductor needs many minutes for the 63-layer net there)"
fi

step "bench/generate.py (ours: single head and all K), batch $B"
run 40 python bench/generate.py --batch=$B "${GEN[@]}" --json="$OUT/gen_ours.json"

if [ -n "$AUTHOR" ]; then
    step "the author's code from $AUTHOR"
    AUTHOR=$(cd "$AUTHOR" && pwd)
    VENV="$OUT/author-venv"
    if python -c 'import sddn, boxx' 2> /dev/null; then
        APY=python
    else
        python -m venv --system-site-packages "$VENV" &&
            run 60 "$VENV/bin/pip" install --quiet --no-index --find-links "$AUTHOR/wheels" sddn==0.0.2 boxx
        APY="$VENV/bin/python"
    fi
    for p in fp32 fp16; do
        if (( ! CUDA )) && [ $p = fp16 ]; then
            echo "the author's fp16 training step is skipped on the CPU (half-precision convolutions take minutes there)"
            continue
        fi
        run 45 "$APY" bench/author_speed.py --author-repo="$AUTHOR/ddn" --mode=train --precision=$p --batch=$B "${ATRAIN[@]}" --json="$OUT/author_train_$p.json"
    done
    for p in fp32 fp16; do
        run 30 "$APY" bench/author_speed.py --author-repo="$AUTHOR/ddn" --mode=generate --precision=$p --batch=$B "${GEN[@]}" --json="$OUT/author_gen_$p.json"
    done
else
    step "no AUTHOR_DIR: the author's code is not measured"
fi

step summary
python - "$OUT" "$PEAK" "$CUDA" <<'EOF'
import json, os, sys
out, peak, cuda = sys.argv[1], float(sys.argv[2]), sys.argv[3] == '1'
def load(name):
    path = os.path.join(out, name + '.json')
    return json.load(open(path)) if os.path.isfile(path) else None
fig = {name: load(name) for name in ('train_fp32', 'train_bf16', 'train_bf16_compile', 'gen_ours',
                                     'author_train_fp32', 'author_train_fp16', 'author_gen_fp32', 'author_gen_fp16')}
ours = {k: v['img_per_s'] for k, v in fig.items() if k.startswith('train_') and v}
author = {k: v['img_per_s'] for k, v in fig.items() if k.startswith('author_train') and v}
author_gen = {k: v['img_per_s'] for k, v in fig.items() if k.startswith('author_gen') and v}
summary = dict(cuda=cuda, peak_tflops=peak, figures=fig)
sp_path = os.path.join(out, 'split_prune.txt')
if os.path.isfile(sp_path):     # sp_ops_before=..., sp_kernels_after=..., sp_time_ratio=...
    summary['split_prune'] = dict(line.strip().split('=', 1) for line in open(sp_path) if line.startswith('sp_'))
for k, v in {**ours, **author}.items():
    mem = fig[k].get('peak_memory_gib')
    print(f'{k:<22} {v:10.2f} img/s' + (f'   peak {mem:.2f} GiB' if mem is not None else ''))
if fig['gen_ours']:
    print(f'{"gen_ours single head":<22} {fig["gen_ours"]["single_head_img_per_s"]:10.2f} img/s   '
          f'(all K: {fig["gen_ours"]["all_k_img_per_s"]:.2f})')
for k, v in author_gen.items():
    print(f'{k:<22} {v:10.2f} img/s')
lines = []
if ours and author:
    best, best_author = max(ours, key=ours.get), max(author, key=author.get)
    summary['train_speedup_vs_author'] = ours[best] / author[best_author]
    lines.append(f'train_speedup_vs_author={ours[best] / author[best_author]:.3g}  ({best} vs {best_author})')
else:
    lines.append('train_speedup_vs_author=not measured')
if fig['gen_ours'] and author_gen:
    best_author = max(author_gen, key=author_gen.get)
    ratio = fig['gen_ours']['single_head_img_per_s'] / author_gen[best_author]
    summary['gen_speedup_vs_author'] = ratio
    lines.append(f'gen_speedup_vs_author={ratio:.3g}  (single head vs {best_author})')
else:
    lines.append('gen_speedup_vs_author=not measured')
if ours:
    best = max(ours, key=ours.get)
    mfu = ours[best] * 3 * 88e9 / (peak * 1e12)     # Training FLOPs: forward + backward = 3 x 88 GFLOP per image.
    summary['mfu_train_best'] = mfu
    lines.append(f'mfu_train_best={mfu:.3g}  ({best}, {ours[best]:.1f} img/s x 264 GFLOP / {peak:g} TFLOP/s)')
json.dump(summary, open(os.path.join(out, 'figures.json'), 'w'), indent=2)
if not cuda:
    print('(CPU run: these ratios only check the script)')
print('\n'.join(lines))
EOF
