"""Tests for zero-shot conditional generation (sampling/guidance.py, sampling/guide_spec.py, zscg.py).

A tiny DDN (8x8 grayscale, L=7, K=16) is trained inside this module on the built-in digits (once,
about 15 s on one CPU thread); every guide must then pull the generated images toward its own
condition compared with unguided samples of the same seeds. Choosers are checked for diversity,
determinism per seed and batch invariance; parse_guides for its error messages; zscg.py for its PNG.
"""

import os
import pickle
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import zscg
from sampling import choosers
from sampling import network_scorers
from sampling import guidance as G
from training.ddl import LayerInfo, argmin, resize_area
from sampling.guide_spec import MissingGuideInput, load_guide_image, load_mask, load_module, parse_guides
from training.image_ops import LUMA_WEIGHTS, edge_map
from training.determinism import batch_invariant
from training.snapshot import UnsafeFileError

# Seeds of the guided/unguided comparisons, and the dataset images used as conditions (one per seed).
SEEDS = list(range(16))
COND = slice(1000, 1016)

# ----------------------------------------------------------------------------
# Fixtures: the digits in [-1, 1], a tiny trained DDN, its snapshot, a tiny digit classifier.

# The shared tiny trained net of conftest.py (trained on digits [:1000]; COND lies beyond).
@pytest.fixture(scope='module')
def net(tiny_net):
    return tiny_net

@pytest.fixture(scope='module')
def snapshot(tiny_snapshot):
    return tiny_snapshot

# The digit classifier of conftest.py.
@pytest.fixture(scope='module')
def classifier(digit_classifier):
    return digit_classifier

# Images of `net` guided by `scorer` (argmin unless a chooser is given) and unguided, same seeds.
def _generate(net, scorer=None, chooser=argmin, seeds=SEEDS):
    with torch.no_grad(), batch_invariant():
        if scorer is None:
            return net(seeds=seeds).images
        return net(scorer=scorer, chooser=chooser, seeds=seeds).images

# Number of distinct images in a batch.
def _distinct(images):
    return len({tuple(row) for row in images.flatten(1).tolist()})

# ----------------------------------------------------------------------------
# Every guide lowers its own distance: (scorer, yardstick, minimum unguided / guided ratio).

def _cases(x):
    top = torch.ones(1, 1, 8, 8)
    top[..., 4:, :] = 0
    edges = edge_map(x) * 2 - 1
    return {
        'l2':       (G.L2Scorer(x), G.L2Scorer(x), 2),
        'superres': (G.SuperResScorer(resize_area(x, 4)), G.SuperResScorer(resize_area(x, 4)), 2),      # Error after downsampling.
        'inpaint':  (G.InpaintScorer(x, top), G.InpaintScorer(x, top), 2),                       # Error on known pixels.
        'color':    (G.ColorScorer(x), G.ColorScorer(x), 2),
        'lowbit':   (G.LowBitScorer(x, 1), G.LowBitScorer(x, 1, quantize_candidates=True), 1.5),  # Pixels off by a bin.
        'edge':     (G.EdgeScorer(edges), G.EdgeScorer(edges), 1.3),
        'style':    (network_scorers.StyleScorer(x), network_scorers.StyleScorer(x), 1.5),
    }

@pytest.mark.parametrize('name', ['l2', 'superres', 'inpaint', 'color', 'lowbit', 'edge', 'style'])
def test_guide_lowers_its_distance(net, digits, name):
    x = digits[0][COND]
    scorer, yardstick, ratio = _cases(x)[name]
    guided = G.final_distance(yardstick, _generate(net, scorer)).mean().item()
    unguided = G.final_distance(yardstick, _generate(net)).mean().item()
    print(f'{name}: unguided {unguided:.4f} guided {guided:.4f} ({unguided / guided:.1f}x)')
    assert guided * ratio <= unguided

def test_inpaint_unknown_pixels_are_free(net, digits):
    # The guide's unknown pixels must not matter: a different fill there gives the same choice.
    x = digits[0][COND]
    m = torch.ones(1, 1, 8, 8)
    m[..., 4:, :] = 0
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a = _generate(net, G.InpaintScorer(x, m))
    b = _generate(net, G.InpaintScorer(x * m + noise * (1 - m), m))
    assert torch.equal(a, b)

def test_classifier_guide_raises_class_probability(net, classifier, tmp_path):
    path = tmp_path / 'classifier.pkl'
    with open(path, 'wb') as f:
        pickle.dump(classifier, f)
    p = {}
    for c in (3, 7):
        scorer = parse_guides('classifier', img_channels=1, img_resolution=8, classifier=str(path), class_idx=c,
                              trust_pickle=True)
        guided = classifier(_generate(net, scorer)).softmax(1)[:, c].mean().item()
        unguided = classifier(_generate(net)).softmax(1)[:, c].mean().item()
        p[c] = (unguided, guided)
        assert guided > max(0.5, unguided + 0.3), p
    print('p(class) unguided -> guided:', p)

