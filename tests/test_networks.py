"""Tests of the DDN generator: the architecture schedule, the four ways to drive it, per-seed
determinism, the single-head path, a real overfitting run with and without Split-and-Prune, and
Split-and-Prune across two processes."""

import pickle

import pytest
import torch

from training.ddl import reference_heads
from training.determinism import batch_invariant
from training.networks import DDNGenerator, DDNRecurrent, blocks_at, channels_at, outputk_at

def tiny_net(**kwargs):
    torch.manual_seed(0)
    return DDNGenerator(**{**dict(img_resolution=8, img_channels=1, max_outputk=8, max_blockn=2, max_channels=16), **kwargs})

# ----------------------------------------------------------------------------
# Architecture schedule (DDN.md §4).

def test_reference_cifar_schedule():
    assert [channels_at(s) for s in range(9)] == [256, 256, 256, 256, 256, 256, 128, 64, 32]
    assert [blocks_at(s, 32) for s in range(7)] == [1, 2, 4, 8, 16, 32, 32]
    assert outputk_at(5, 3, max_outputk=1024) == 512 and outputk_at(6, 3, max_outputk=1024) == 256
    assert outputk_at(6, 1, max_outputk=1024) == 512 and outputk_at(8, 1, max_outputk=1024) == 128
    net = DDNGenerator(32, 3, max_blockn=32, max_outputk=64)
    assert net.num_layers == 63  # The released CIFAR-10 model's latent length.
    assert net.ks == [64] * 63 and net.bits_per_image == 63 * 6
    assert net.layer_sizes == [1] + [2] * 2 + [4] * 4 + [8] * 8 + [16] * 16 + [32] * 32

@pytest.mark.parametrize('res,C,start', [(2, 1, 1), (8, 3, 1), (16, 1, 4), (4, 3, 4)])
def test_any_power_of_two(res, C, start):
    net = tiny_net(img_resolution=res, img_channels=C, start_size=start).eval()
    out = net(seeds=[0, 1, 2])
    assert out.images.shape == (3, C, res, res)
    assert out.codes.shape == (3, net.num_layers)
    assert net.layer_sizes[0] == start and net.layer_sizes[-1] == res
    assert all(0 <= int(c) < k for row in out.codes for c, k in zip(row, net.ks))

