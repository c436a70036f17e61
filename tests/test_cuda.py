"""Device tests: training steps in fp32 / bf16 / fp16, Split-and-Prune row copies on the device, per-seed
generation bit-identical across batch sizes, torch.compile against eager. Every test runs on each
available device: on the CPU in CI (the same bodies and assertions, so thresholds are calibrated
before a GPU sees them) and on CUDA where there is one (`bench/gpu.sh` runs them first there)."""

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from training import training_step
from training.ddl import DiscreteDistributionLayer
from training.loss import DDNLoss
from training.networks import DDNGenerator, batch_invariant
from training.split_prune import split_and_prune

# The devices to test on: the CPU always, CUDA when present.
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])

@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)

# A small RGB net with every kind of block: 16x16, 2 blocks per scale, K up to 64.
SMALL_NET = dict(img_resolution=16, img_channels=3, max_channels=32, max_blockn=2, max_outputk=64, chain_dropout=0.0)

@pytest.fixture(autouse=True)
def exact_matmuls():
    # As the training loop: no TF32, so fp32 means fp32.
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

def _images(device, n=32, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device)

def _step(device, precision='fp32', compile=False, seed=0, ema=False):
    torch.manual_seed(seed)
    net = DDNGenerator(**SMALL_NET).to(device).train()
    ema_net = copy.deepcopy(net).eval().requires_grad_(False) if ema else net
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    return net, ema_net, opt, training_step.TrainingStep(net, ema_net, DDNLoss(), opt, batch_size=32, precision=precision, compile=compile)

# ----------------------------------------------------------------------------
# A training step in each precision: finite losses that fall over a few steps on a fixed batch;
# fp16 runs with a GradScaler. Random targets fall slowly: over these 12 steps the CPU measured falls
# of 4.1% (fp32), 3.4% (bf16) and 2.4% (fp16), a GPU 2.4-3.9%, so the bar is a 1.5% fall (it was 5%,
# never calibrated, and failed on the GPU).

@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'fp16'])
def test_training_step_precisions(precision, device):
    net, _, _, step = _step(device, precision, ema=True)
    assert step.scaler.is_enabled() == (precision == 'fp16')
    images = _images(device)
    losses = []
    for _ in range(12):
        losses.append(step.accumulate(images[:16], sync=False).detach().mean())
        step.accumulate(images[16:])
        step.update(lr=3e-3, ema_beta=0.9)
    losses = torch.stack(losses).cpu()
    assert torch.isfinite(losses).all(), losses
    assert losses[-3:].mean() < 0.985 * losses[:3].mean(), losses         # Random targets: a slow fall.
    assert all(torch.isfinite(p).all() for p in net.parameters())

# ----------------------------------------------------------------------------
# Split-and-Prune on the device: a forced split copies the weight, Adam and EMA rows there, and the
# batched pass matches the per-layer loop bit for bit.

def test_split_prune_row_copies(device):
    K, C = 8, 3
    layer = DiscreteDistributionLayer(8, C, K).to(device)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(16, 8, 4, 4, device=device), None, target=torch.randn(16, C, 4, 4, device=device)).loss.mean().backward()
    opt.step()
    ema = copy.deepcopy(layer).requires_grad_(False)
    st = layer.node_stats
    st.reset()
    st.count.copy_(torch.tensor([40, 3, 5, 4, 0, 6, 2, 4], dtype=torch.float64))
    st.seen.fill_(st.count.sum())
    w, m, e = layer.weight.detach().clone(), opt.state[layer.weight]['exp_avg'].clone(), ema.weight.detach().clone()
    assert int(split_and_prune(layer, opt, mirrors=[ema])) == 1
    for now, then in ((layer.weight, w), (opt.state[layer.weight]['exp_avg'], m), (ema.weight, e)):
        assert now.device.type == device.type
        assert torch.equal(now[4 * C : 5 * C], then[0:C])
        assert torch.equal(now[: 4 * C], then[: 4 * C]) and torch.equal(now[5 * C :], then[5 * C :])