@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_classifier_from_torchscript(classifier, tmp_path):
    path = tmp_path / 'classifier.pt'
    torch.jit.trace(classifier, torch.zeros(1, 1, 8, 8)).save(str(path))
    # TorchScript runs the code it carries: refused unless trusted.
    with pytest.raises(UnsafeFileError, match='TorchScript archive.*trust_pickle=True'):
        load_module(path)
    module = load_module(path, trust_pickle=True)
    x = torch.zeros(2, 1, 8, 8)
    assert torch.allclose(module(x), classifier(x), atol=1e-6)

def test_color_uses_luminance_only():
    # RGB candidates with the guide's luminance but different hues all score 0; others do not.
    gray = torch.rand(1, 1, 4, 4) * 0.5 - 0.25
    w = torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    shift = torch.randn(1, 3, 1, 1)
    shift = shift - (shift * w).sum(1, keepdim=True)                       # Zero-luminance colour shift.
    cand = torch.stack([gray.expand(-1, 3, -1, -1), gray + shift, gray.expand(-1, 3, -1, -1) + 0.3], 1)
    d = G.ColorScorer(gray)(cand, LayerInfo(0, 1, 3, 4))
    assert d[0, 0] < 1e-10 and d[0, 1] < 1e-10 and d[0, 2] > 0.08

# ----------------------------------------------------------------------------
# Combinations and choosers.

def test_heavier_weight_wins(net, digits):
    images = digits[0]
    a, b = images[COND], images[1100:1116]
    la, lb = G.L2Scorer(a), G.L2Scorer(b)
    to_a = _generate(net, G.CombinedScorer([(la, 4), (lb, 1)]))
    to_b = _generate(net, G.CombinedScorer([(la, 1), (lb, 4)]))
    da = [G.final_distance(la, y).mean().item() for y in (to_a, to_b)]
    db = [G.final_distance(lb, y).mean().item() for y in (to_a, to_b)]
    assert da[0] < da[1] and db[1] < db[0], (da, db)
    assert da[0] < db[0] and db[1] < da[1], (da, db)

def test_combined_is_scale_free():
    # Per-sample normalisation: multiplying one scorer's distances by 1000 changes nothing.
    cand = torch.randn(3, 16, 1, 4, 4)
    info = LayerInfo(0, 1, 16, 4)
    s1, s2 = G.L2Scorer(torch.zeros(1, 1, 4, 4)), G.ColorScorer(torch.ones(1, 1, 4, 4) * 0.5)
    scaled = lambda c, i: s2(c, i) * 1000
    d1 = G.CombinedScorer([(s1, 1), (s2, 2)])(cand, info)
    d2 = G.CombinedScorer([(s1, 1), (scaled, 2)])(cand, info)
    assert torch.allclose(d1, d2, atol=1e-5)

@pytest.mark.parametrize('chooser', [choosers.TemperatureChooser(0.3), choosers.TopKChooser(3)], ids=['temperature', 'topk'])
def test_random_choosers_give_diversity(net, digits, chooser):
    scorer = G.SuperResScorer(resize_area(digits[0][1000:1001], 4))
    greedy = _generate(net, scorer)
    sampled = _generate(net, scorer, chooser)
    assert _distinct(greedy) <= 2 < 8 <= _distinct(sampled)
    # Still guided: much closer to the condition than unguided samples.
    assert G.final_distance(scorer, sampled).mean() * 2 < G.final_distance(scorer, _generate(net)).mean()

@pytest.mark.parametrize('chooser', [argmin, choosers.TemperatureChooser(0.5), choosers.TopKChooser(3)], ids=['argmin', 'temperature', 'topk'])
def test_guided_sampling_is_per_seed(net, digits, chooser):
    scorer = parse_guides('inpaint:1,l2:0.2', img_channels=1, img_resolution=8,
                          image=digits[0][1000:1001], mask=zscg.hole_mask(8, 'right'))
    seeds = [5, 0, 9, 3, 5, 11]
    batch = _generate(net, scorer, chooser, seeds)
    assert torch.equal(batch, _generate(net, scorer, chooser, seeds))
    for i, seed in enumerate(seeds):
        assert torch.equal(batch[i:i + 1], _generate(net, scorer, chooser, [seed])), seed

