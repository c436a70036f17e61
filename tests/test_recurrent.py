"""Tests of the recurrence-iteration generator (`DDNRecurrent`, paper Fig. 1c): one UNet and one DDL
shared by all L layers. Weight sharing, the four ways to drive it, per-seed determinism, the
single-head path, scorers told the layer index, Split-and-Prune on the shared DDL while overfitting
real digits, and train.py / generate.py with --arch=recurrence."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import generate
import train
from training.ddl import reference_heads
from training.networks import DDNRecurrent, batch_invariant

def tiny_rec(**kwargs):
    torch.manual_seed(0)
    return DDNRecurrent(**{**dict(img_resolution=8, img_channels=1, num_iters=6, outputk=8, channels=16, levels=2), **kwargs})

# ----------------------------------------------------------------------------
# Architecture: the parameter count does not depend on L; every layer is the same DDL.

def test_weights_are_shared_across_layers():
    short, long = tiny_rec(num_iters=2), tiny_rec(num_iters=20)
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(short) == count(long)
    assert long.num_layers == 20 and long.ks == [8] * 20 and long.bits_per_image == 60
    assert long.layer_sizes == [8] * 20
    # With the embedding of l, each layer gets its own vector of `channels` numbers, nothing more.
    assert count(tiny_rec(num_iters=20, iter_embed=True)) == count(long) + 20 * 16
    nodes = [m for m in long.modules() if hasattr(m, 'node_stats')]
    assert len(nodes) == 1

@pytest.mark.parametrize('kwargs,match', [
    (dict(img_resolution=12), 'power of two'),
    (dict(img_channels=2), 'img_channels'),
    (dict(num_iters=0), 'num_iters'),
    (dict(outputk=1), 'outputk'),
    (dict(channels=6), 'channels'),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_rec(**kwargs)

@pytest.mark.parametrize('res,C,levels', [(2, 1, 3), (8, 3, 1), (16, 1, 0)])
def test_any_power_of_two(res, C, levels):
    net = tiny_rec(img_resolution=res, img_channels=C, levels=levels).eval()
    out = net(seeds=[0, 1, 2])
    assert out.images.shape == (3, C, res, res) and out.codes.shape == (3, net.num_layers)
    assert ((out.codes >= 0) & (out.codes < 8)).all()

# ----------------------------------------------------------------------------
# Driving modes.

def test_train_mode_losses_gradients_and_statistics():
    net = tiny_rec().train()
    out = net(target=torch.rand(4, 1, 8, 8) * 2 - 1)
    assert out.losses.shape == (4, 6)
    out.losses.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # The shared DDL observed every layer's 4 targets.
    assert net.ddl.node_stats.pending_seen.item() == 4 * 6

@batch_invariant()
def test_encode_decode_roundtrip_and_prefixes():
    net = tiny_rec(chain_dropout=0.5).train()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    codes, recon = net.encode(x)
    assert net.training  # encode() restores the mode.
    assert torch.equal(net.decode(codes), recon)
    out = net.eval()(target=x, return_layers=True)
    assert torch.equal(out.codes, codes) and torch.equal(out.layer_images[-1], recon)
    # Running only the first 3 layers on a prefix of the codes gives the third layer's image.
    assert torch.equal(net(codes=codes[:, :3], num_layers=3).images, out.layer_images[2])

@batch_invariant()
def test_per_seed_determinism_and_single_head():
    net = tiny_rec(img_resolution=16, img_channels=3, outputk=16, channels=32).eval()
    seeds = list(range(10, 18))
    big = net(seeds=seeds).images
    for i, seed in enumerate(seeds):
        assert torch.equal(net(seeds=[seed]).images[0], big[i])
    assert not torch.equal(big[0], big[1])
    codes = net.sample_codes(seeds)
    assert torch.equal(net(codes=codes).images, big)
    with reference_heads(net):
        torch.testing.assert_close(net(codes=codes).images, big, rtol=1e-5, atol=1e-5)

def test_pickle_roundtrip():
    net = tiny_rec(iter_embed=True).eval()
    clone = pickle.loads(pickle.dumps(net))
    assert torch.equal(clone(seeds=[3, 4]).images, net(seeds=[3, 4]).images)

def test_scorer_and_chooser_are_told_the_layer():
    net = tiny_rec().eval()
    goal = torch.full((1, 1, 8, 8), 0.5)
    indices = []
    def scorer(cand, info):
        indices.append(info.index)
        assert info.num_layers == net.num_layers and info.K == 8 and info.size == 8
        return (cand - goal[:, None]).square().mean((2, 3, 4))
    chooser_indices = []
    def chooser(dist, info, u):
        chooser_indices.append(info.index)
        return dist.argmin(1)
    guided = net(scorer=scorer, chooser=chooser, seeds=[1, 2]).images
    assert indices == list(range(6)) and chooser_indices == list(range(6))
    plain = net(seeds=[1, 2]).images
    assert (guided - goal).square().mean() < (plain - goal).square().mean()

def test_class_condition_changes_the_output():
    net = tiny_rec(condition='class', label_dim=3).eval()
    torch.nn.init.normal_(net.class_embed.weight)
    a = net(seeds=[0], condition=torch.eye(3)[[0]]).images
    b = net(seeds=[0], condition=torch.eye(3)[[1]]).images
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match='conditioned'):
        net(seeds=[0])

# ----------------------------------------------------------------------------
# Overfitting 8 real digits: the shared DDL learns, and Split-and-Prune keeps its nodes in use
# (statistics pooled over all layers); without it, nodes starve.

# conftest's `overfit` (Adam, a balancing step after each), 150 steps.
def test_overfit_eight_digits_with_and_without_split_prune(digits, overfit_fn):
    run = overfit_fn(tiny_rec(num_iters=4, chain_dropout=0.05), digits[0][:8], 'tv', steps=150)
    before, after, ddl = run.mse_before, run.mse_after, run.net.ddl
    rel_freq = ddl.node_stats.frequency() * ddl.K
    assert after < before / 5, (before, after)
    assert ddl.node_stats.seen.item() == 150 * 8 * 4  # Every layer's targets, pooled.
    assert rel_freq.min() >= 0.25 and rel_freq.max() <= 4.0, rel_freq
    off = overfit_fn(tiny_rec(num_iters=4, chain_dropout=0.05), digits[0][:8], 'none', steps=150)
    assert off.mse_after < before
    rel_off = off.net.ddl.node_stats.frequency() * off.net.ddl.K
    assert rel_off.min() < 0.25, rel_off

# ----------------------------------------------------------------------------
# The command lines: train.py --arch=recurrence writes a DDNRecurrent snapshot that generate.py samples.

def test_train_and_generate_cli(tmp_path, subprocess_env):
    env = dict(subprocess_env, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    args = ['--outdir', str(tmp_path / 'runs'), '--duration=0.0002', '--batch=8', '--arch=recurrence', '--iters=5',
            '--max-channels=16', '--levels=2', '--max-outputk=8', '--tick=0.1', '--snap=1', '--dump=1', '--workers=0', '--seed=1']
    proc = subprocess.run([sys.executable, train.__file__, *args], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'ddl (x5)' in proc.stdout  # The summary lists the shared DDL once, with its call count.
    run_dir = next((tmp_path / 'runs').iterdir())
    snapshot = sorted(run_dir.glob('network-snapshot-*.pkl'))[-1]
    with open(snapshot, 'rb') as f:
        net = pickle.load(f)['ema']
    assert isinstance(net, DDNRecurrent) and net.num_layers == 5
    proc = subprocess.run([sys.executable, generate.__file__, '--network', str(snapshot), '--outdir', str(tmp_path / 'gen'),
                           '--seeds=0-3', '--batch=3'], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / 'gen' / 'latents.npz', allow_pickle=False) as latents:
        assert latents['codes'].shape == (4, 5) and list(latents['ks']) == [8] * 5
        assert torch.equal(torch.from_numpy(latents['codes']).long(), net.sample_codes(range(4)))
