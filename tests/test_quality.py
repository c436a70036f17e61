"""Tests for bench/quality.py's measuring parts: the fixed split, the digit classifier whose features
the Frechet distance is computed in (deterministic, accurate on the held-out digits, and its FD
ranking real < blurred < noise), the Frechet / precision-recall wiring, the learning-rate schedule,
the torchvision stand-in for the peer, a one-second budgeted training of ours end to end, the
compression figures (codes files written and read back exactly) and how the Inception is fed.

The benchmark itself (minutes of training, the peer) is not part of the suite.
"""

import importlib
import sys

import pytest
import torch

quality = importlib.import_module('bench.quality')

# ----------------------------------------------------------------------------
# The split and the classifier (trained once for the module: a few seconds).

@pytest.fixture(scope='module')
def split16():
    train, train_labels, held, held_labels = quality.load_split(16)
    return train.float() / 255, train_labels, held.float() / 255, held_labels

@pytest.fixture(scope='module')
def classifier(split16):
    train, labels, _, _ = split16
    return quality.train_classifier(train, labels)

def test_split_is_fixed(split16):
    train, labels, held, held_labels = split16
    assert train.shape == (1500, 1, 16, 16) and held.shape == (297, 1, 16, 16)
    assert labels.shape == (1500,) and held_labels.shape == (297,)
    # The order is scikit-learn's: the first digits of its set are 0, 1, 2, 3, ...
    assert labels[:10].tolist() == list(range(10))
    assert 0 <= train.min() and train.max() <= 1

def test_classifier_is_deterministic(split16):
    train, labels, _, _ = split16
    a = quality.train_classifier(train, labels, steps=20)
    b = quality.train_classifier(train, labels, steps=20)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    # The global RNG is not disturbed by the classifier's training.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    quality.train_classifier(train, labels, steps=2)
    assert torch.equal(torch.rand(3), expected)

def test_classifier_generalises(split16, classifier):
    _, _, held, held_labels = split16
    with torch.no_grad():
        accuracy = (classifier(held).argmax(1) == held_labels).float().mean()
    assert accuracy > 0.9

def test_classifier_features_at_32_px():
    clf = quality.DigitClassifier(32)
    assert quality.classifier_features(clf, torch.rand(3, 1, 32, 32)).shape == (3, 64)

# The FD in the classifier's feature space ranks real digits < blurred digits < noise, and precision
# and recall see the noise as off the digits' manifold.
def test_fd_ranks_real_blur_noise(split16, classifier):
    train, _, held, _ = split16
    real = quality.classifier_features(classifier, held)
    figures = lambda x: quality.quality_figures(real, quality.classifier_features(classifier, x))
    images = train[:600]
    same = figures(images)
    blur = figures(quality.quantize(quality.half_res_round_trip(images)))
    noise = figures(quality.quantize(torch.rand_like(images)))
    assert same['fd'] < blur['fd'] < noise['fd']
    assert same['precision'] > 0.5 and same['recall'] > 0.5
    assert noise['precision'] < 0.05 and noise['recall'] < 0.05

def test_quality_figures_on_known_gaussians():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=gen).double()
    same = quality.quality_figures(x, x)
    assert same['fd'] == pytest.approx(0, abs=1e-6)
    assert same['precision'] == 1 and same['recall'] == 1
    # Same covariance, mean moved by (1, 1, 0, 0): FD = |shift|^2 = 2 (up to sampling noise).
    shift = torch.tensor([1.0, 1.0, 0, 0], dtype=torch.float64)
    y = torch.randn(4000, 4, generator=gen).double() + shift
    assert quality.quality_figures(x, y)['fd'] == pytest.approx(2, abs=0.15)

def test_quantize_and_round_trip():
    x = torch.tensor([-0.5, 0.0, 0.3, 1.7])
    assert quality.quantize(x).tolist() == pytest.approx([0, 0, round(0.3 * 255) / 255, 1])
    flat = torch.full((2, 1, 16, 16), 0.25)
    assert torch.allclose(quality.half_res_round_trip(flat), flat)

# ----------------------------------------------------------------------------
# Ours, the schedule and the peer's stand-in.