def test_batched_split_prune_equals_per_layer(device):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
    try:
        import split_prune as ref
    finally:
        sys.path.pop(0)
    runs = [ref.make_setup(6, K=16, device=device), ref.make_setup(6, K=16, device=device)]
    gen = torch.Generator().manual_seed(0)
    splits = [0, 0]
    for _ in range(8):
        ref.observe_all([runs[0][0], runs[1][0]], 64, gen)
        splits[0] += int(split_and_prune(runs[0][0], runs[0][2], mirrors=[runs[0][1]]))
        splits[1] += int(ref.split_and_prune_per_layer(runs[1][0], runs[1][2], mirrors=[runs[1][1]]))
    assert splits[0] == splits[1] > 0
    # The same model, EMA mirror and optimizer state, compared through their public state dicts.
    for a, b in zip(runs[0], runs[1], strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        sa, sb = (sa['state'], sb['state']) if isinstance(a, torch.optim.Optimizer) else ({0: sa}, {0: sb})
        assert sa.keys() == sb.keys()
        for i in sa:
            assert sa[i].keys() == sb[i].keys()
            assert all(torch.equal(sa[i][k], sb[i][k]) if torch.is_tensor(sa[i][k]) else sa[i][k] == sb[i][k] for k in sa[i])

# ----------------------------------------------------------------------------
# Per-seed generation: the image of a seed does not depend on the batch it is drawn in. Inside
# batch_invariant() bit for bit; in the fast mode (the fastest kernels, which may pick other
# algorithms per batch size) the codes are identical and the images within one grey level.

def _per_seed(net):
    with torch.no_grad():
        whole = net(seeds=range(12))
        parts = [net(seeds=range(i, min(i + 5, 12))) for i in range(0, 12, 5)]
        single = net(seeds=[7])
    return whole, parts, single

def test_generation_per_seed_is_batch_invariant(device):
    torch.manual_seed(0)
    net = DDNGenerator(**SMALL_NET).to(device).eval()
    with batch_invariant():
        whole, parts, single = _per_seed(net)
    assert torch.equal(whole.images, torch.cat([p.images for p in parts]))
    assert torch.equal(whole.images[7:8], single.images)
    whole_fast, parts_fast, single_fast = _per_seed(net)
    for fast in (torch.cat([p.codes for p in parts_fast]), whole_fast.codes):
        assert torch.equal(fast, whole.codes)
    assert torch.equal(single_fast.codes, whole.codes[7:8])
    grey = 2 / 255                                                      # One grey level in [-1, 1].
    for fast in (whole_fast.images, torch.cat([p.images for p in parts_fast])):
        assert (fast - whole.images).abs().max() <= grey
    assert (single_fast.images - whole.images[7:8]).abs().max() <= grey

# ----------------------------------------------------------------------------
# torch.compile (inductor) against eager: the same losses and weights within tolerance over a few
# steps, and a compiled run still splits (in-place row copies outside the compiled graph) and
# samples from the trained network.

def test_compile_matches_eager(device):
    if device.type == 'cpu' and os.environ.get('DDN_TEST_CPU_COMPILE') != '1':
        pytest.skip('inductor\'s C++ compile of the net takes minutes on a CPU: set DDN_TEST_CPU_COMPILE=1')
    images = _images(device)
    results = []
    for compile in (False, True):
        net, _, _, step = _step(device, 'fp32', compile=compile)
        losses = []
        for _ in range(3):
            losses.append(step.accumulate(images).detach().mean())
            step.update(lr=3e-3, ema_beta=0)
        results.append((torch.stack(losses).cpu(), net))
    (loss_e, net_e), (loss_c, net_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(net_e.state_dict().items(), net_c.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
        else:
            assert torch.equal(a, b), name
    assert sum(int(d.node_stats.num_splits) for d in net_c.ddls) > 0
    with torch.no_grad():
        samples = net_c.eval()(seeds=range(4)).images
    assert samples.shape == (4, 3, 16, 16) and torch.isfinite(samples).all()
    assert not math.isnan(float(loss_c[-1]))