@pytest.mark.parametrize('chooser', [argmin, choosers.TemperatureChooser(0.5), choosers.TopKChooser(3)], ids=['argmin', 'temperature', 'topk'])
def test_silent_scorer_samples_like_unguided(net, chooser):
    # A scorer with nothing to say (constant rows) must leave sampling exactly as without guidance.
    silent = lambda cand, info: torch.zeros(cand.shape[:2])
    assert torch.equal(_generate(net, silent, chooser), _generate(net))

def test_chooser_rules():
    dist = torch.tensor([[3., 1., 2., 1., 5.], [0., 4., 4., 4., 4.]])
    u = torch.tensor([0.9, 0.3], dtype=torch.float64)
    assert argmin(dist, None, None).tolist() == [1, 0]
    assert argmin(dist, None, u).tolist() == [3, 0]                      # Tie broken by u.
    assert choosers.TemperatureChooser(0)(dist, None, u).tolist() == [3, 0]
    assert choosers.TopKChooser(1)(dist, None, u).tolist() == [1, 0]                # Rank ties broken by index.
    assert choosers.TopKChooser(3)(dist, None, torch.tensor([0.99, 0.0], dtype=torch.float64)).tolist() == [2, 0]
    # Low temperature concentrates on the best, high temperature spreads.
    d = torch.arange(8.)[None].expand(4000, -1)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cold = choosers.TemperatureChooser(0.05)(d, None, u)
    hot = choosers.TemperatureChooser(100)(d, None, u)
    assert (cold == 0).all()
    assert torch.bincount(hot, minlength=8).min() > 400
    assert choosers.TemperatureChooser(1)(d[:5], None, None).shape == (5,)       # Falls back to torch.rand.
    with pytest.raises(ValueError):
        choosers.TemperatureChooser(-1)
    with pytest.raises(ValueError):
        choosers.TopKChooser(0)

# ----------------------------------------------------------------------------
# CLIP: the optional package.

def test_clip_without_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'open_clip', None)
    monkeypatch.setitem(sys.modules, 'clip', None)
    with pytest.raises(ImportError, match='pip install open_clip_torch'):
        parse_guides('clip', img_channels=1, img_resolution=8, text='a digit three')

def test_clip_scorer_with_a_stand_in_package(monkeypatch):
    # A fake open_clip whose "image embedding" is the mean brightness: bright images match the text.
    class Model(nn.Module):
        def encode_image(self, x):
            assert x.shape[1:] == (3, 224, 224)
            b = x.mean((1, 2, 3))
            return torch.stack([b, torch.ones_like(b)], 1)

        def encode_text(self, tokens):
            return torch.tensor([[1.0, 0.0]])
    fake = types.SimpleNamespace(
        create_model_and_transforms=lambda name, pretrained=None, device=None: (Model(), None, None),
        get_tokenizer=lambda name: (lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)))
    monkeypatch.setitem(sys.modules, 'open_clip', fake)
    scorer = parse_guides('clip', img_channels=1, img_resolution=8, text='something bright')
    cand = torch.stack([torch.full((2, 1, 8, 8), v) for v in (-0.5, 0.9, 0.1)], 1)
    d = scorer.scorers[0][0](cand, LayerInfo(6, 7, 3, 8))
    assert d.argmin(1).tolist() == [1, 1]
    small = scorer.scorers[0][0](cand[..., :4, :4], LayerInfo(3, 7, 3, 4))  # Below min_size: stays random.
    assert torch.equal(small, torch.zeros(2, 3))

# ----------------------------------------------------------------------------
# parse_guides: specs, inputs and their errors.

def test_parse_guides_builds_weighted_scorers(digits):
    x = digits[0][1000:1001]
    scorer = parse_guides(' inpaint:1, color:0.5 ,lowbit', img_channels=1, img_resolution=8,
                          image=x, mask=torch.ones(8, 8), bits=2)
    kinds = [(type(s).__name__, w) for s, w in scorer.scorers]
    assert kinds == [('InpaintScorer', 1.0), ('ColorScorer', 0.5), ('LowBitScorer', 1.0)]

@pytest.mark.parametrize('spec, inputs, message', [
    ('blur', {}, "Unknown guide type 'blur'"),
    ('', {}, 'Empty guide spec'),
    ('l2:heavy', dict(image='x'), "Bad weight 'heavy'"),
    ('l2:-1', dict(image='x'), 'must be finite and >= 0'),
])
def test_parse_guides_bad_spec(spec, inputs, message):
    with pytest.raises(ValueError, match=message):
        parse_guides(spec, img_channels=1, img_resolution=8, **inputs)