def test_scheduled_lr():
    assert quality.scheduled_lr(1e-3, 0, 0, 'none', 0.7) == 1e-3
    assert quality.scheduled_lr(1e-3, 0, 0, 'cosine', 0.5) == pytest.approx(5e-4)
    assert quality.scheduled_lr(1e-3, 0, 0, 'cosine', 1.0) == pytest.approx(0, abs=1e-12)
    assert quality.scheduled_lr(1e-3, 0, 0, 'linear', 0.25) == pytest.approx(7.5e-4)
    assert quality.scheduled_lr(1e-3, 500, 1, 'cosine', 0) == pytest.approx(5e-4)   # Half-way through warm-up.

RECIPE = dict(batch=16, lr=3e-3, lr_rampup=0, lr_decay='cosine', ema=0.001, max_channels=8, max_blockn=1,
              max_outputk=8, start_size=4, dropout=0, chain_dropout=0.05, split_prune=True, split_rule='tv', bias_rate=1e-2,
              balance_halflife=32)

def test_train_ours_for_a_budget(split16):
    train_u8 = (split16[0][:64] * 255).round().to(torch.uint8)
    net, info = quality.train_ours(train_u8, budget=1.0, recipe=RECIPE, seed=0)
    assert info['steps'] >= 1 and info['kimg'] == pytest.approx(info['steps'] * 16 / 1e3)
    assert 1.0 <= info['seconds'] < 10
    samples, recon = quality.evaluate_ours(net, train_u8[:10], num=12, batch=5)
    assert samples.shape == (12, 1, 16, 16) and recon.shape == (10, 1, 16, 16)
    assert 0 <= samples.min() and samples.max() <= 1
    assert torch.equal(samples * 255, (samples * 255).round())      # 8-bit values.

# The codes files of the held-out digits: fixed-length at ceil(log2 prod K) bits, entropy-coded with a
# prior, both decoded to the same codes and images; PSNR as compress.py computes it.
def test_compression_figures(split16):
    from training import prior as prior_lib
    from training.images import mean_psnr, psnr, to_uint8
    from training.latent import stored_bits
    torch.manual_seed(0)
    net = quality.DDNGenerator(img_resolution=16, img_channels=1, start_size=4, max_blockn=1, max_outputk=8, max_channels=8).eval()
    train_u8 = (split16[0][:40] * 255).round().to(torch.uint8)
    held_u8 = (split16[2][:20] * 255).round().to(torch.uint8)
    codes = net.encode(train_u8.float() / 127.5 - 1)[0]
    rows = quality.compression_figures(net, held_u8, [('frequency prior', prior_lib.fit_frequency_prior(codes, net.ks))], batch=7)
    assert [r['name'] for r in rows] == ['fixed-length', 'frequency prior']
    assert all(r['round_trip'] for r in rows)
    assert rows[0]['bits'] == pytest.approx((stored_bits(net.ks) * 20 + 7) // 8 * 8 / 20)
    recon = to_uint8(net.decode(net.encode(held_u8.float() / 127.5 - 1)[0]))
    assert rows[0]['psnr'] == rows[1]['psnr'] == pytest.approx(mean_psnr(psnr(recon, held_u8))[0])

# The Inception sees what fid.py gives it: uint8 RGB NCHW, grayscale repeated; the FID of a set with itself is ~0.
def test_inception_features_feed():
    seen = []
    def detector(images, return_features=True):
        seen.append(images)
        return images.flatten(1)[:, :4].double() + torch.arange(4)
    x = quality.quantize(torch.rand(5, 1, 4, 4))
    features = quality.inception_features(detector, x, batch=2)
    assert features.shape == (5, 4) and features.dtype == torch.float64
    assert all(b.dtype == torch.uint8 and b.shape[1] == 3 and torch.equal(b[:, 0], b[:, 2]) for b in seen)
    assert torch.equal(torch.cat(seen)[:, :1], (x * 255).round().to(torch.uint8))
    assert quality.frechet_distance(features, features) == pytest.approx(0, abs=1e-6)

def test_torchvision_stand_in():
    try:
        import torchvision  # noqa: F401
        pytest.skip('torchvision is installed: the stand-in is not used')
    except ImportError:
        pass
    names = ('torchvision', 'torchvision.transforms', 'torchvision.utils')
    try:
        quality._torchvision_stand_in()
        import torchvision.transforms as T
        from torchvision.utils import save_image
        with pytest.raises(RuntimeError, match='stand-in'):
            T.Compose([])
        with pytest.raises(RuntimeError, match='stand-in'):
            save_image(torch.zeros(1, 1, 2, 2), 'x.png')
    finally:
        for name in names:
            sys.modules.pop(name, None)