@pytest.mark.parametrize('kwargs,match', [
    (dict(img_resolution=12), 'power of two'),
    (dict(img_resolution=1), 'power of two'),
    (dict(start_size=16), 'start_size'),
    (dict(img_channels=2), 'img_channels'),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_net(**kwargs)

def test_bad_calls():
    net = tiny_net().eval()
    with pytest.raises(ValueError, match='needs a target, codes or seeds'):
        net()
    with pytest.raises(ValueError, match='no rule'):
        net(codes=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='does not match'):
        net(target=torch.zeros(2, 3, 8, 8))

# ----------------------------------------------------------------------------
# Driving modes.

def test_train_mode_losses_and_gradients():
    net = tiny_net().train()
    out = net(target=torch.rand(4, 1, 8, 8) * 2 - 1)
    assert out.losses.shape == (4, net.num_layers)
    out.losses.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(d.weight.grad.abs().sum() > 0 for d in net.ddls)

# Brute force, independent of the DDL's selection code: the error (B, K) of every code k at layer l
# after the codes `prefix` (B, l), decoded and compared (MSE) with the target area-averaged to
# that layer's size.
def _errors_of_every_code(net, x, prefix):
    l = prefix.shape[1]
    goal = torch.nn.functional.adaptive_avg_pool2d(x, net.layer_sizes[l])
    errors = []
    for k in range(net.ks[l]):
        image = net(codes=torch.cat([prefix, torch.full((x.shape[0], 1), k)], 1), num_layers=l + 1).images
        errors.append((image - goal).square().mean((1, 2, 3)))
    return torch.stack(errors, 1)

@batch_invariant()
def test_encode_decode_roundtrip_and_nearest():
    net = tiny_net(chain_dropout=0.5).train()  # encode() must ignore training mode.
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    codes, recon = net.encode(x)
    assert net.training
    assert torch.equal(net.decode(codes), recon)
    net.eval()
    # Every code is the nearest candidate of its layer given the previous choices (up to rounding).
    assert net.num_layers > 3 and len(set(codes.flatten().tolist())) > 1
    for l in range(net.num_layers):
        errors = _errors_of_every_code(net, x, codes[:, :l])
        chosen = errors.gather(1, codes[:, l:l + 1])[:, 0]
        assert (chosen <= errors.min(1).values + 1e-6).all(), (l, errors, codes[:, l])
    out = net(codes=codes, return_layers=True)
    assert len(out.layer_images) == net.num_layers
    assert torch.equal(out.layer_images[-1], recon)

def test_codes_prefix_then_target_or_seeds():
    net = tiny_net().eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    codes, _ = net.encode(x)
    prefix = torch.zeros(3, 2, dtype=torch.long)
    mixed = net(target=x, codes=prefix).codes
    assert torch.equal(mixed[:, :2], prefix)
    sampled = net(seeds=[4, 5, 6], codes=prefix).codes
    assert torch.equal(sampled[:, :2], prefix)
    assert torch.equal(sampled[:, 2:], net.sample_codes([4, 5, 6])[:, 2:])
    partial = net(codes=codes, num_layers=3)
    assert partial.codes.shape == (3, 3) and partial.images.shape[-1] == net.layer_sizes[2]

@batch_invariant()
def test_per_seed_determinism_across_batch_sizes():
    net = DDNGenerator(16, 3, max_outputk=16, max_blockn=4, max_channels=32).eval()
    seeds = list(range(10, 18))
    big = net(seeds=seeds).images
    for i, seed in enumerate(seeds):
        assert torch.equal(net(seeds=[seed]).images[0], big[i])
    assert torch.equal(net(seeds=seeds[3:6]).images, big[3:6])
    assert not torch.equal(big[0], big[1])

def test_single_head_equals_all_heads_network():
    net = DDNGenerator(16, 3, max_outputk=32, max_blockn=2, max_channels=32).eval()
    codes = net.sample_codes(range(6))
    fast = net(codes=codes).images
    with reference_heads(net):
        slow = net(codes=codes).images
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    to_u8 = lambda x: (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert (to_u8(fast).int() - to_u8(slow).int()).abs().max() <= 1

def test_pickle_roundtrip():
    net = tiny_net().eval()
    clone = pickle.loads(pickle.dumps(net))
    assert torch.equal(clone(seeds=[3, 4]).images, net(seeds=[3, 4]).images)

# ----------------------------------------------------------------------------
# A small generator overfits 8 real images (the built-in digits). With Split-and-Prune every
# node's selection frequency stays within 4x of 1/K; the same-seed run without it has nodes far
# outside that band (dead or starving nodes). The runs are conftest's `overfit_digits`, trained
# once per session (test_balance.py looks at the same run without balancing).

def test_overfit_eight_digits_with_and_without_split_prune(overfit_digits):
    run = overfit_digits('tv')
    assert run.mse_after < run.mse_before / 10, (run.mse_before, run.mse_after)
    for layer, d in enumerate(run.net.ddls):
        f = d.node_stats.frequency() * d.K
        assert f.min() >= 0.25 and f.max() <= 4.0, (layer, f)
    off = overfit_digits('none')
    assert off.mse_before == run.mse_before
    assert off.mse_after < off.mse_before  # It still learns something ...
    assert min((d.node_stats.frequency() * d.K).min().item() for d in off.net.ddls) < 0.25  # ... but leaves starving or dead nodes.

# ----------------------------------------------------------------------------
# Two processes (gloo on CPU): after steps with splits, parameters and statistics agree (conftest's
# one launch of tests/scripts/ddl_two_ranks.py).

def test_two_processes_stay_identical(ddl_two_ranks):
    result = ddl_two_ranks['tv']
    assert result['world'] == 2
    assert result['splits'] > 0
    assert result['max_diff'] == 0.0
    assert all(s == 2 * 6 * 8 for s in result['seen'])  # Statistics hold both ranks' targets.

# ----------------------------------------------------------------------------
# Guided selection: the scorer decides every layer; seeds only feed the chooser's randomness.

def test_scorer_guides_every_layer_and_chooser_gets_seed_uniforms():
    net = tiny_net().eval()
    goal = torch.ones(1, 1, 8, 8) * 0.5
    def scorer(cand, info):
        t = torch.nn.functional.interpolate(goal, size=cand.shape[-2:], mode='area')
        return (cand - t[:, None]).square().mean((2, 3, 4))
    seen = []
    def chooser(dist, info, u):
        seen.append(u.clone())
        return dist.argmin(1)
    guided = net(scorer=scorer, chooser=chooser, seeds=[1, 2, 3]).images
    plain = net(seeds=[1, 2, 3]).images
    err = lambda x: (x - goal).square().mean().item()
    assert err(guided) < err(plain) / 2
    assert len(seen) == net.num_layers
    u = net.seed_uniforms([1, 2, 3])
    assert all(torch.equal(seen[l], u[:, l]) for l in range(net.num_layers))
    # Guided output of a seed does not depend on its batch.
    assert torch.equal(net(scorer=scorer, seeds=[2]).images[0], net(scorer=scorer, seeds=[1, 2, 3]).images[1])

# Every network class a snapshot may hold offers the same interface: L layers with K_l choices each,
# sampling by seed, encoding to codes and decoding them back to the same images.
@pytest.mark.parametrize('make', [tiny_net, lambda: DDNRecurrent(img_resolution=8, img_channels=1, num_iters=4, outputk=8, channels=16, levels=2)],
                         ids=['DDNGenerator', 'DDNRecurrent'])
def test_network_classes_share_the_interface(make):
    torch.manual_seed(0)
    net = make().eval()
    L = net.num_layers
    assert len(net.ks) == L and all(k >= 2 for k in net.ks) and net.bits_per_image > 0
    with torch.no_grad(), batch_invariant():
        out = net(seeds=[0, 1, 2])
        assert out.images.shape == (3, 1, 8, 8) and out.codes.shape == (3, L)
        assert (out.codes < torch.tensor(net.ks)).all()
        codes, images = net.encode(out.images)
        assert codes.shape == (3, L) and images.shape == (3, 1, 8, 8)
        assert torch.equal(net.decode(codes), images)
        assert torch.equal(net(codes=out.codes).images, out.images)

# reference_heads switches every DDL of a module to the all-K path, and back on exit (even on error).
def test_reference_heads_restores_the_layers():
    net = tiny_net()
    with pytest.raises(RuntimeError):
        with reference_heads(net):
            assert all(d.reference for d in net.ddls)
            raise RuntimeError
    assert not any(d.reference for d in net.ddls)
