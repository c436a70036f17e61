"""The summary of bench/gpu.sh: every figure of its JSON files in OUTDIR/figures.json, a table, and as
the LAST lines train_speedup_vs_author=, gen_speedup_vs_author=, mfu_train_best=.

    python bench/gpu_summary.py OUTDIR --peak-tflops=989 --train-gflop=267.1

Training images/s come from bench/train_step.py (`train_*.json`) and bench/author_speed.py
(`author_train_*.json`); generation from bench/generate.py (`gen_ours.json`) and
`author_gen_*.json`. MFU = images/s x training GFLOP per image (bench/step_cost.py measures it) /
peak TFLOP/s. A CPU run (no `cuda` in the figures) only checks the script.
"""

import json
import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils.checkpoint import write_json

TRAIN = ('train_bf16', 'train_bf16_compile', 'train_bf16_channels_last', 'train_fp32')
AUTHOR_TRAIN = ('author_train_fp16', 'author_train_fp32')
AUTHOR_GEN = ('author_gen_fp16', 'author_gen_fp32')

# The figures of OUTDIR/NAME.json, or None (missing or unreadable: the step failed or was skipped).
def load(outdir, name):
    path = os.path.join(outdir, name + '.json')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def summarize(outdir, peak_tflops, train_gflop):
    fig = {name: load(outdir, name) for name in TRAIN + AUTHOR_TRAIN + AUTHOR_GEN + ('gen_ours',)}
    cuda = any(v and v.get('cuda') and 'cpu' not in str(v.get('device', 'cpu')) for k, v in fig.items() if k in TRAIN)
    ours = {k: fig[k]['img_per_s'] for k in TRAIN if fig[k]}
    author = {k: fig[k]['img_per_s'] for k in AUTHOR_TRAIN if fig[k]}
    author_gen = {k: fig[k]['img_per_s'] for k in AUTHOR_GEN if fig[k]}
    summary = dict(cuda=cuda, peak_tflops=peak_tflops, train_gflop_per_img=train_gflop, figures=fig)
    rows = []
    for k, v in {**ours, **author}.items():
        mem = fig[k].get('peak_memory_gib')
        rows.append(f'{k:<26} {v:10.2f} img/s' + (f'   peak {mem:.2f} GiB' if mem is not None else ''))
    if fig['gen_ours']:
        g = fig['gen_ours']
        rows.append(f'{"gen_ours exact":<26} {g["single_head_img_per_s"]:10.2f} img/s   (all K {g["all_k_img_per_s"]:.2f}, '
                    f'fast {g.get("fast_img_per_s", float("nan")):.2f})')
    for k, v in author_gen.items():
        rows.append(f'{k:<26} {v:10.2f} img/s')
    lines = []
    if 'train_bf16' in ours and 'author_train_fp16' in author:
        best = max(ours, key=ours.get)
        ratio = ours[best] / author['author_train_fp16']
        summary['train_speedup_vs_author'] = ratio
        lines.append(f'train_speedup_vs_author={ratio:.3g}  ({best} vs author_train_fp16)')
    else:
        lines.append('train_speedup_vs_author=not measured')
    if fig['gen_ours'] and author_gen:
        best_author = max(author_gen, key=author_gen.get)
        ours_gen = max(fig['gen_ours']['single_head_img_per_s'], fig['gen_ours'].get('fast_img_per_s', 0))
        summary['gen_speedup_vs_author'] = ours_gen / author_gen[best_author]
        lines.append(f'gen_speedup_vs_author={ours_gen / author_gen[best_author]:.3g}  (ours best path vs {best_author})')
    else:
        lines.append('gen_speedup_vs_author=not measured')
    if ours:
        best = max(ours, key=ours.get)
        mfu = ours[best] * train_gflop * 1e9 / (peak_tflops * 1e12)
        summary['mfu_train_best'] = mfu
        lines.append(f'mfu_train_best={mfu:.3g}  ({best}, {ours[best]:.1f} img/s x {train_gflop:g} GFLOP / {peak_tflops:g} TFLOP/s)')
    else:
        lines.append('mfu_train_best=not measured')
    return summary, rows, lines

@click.command()
@click.argument('outdir', type=click.Path(exists=True, file_okay=False))
@click.option('--peak-tflops', help='Peak dense TFLOP/s of the device', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=989.0, show_default=True)
@click.option('--train-gflop', help='Training GFLOP per image (bench/step_cost.py)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=267.1, show_default=True)
def main(outdir, peak_tflops, train_gflop):
    """Summarize the JSON figures of a bench/gpu.sh run."""
    summary, rows, lines = summarize(outdir, peak_tflops, train_gflop)
    write_json(os.path.join(outdir, 'figures.json'), summary)
    print('\n'.join(rows))
    if not summary['cuda']:
        print('(no CUDA figures: these ratios only check the script)')
    print('\n'.join(lines))

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
