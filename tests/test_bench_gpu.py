"""bench/gpu.sh cannot run here (no GPU): it must at least parse, and its Python summary must turn the
benchmarks' JSON files into figures.json with the ratios and the MFU (on synthetic figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

def test_gpu_sh_parses():
    subprocess.run(['bash', '-n', str(REPO / 'bench' / 'gpu.sh')], check=True)

def test_gpu_summary_ratios_and_mfu(tmp_path):
    figures = dict(train_bf16=dict(img_per_s=600.0, peak_memory_gib=30.0, cuda='13.0', device='GPU'),
                   author_train_fp16=dict(img_per_s=300.0),
                   gen_ours=dict(single_head_img_per_s=200.0, all_k_img_per_s=50.0, fast_img_per_s=1000.0),
                   author_gen_fp16=dict(img_per_s=100.0))
    for name, value in figures.items():
        (tmp_path / f'{name}.json').write_text(json.dumps(value))
    (tmp_path / 'train_fp32.json').write_text('{not json')            # A failed step: ignored.
    out = subprocess.run([sys.executable, str(REPO / 'bench' / 'gpu_summary.py'), str(tmp_path), '--peak-tflops=1000',
                          '--train-gflop=250'], capture_output=True, text=True, check=True).stdout
    summary = json.loads((tmp_path / 'figures.json').read_text())
    assert summary['train_speedup_vs_author'] == pytest.approx(2.0)
    assert summary['gen_speedup_vs_author'] == pytest.approx(10.0)
    assert summary['mfu_train_best'] == pytest.approx(600 * 250e9 / 1000e12)
    assert summary['cuda'] is True and summary['figures']['train_fp32'] is None
    assert out.strip().splitlines()[-1].startswith('mfu_train_best=0.15')