# A missing input is named by its keyword argument (generate.py names the option that gives it).
@pytest.mark.parametrize('spec, inputs, missing', [
    ('l2', {}, ('image',)),
    ('inpaint', dict(image='x'), ('mask',)),
    ('lowbit', dict(image='x'), ('bits',)),
    ('classifier', dict(class_idx=3), ('classifier',)),
    ('classifier', dict(classifier='c.pkl'), ('class_idx',)),
    ('classifier', {}, ('classifier', 'class_idx')),
    ('clip', {}, ('text',)),
])
def test_parse_guides_missing_inputs(spec, inputs, missing):
    with pytest.raises(MissingGuideInput, match=f'needs {" and ".join(missing)}$') as info:
        parse_guides(spec, img_channels=1, img_resolution=8, **inputs)
    assert isinstance(info.value, ValueError) and info.value.guide == spec and info.value.inputs == missing

@pytest.mark.parametrize('spec, inputs, message', [
    ('l2', dict(image=torch.zeros(3, 8, 8)), r'3 channel\(s\)'),
    ('l2', dict(image=torch.zeros(1, 16, 16)), r'16x16, but the network makes 8x8'),
    ('superres', dict(image=torch.zeros(1, 3, 3)), 'divides'),
    ('superres', dict(image=torch.zeros(1, 16, 16)), 'divides'),
    ('inpaint', dict(image=torch.zeros(1, 8, 8), mask=torch.ones(4, 4)), 'Guide mask is 4x4'),
    ('edge', dict(image=torch.zeros(3, 8, 8)), 'edge map has 3'),
    ('l2', dict(image=torch.zeros(1, 8, 4)), 'must be a square image'),
])
def test_parse_guides_shape_mismatch(spec, inputs, message):
    with pytest.raises(ValueError, match=message):
        parse_guides(spec, img_channels=1, img_resolution=8, **inputs)

def test_guide_batch_mismatch(net):
    scorer = G.L2Scorer(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match='holds 3 images but the batch has 2'):
        _generate(net, scorer, seeds=[0, 1])

def test_load_guide_files(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:, :4] = (255, 0, 0)
    PIL.Image.fromarray(rgb, 'RGB').save(tmp_path / 'g.png')
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4] = 255
    PIL.Image.fromarray(mask, 'L').save(tmp_path / 'm.png')
    x = load_guide_image(tmp_path / 'g.png', channels=3, resolution=8)
    assert x.shape == (1, 3, 8, 8) and x.min() == -1 and torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1, -1]), atol=0.01)
    gray = load_guide_image(tmp_path / 'g.png', channels=1)
    assert gray.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match='is 8x8, but 16x16 is needed'):
        load_guide_image(tmp_path / 'g.png', channels=3, resolution=16)
    assert load_guide_image(tmp_path / 'g.png', 3, 16, allow_resize=True).shape == (1, 3, 16, 16)
    m = load_mask(tmp_path / 'm.png', resolution=8)
    assert m.shape == (1, 1, 8, 8) and m[0, 0, 0, 0] == 1 and m[0, 0, 7, 0] == 0
    scorer = parse_guides('inpaint,color', img_channels=1, img_resolution=8, image=str(tmp_path / 'g.png'), mask=str(tmp_path / 'm.png'))
    assert len(scorer.scorers) == 2
    with pytest.raises(ValueError, match='Guide mask'):
        load_mask(tmp_path / 'm.png', resolution=4)

# ----------------------------------------------------------------------------
# zscg.py: the figure.

@pytest.mark.parametrize('task', ['inpaint', 'superres'])
def test_zscg_figure(snapshot, tmp_path, task):
    out = tmp_path / 'fig.png'
    args = ['--network', os.path.dirname(snapshot), '--task', task, '--images', '0-2', '--seeds', '0-3', '--out', str(out)]
    result = CliRunner().invoke(zscg.main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    cell, sep = 64, 2                                                       # 8x8 upscaled 8x; 64 // 32.
    with PIL.Image.open(out) as image:
        assert image.size == (6 * cell + 7 * sep, 3 * cell + 4 * sep)       # condition + 4 seeds + GT, 3 rows.
        assert image.mode == 'L'
    assert 'guided vs' in result.output

def test_zscg_errors(snapshot, tmp_path):
    result = CliRunner().invoke(zscg.main, ['--network', snapshot, '--images', '5000', '--out', str(tmp_path / 'x.png')])
    assert result.exit_code != 0 and 'out of range' in result.output
    result = CliRunner().invoke(zscg.main, ['--network', str(tmp_path / 'nothing.pkl'), '--out', str(tmp_path / 'x.png')])
    assert result.exit_code != 0 and 'Network not found' in result.output
