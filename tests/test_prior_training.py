"""The prior trained beside the DDN (training/prior_training.py, train.py --prior)."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import train
from training import pictures, prior_files
from training import prior as prior_lib
from training import snapshot as snapshot_io
from training.dataset import DigitsDataset
from training.networks import DDNGenerator
from training.prior_training import PriorRefresh, prior_file, report_line, report_stats

# A tiny network on the built-in 16x16 digits: 5 layers of K=8 (as tests/test_train.py).
TINY = ['--batch=50', '--lr-rampup=0', '--max-channels=8', '--max-blockn=1', '--max-outputk=8',
        '--tick=0.5', '--snap=2', '--dump=2', '--seed=1', '--workers=0']

def _net():
    torch.manual_seed(0)
    return DDNGenerator(16, 1, max_channels=8, max_blockn=1, max_outputk=8).eval().requires_grad_(False)

def test_refresh_save_and_warm_start(tmp_path):
    net, dataset = _net(), DigitsDataset(resolution=16)
    refresh = PriorRefresh(dataset, net.ks, 'cpu', num_images=200, steps=20, replay_samples=100, dim=16, depth=1, heads=2)
    rng = torch.get_rng_state()
    report = refresh.refresh(net, cur_nimg=1000)
    assert torch.equal(torch.get_rng_state(), rng)                      # The training's random numbers are untouched.
    assert report['num_train'] == 180 and report['num_held_out'] == 20
    assert report['uniform_bits'] == pytest.approx(15.0) and report['prior_bits'] < 15.0
    assert 0 <= report['prior_replay'] <= 1 and report['sec'] > 0
    stats = report_stats(report)
    assert stats['Prior/held_out_bits']['mean'] == report['prior_bits'] and 'Timing/prior_sec' in stats
    assert 'held-out bits/image' in report_line(report)
    # Saved beside the snapshot of its tag; a new PriorRefresh warm-starts from the newest such file.
    path = prior_file(str(tmp_path), '000004')
    assert path.endswith('network-snapshot-000004.prior.safetensors')
    refresh.save(path, report)
    assert prior_files.prior_metadata(open(path, 'rb').read())['report']['prior_bits'] == report['prior_bits']
    again = PriorRefresh(dataset, net.ks, 'cpu', num_images=200, steps=20, seed=5, dim=16, depth=1, heads=2)
    codes = torch.zeros(1, 5, dtype=torch.long)
    assert not torch.equal(again.prior.log_probs(codes), refresh.prior.log_probs(codes))
    assert again.load_latest(str(tmp_path)) == path
    assert torch.equal(again.prior.log_probs(codes), refresh.prior.log_probs(codes))
    # A prior of another shape is not loaded.
    other = PriorRefresh(dataset, net.ks, 'cpu', num_images=200, dim=32, depth=1, heads=2)
    assert other.load_latest(str(tmp_path)) is None

def test_frequency_refresh():
    net, dataset = _net(), DigitsDataset(resolution=16)
    refresh = PriorRefresh(dataset, net.ks, 'cpu', kind='frequency', num_images=100)
    report = refresh.refresh(net)
    assert isinstance(refresh.prior, prior_lib.FrequencyPrior)
    assert report['prior_bits'] == pytest.approx(report['frequency_bits'])
    with pytest.raises(ValueError, match='takes no options'):
        PriorRefresh(dataset, net.ks, 'cpu', kind='frequency', dim=16)

def _run(args):
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output

def test_train_with_prior(tmp_path):
    common = ['--duration=0.0005', *TINY, '--tick=0.25', '--nosubdir']
    out = _run([f'--outdir={tmp_path / "prior"}', *common, '--prior=transformer', '--prior-images=100', '--prior-steps=20'])
    run = tmp_path / 'prior'
    assert 'held-out bits/image' in out
    priors = sorted(n for n in os.listdir(run) if n.endswith('.prior.safetensors'))
    snaps = sorted(n for n in os.listdir(run) if n.endswith('.safetensors') and not n.endswith('.prior.safetensors'))
    assert priors == [n.replace('.safetensors', '.prior.safetensors') for n in snaps] and len(priors) == 2
    lines = [json.loads(line) for line in open(run / 'stats.jsonl')]
    curve = [line['Prior/held_out_bits']['mean'] for line in lines if 'Prior/held_out_bits' in line]
    assert len(curve) == 2 and all(b < 15 for b in curve)
    # Each snapshot's sample grid through its prior: the grid of the seeds' codes drawn from that prior.
    last = snaps[-1].replace('.safetensors', '')
    tag = last.rsplit('-', 1)[1]
    assert sorted(n for n in os.listdir(run) if n.startswith('prior-samples-')) == [
        'prior-samples-' + n.replace('.safetensors', '').rsplit('-', 1)[1] + '.png' for n in snaps]
    _, net = snapshot_io.load_network(str(run / snaps[-1]))
    expected = np.asarray(pictures.sample_grid(net, prior=prior_files.load_prior(run / priors[-1])))
    written = np.asarray(PIL.Image.open(run / f'prior-samples-{tag}.png'))
    assert np.array_equal(written, expected)
    assert not np.array_equal(written, np.asarray(PIL.Image.open(run / f'samples-{tag}.png')))
    # The prior does not change the training: the same snapshots as without it.
    _run([f'--outdir={tmp_path / "plain"}', *common])
    from safetensors.torch import load_file
    for name in snaps:
        a, b = load_file(run / name), load_file(tmp_path / 'plain' / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not any(n.endswith('.prior.safetensors') for n in os.listdir(tmp_path / 'plain'))

def test_train_prior_options_need_prior(tmp_path):
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', '--duration=0.001', *TINY, '--prior-steps=5'])
    assert result.exit_code != 0 and '--prior-steps is only used with --prior' in result.output
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', '--duration=0.001', *TINY, '--prior=frequency', '--cond=True'])
    assert result.exit_code != 0
