"""CUDA tests: training steps in fp32 / bf16 / fp16, Split-and-Prune row copies on the GPU, per-seed
generation bit-identical across batch sizes, torch.compile against eager. Skipped without a GPU
(CI has none); `bench/gpu.sh` runs them first on a GPU machine."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from training import training_step
from training.ddl import DiscreteDistributionLayer
from training.loss import DDNLoss
from training.networks import DDNGenerator
from training.split_prune import split_and_prune

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

# A small RGB net with every kind of block: 16x16, 2 blocks per scale, K up to 64.
SMALL_NET = dict(img_resolution=16, img_channels=3, max_channels=32, max_blockn=2, max_outputk=64, chain_dropout=0.0)

@pytest.fixture(autouse=True)
def exact_matmuls():
    # As the training loop: no TF32, so fp32 means fp32.
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

def _images(n=32, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).cuda()

def _step(precision='fp32', compile=False, seed=0, ema=False):
    torch.manual_seed(seed)
    net = DDNGenerator(**SMALL_NET).cuda().train()
    ema_net = copy.deepcopy(net).eval().requires_grad_(False) if ema else net
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    return net, ema_net, opt, training_step.TrainingStep(net, ema_net, DDNLoss(), opt, batch_size=32, precision=precision, compile=compile)

# ----------------------------------------------------------------------------
# A training step in each precision: finite losses that fall over a few steps on a fixed batch;
# fp16 runs with a GradScaler.

@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'fp16'])
def test_training_step_precisions(precision):
    net, _, _, step = _step(precision, ema=True)
    assert step.scaler.is_enabled() == (precision == 'fp16')
    images = _images()
    losses = []
    for _ in range(12):
        losses.append(step.accumulate(images[:16], sync=False).detach().mean())
        step.accumulate(images[16:])
        step.update(lr=3e-3, ema_beta=0.9)
    losses = torch.stack(losses).cpu()
    assert torch.isfinite(losses).all(), losses
    assert losses[-3:].mean() < 0.95 * losses[:3].mean(), losses          # Random targets: a slow fall.
    assert all(torch.isfinite(p).all() for p in net.parameters())

# ----------------------------------------------------------------------------
# Split-and-Prune on CUDA: a forced split copies the weight, Adam and EMA rows on the GPU, and the
# batched pass matches the per-layer loop bit for bit, as on the CPU.

def test_split_prune_row_copies_on_cuda():
    K, C = 8, 3
    layer = DiscreteDistributionLayer(8, C, K).cuda()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(16, 8, 4, 4, device='cuda'), None, target=torch.randn(16, C, 4, 4, device='cuda')).loss.mean().backward()
    opt.step()
    ema = copy.deepcopy(layer).requires_grad_(False)
    st = layer.node_stats
    st.reset()
    st.count.copy_(torch.tensor([40, 3, 5, 4, 0, 6, 2, 4], dtype=torch.float64))
    st.seen.fill_(st.count.sum())
    w, m, e = layer.weight.detach().clone(), opt.state[layer.weight]['exp_avg'].clone(), ema.weight.detach().clone()
    assert int(split_and_prune(layer, opt, mirrors=[ema])) == 1
    for now, then in ((layer.weight, w), (opt.state[layer.weight]['exp_avg'], m), (ema.weight, e)):
        assert now.is_cuda
        assert torch.equal(now[4 * C : 5 * C], then[0:C])
        assert torch.equal(now[: 4 * C], then[: 4 * C]) and torch.equal(now[5 * C :], then[5 * C :])

def test_batched_split_prune_equals_per_layer_on_cuda():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
    try:
        import split_prune as ref
    finally:
        sys.path.pop(0)
    runs = [ref.make_setup(6, K=16, device='cuda'), ref.make_setup(6, K=16, device='cuda')]
    gen = torch.Generator().manual_seed(0)
    splits = [0, 0]
    for _ in range(8):
        ref.observe_all([runs[0][0], runs[1][0]], 64, gen)
        splits[0] += int(split_and_prune(runs[0][0], runs[0][2], mirrors=[runs[0][1]]))
        splits[1] += int(ref.split_and_prune_per_layer(runs[1][0], runs[1][2], mirrors=[runs[1][1]]))
    assert splits[0] == splits[1] > 0
    for a, b in zip(ref._state(*runs[0]), ref._state(*runs[1]), strict=True):
        assert torch.equal(a, b)

# ----------------------------------------------------------------------------
# Per-seed generation on CUDA: the image of a seed does not depend on the batch it is drawn in.

def test_generation_per_seed_is_batch_invariant_on_cuda():
    torch.manual_seed(0)
    net = DDNGenerator(**SMALL_NET).cuda().eval()
    with torch.no_grad():
        whole = net(seeds=range(12)).images
        parts = torch.cat([net(seeds=range(i, min(i + 5, 12))).images for i in range(0, 12, 5)])
        single = net(seeds=[7]).images
    assert torch.equal(whole, parts)
    assert torch.equal(whole[7:8], single)

# ----------------------------------------------------------------------------
# torch.compile (inductor) against eager: the same losses and weights within tolerance over a few
# steps, and a compiled run still splits (in-place row copies outside the compiled graph) and
# samples from the trained network.

def test_compile_matches_eager_on_cuda():
    images = _images()
    results = []
    for compile in (False, True):
        net, _, _, step = _step('fp32', compile=compile)
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
