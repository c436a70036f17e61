"""Tests for guided generation and conditional networks in generate.py (`--guide*`, `--condition-image`).

Two tiny nets are trained once in this module: an unconditional 8x8 grayscale DDN on the built-in
digits (guides must pull its samples toward their condition, measured on the saved PNGs against
unguided samples of the same seeds), and a colour-conditional 8x8 RGB DDN on tinted digits (the
`--condition-image` path). Untrained class- and resize-conditional nets check the plumbing of the
other condition types. Guided sampling must stay bit-identical per seed across --batch and 1 vs 2
processes.
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import generate
from training.images import to_float, to_pil, to_uint8
from sampling import network_scorers
from sampling import guidance as G
from training.dataset import DigitsDataset
from training.ddl import resize_area
from sampling.guide_spec import load_guide_image, load_mask, parse_guides
from training.image_ops import edge_map
from training.networks import DDNGenerator
from training.split_prune import split_and_prune

# The style test saves a TorchScript feature network; PyTorch warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:DeprecationWarning')

SEEDS = '0-15'
NUM = 16

# ----------------------------------------------------------------------------
# Helpers: images in and out of PNG files, and the CLI in this process or under torchrun.

# uint8 CHW array of a PNG.
def _read_png(path):
    image = np.array(PIL.Image.open(path))
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)

# The PNGs of seeds 0..num-1 of a folder as a float tensor (N, C, H, W) in [-1, 1].
def _images(folder, num=NUM):
    return torch.from_numpy(np.stack([_read_png(folder / f'{i:06d}.png') for i in range(num)])).float() / 127.5 - 1

# {file name: bytes} of the PNG images of a folder (the grid excluded).
def _pngs(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
            if name.endswith('.png') and name != 'grid.png'}

# Save images (1 or N, C, H, W) in [-1, 1] as one PNG (the first image).
def _save_png(x, path):
    to_pil(to_uint8(x[0]).numpy()).save(path)
    return str(path)

def _json(path):
    with open(path) as f:
        return json.load(f)

# Number of distinct images in a batch.
def _distinct(images):
    return len({tuple(row) for row in images.flatten(1).tolist()})

# Run generate.py in this process; returns the click result after checking its exit status.
def _generate(args, ok=True):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result

# A failing generate.py call whose output contains `message`.
def _fails(args, message):
    result = _generate(args, ok=False)
    assert result.exit_code != 0 and message in result.output, result.output
    return result

# ----------------------------------------------------------------------------
# Fixtures: a tiny unconditional net, a tiny colour-conditional net, the digit classifier (TorchScript)
# (the digits and the classifier come from conftest.py).

# Train `net` briefly (nearest-candidate loss + Split-and-Prune); `condition_of(batch)` for conditional nets.
def _train(net, images, steps, condition_of=None):
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (64,), generator=gen)]
        condition = None if condition_of is None else condition_of(x, gen)
        loss = net(target=x, condition=condition).losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        split_and_prune(net, opt)
    return net.eval().requires_grad_(False)

def _snapshot(net, path):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net), f)
    return str(path)

# The shared tiny trained net of conftest.py (trained on digits [:1000]), as a snapshot pickle.
@pytest.fixture(scope='module')
def snapshot(tiny_snapshot):
    return tiny_snapshot

# Unguided samples of the seeds every guided run uses.
@pytest.fixture(scope='module')
def unguided(snapshot, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('unguided')
    _generate(['--network', snapshot, '--outdir', outdir, '--seeds', SEEDS])
    return outdir

# A test digit (not in the training set) as the condition, and its derived guide files.
@pytest.fixture(scope='module')
def guide_files(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp('guides')
    x = digits[0][1500:1501]
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 4:, :] = 0                                                    # Top half known.
    files = dict(image=_save_png(x, folder / 'digit.png'),
                 low=_save_png(resize_area(x, 4), folder / 'low4.png'),
                 mask=_save_png(mask * 2 - 1, folder / 'mask.png'),
                 edges=_save_png(edge_map(x) * 2 - 1, folder / 'edges.png'),
                 big=_save_png(resize_area(x, 16), folder / 'big16.png'),
                 odd=_save_png(resize_area(x, 3), folder / 'odd3.png'),
                 small_mask=_save_png(torch.ones(1, 1, 4, 4), folder / 'mask4.png'))
    # Read back: the guides as the CLI sees them (uint8-quantised).
    files['x'] = load_guide_image(files['image'])
    files['x_low'] = load_guide_image(files['low'])
    files['m'] = load_mask(files['mask'])
    files['e'] = load_guide_image(files['edges'])
    return files

# The digit classifier of conftest.py as TorchScript (what --guide-classifier loads with --trust-code).
@pytest.fixture(scope='module')
def classifier(digit_classifier, tmp_path_factory):
    clf = digit_classifier
    path = tmp_path_factory.mktemp('clf') / 'classifier.pt'
    torch.jit.trace(clf, torch.zeros(1, 1, 8, 8)).save(str(path))
    return clf, str(path)

# ----------------------------------------------------------------------------
# Each guide lowers its own distance vs unguided samples of the same seeds, measured on the PNGs.
# (guide spec, extra CLI options, yardstick, minimum unguided / guided ratio)

def _cases(f):
    return {
        'inpaint':  (['--guide-image', f['image'], '--guide-mask', f['mask']], G.InpaintScorer(f['x'], f['m']), 2),  # Known pixels.
        'superres': (['--guide-image', f['low']], G.SuperResScorer(f['x_low']), 2),                 # Error after downsampling.
        'l2':       (['--guide-image', f['image']], G.L2Scorer(f['x']), 2),
        'color':    (['--guide-image', f['image']], G.ColorScorer(f['x']), 2),
        'lowbit':   (['--guide-image', f['image'], '--guide-bits', 1], G.LowBitScorer(f['x'], 1, quantize_candidates=True), 1.5),
        'edge':     (['--guide-image', f['edges']], G.EdgeScorer(f['e']), 1.2),
    }

@pytest.mark.parametrize('guide', ['inpaint', 'superres', 'l2', 'color', 'lowbit', 'edge'])
def test_guide_lowers_its_distance(snapshot, unguided, guide_files, tmp_path, guide):
    extra, yardstick, ratio = _cases(guide_files)[guide]
    result = _generate(['--network', snapshot, '--outdir', tmp_path, '--seeds', SEEDS, '--guide', guide, *extra])
    guided_d = G.final_distance(yardstick, _images(tmp_path)).mean().item()
    unguided_d = G.final_distance(yardstick, _images(unguided)).mean().item()
    print(f'{guide}: unguided {unguided_d:.4f} guided {guided_d:.4f} ({unguided_d / guided_d:.1f}x)')
    assert guided_d * ratio <= unguided_d

    # The options are recorded next to the outputs; metrics.json holds the guide distance of the PNGs.
    options = _json(tmp_path / 'generation_options.json')
    assert options['mode'] == 'sample' and options['seeds'] == SEEDS and options['num'] == NUM
    assert options['guide']['spec'] == guide and options['guide']['guides'] == [dict(type=guide, weight=1.0)]
    assert options['guide']['chooser'] == dict(rule='argmin') and options['guide']['image'] == extra[1]
    metrics = _json(tmp_path / 'metrics.json')
    assert metrics['guide']['spec'] == guide
    scorer = parse_guides(guide, img_channels=1, img_resolution=8, image=extra[1],
                          mask=guide_files['mask'], bits=1)
    assert metrics['guide_distance'] == pytest.approx(G.final_distance(scorer, _images(tmp_path)).mean().item(), rel=1e-5)
    assert f'guide_distance={metrics["guide_distance"]:g}' in result.output

def test_style_guide_follows_its_image_and_features(snapshot, unguided, guide_files, tmp_path):
    # Style image and feature network given apart: a TorchScript of random conv features other than
    # the default ones (seed 1), so a run that dropped --guide-features would choose other images.
    features = str(tmp_path / 'features.pt')
    feature_net = network_scorers.RandomFeatures(1, seed=1)
    torch.jit.script(feature_net).save(features)
    inverted = _save_png(-guide_files['x'], tmp_path / 'inverted.png')     # Another style: black ink on white.
    runs = dict(digit=(guide_files['image'], features), inverted=(inverted, features), default=(guide_files['image'], None))
    out = dict(unguided=_images(unguided))
    for name, (style, feats) in runs.items():
        _generate(['--network', snapshot, '--outdir', tmp_path / name, '--seeds', SEEDS, '--guide', 'style',
                   '--guide-style', style] + (['--guide-features', feats, '--trust-code'] if feats else []))
        out[name] = _images(tmp_path / name)
    assert _json(tmp_path / 'digit' / 'generation_options.json')['guide']['features'] == features
    to_digit = network_scorers.StyleScorer(guide_files['x'], feature_net)
    to_inverted = network_scorers.StyleScorer(load_guide_image(inverted), feature_net)
    d = {(scorer, name): G.final_distance(s, out[name]).mean().item()
         for scorer, s in (('digit', to_digit), ('inverted', to_inverted)) for name in out}
    print('style distances (style, samples):', d)
    # The guided samples' feature statistics are closer to the style image's than unguided samples' ...
    assert d['digit', 'digit'] * 2 < d['digit', 'unguided']
    # ... they follow the style image (toward the inverted digit, closer to it than toward the digit) ...
    assert d['inverted', 'inverted'] * 1.5 < d['inverted', 'digit']
    # ... and the feature network decides the choice: the default features choose other images.
    assert (out['default'] != out['digit']).flatten(1).any(1).sum() >= NUM // 2

def test_weighted_combination_follows_the_heavier_guide(snapshot, digits, classifier, tmp_path):
    # Toward a digit 0 by L2, toward class 7 by the classifier: the heavier weight wins.
    clf, clf_path = classifier
    images, labels = digits
    zero = images[1000:][labels[1000:] == 0][:1]
    target = _save_png(zero, tmp_path / 'zero.png')
    x = load_guide_image(target)
    dist_l2, p7 = {}, {}
    for name, spec in [('l2', 'l2:4,classifier:1'), ('clf', 'l2:1,classifier:4')]:
        _generate(['--network', snapshot, '--outdir', tmp_path / name, '--seeds', SEEDS, '--guide', spec,
                   '--guide-image', target, '--guide-classifier', clf_path, '--class', 7, '--trust-code'])
        out = _images(tmp_path / name)
        dist_l2[name] = G.final_distance(G.L2Scorer(x), out).mean().item()
        p7[name] = clf(out).softmax(1)[:, 7].mean().item()
    print('l2 distance', dist_l2, 'p(7)', p7)
    assert dist_l2['l2'] < dist_l2['clf'] and p7['clf'] > p7['l2'] + 0.2
    guide = _json(tmp_path / 'clf' / 'generation_options.json')['guide']
    assert guide['guides'] == [dict(type='l2', weight=1.0), dict(type='classifier', weight=4.0)] and guide['class'] == 7

# ----------------------------------------------------------------------------
# Choice rules: argmin collapses diversity, a temperature or top-k keeps it, still guided.

def test_temperature_and_topk_give_diversity(snapshot, unguided, guide_files, tmp_path):
    base = ['--network', snapshot, '--seeds', SEEDS, '--guide', 'superres', '--guide-image', guide_files['low']]
    _generate([*base, '--outdir', tmp_path / 'argmin'])
    _generate([*base, '--outdir', tmp_path / 'temp', '--guide-temp', 0.5])
    _generate([*base, '--outdir', tmp_path / 'topk', '--guide-topk', 3])
    argmin, temp, topk = (_images(tmp_path / name) for name in ('argmin', 'temp', 'topk'))
    assert _distinct(argmin) <= 2 < 8 <= min(_distinct(temp), _distinct(topk)), (_distinct(argmin), _distinct(temp), _distinct(topk))
    scorer = G.SuperResScorer(guide_files['x_low'])
    free = G.final_distance(scorer, _images(unguided)).mean()
    assert G.final_distance(scorer, temp).mean() * 2 < free and G.final_distance(scorer, topk).mean() * 2 < free
    assert _json(tmp_path / 'temp' / 'generation_options.json')['guide']['chooser'] == dict(rule='temperature', temperature=0.5)
    assert _json(tmp_path / 'topk' / 'generation_options.json')['guide']['chooser'] == dict(rule='topk', topk=3)

# ----------------------------------------------------------------------------
# Determinism: guided images of a seed do not depend on the batch or the number of processes.

def test_guided_sampling_is_per_seed(snapshot, guide_files, tmp_path):
    guide = ['--guide', 'superres', '--guide-image', guide_files['low'], '--guide-temp', 0.3]
    _generate(['--network', snapshot, '--outdir', tmp_path / 'b1', '--seeds', '0-9', '--batch', 1, *guide])
    _generate(['--network', snapshot, '--outdir', tmp_path / 'b5', '--seeds', '0-9', '--batch', 5, *guide])
    reference = _pngs(tmp_path / 'b1')
    assert len(reference) == 10 and _pngs(tmp_path / 'b5') == reference
    assert _distinct(_images(tmp_path / 'b1', 10)) > 3                   # Not trivially equal images.

    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONWARNINGS='ignore')
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    args = ['--network', snapshot, '--outdir', tmp_path / 'p2', '--seeds', '5-9,0-4', '--batch', 2, *guide]
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(REPO, 'generate.py'), *[str(a) for a in args]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _pngs(tmp_path / 'p2') == reference
    with np.load(tmp_path / 'p2' / 'latents.npz') as a, np.load(tmp_path / 'b1' / 'latents.npz') as b:
        np.testing.assert_array_equal(a['seeds'], b['seeds'])
        np.testing.assert_array_equal(a['codes'], b['codes'])
    assert _json(tmp_path / 'p2' / 'generation_options.json')['world_size'] == 2
    # Decoding the guided latents gives the guided images.
    _generate(['--network', snapshot, '--outdir', tmp_path / 'dec', '--codes', tmp_path / 'p2' / 'latents.npz'])
    assert _pngs(tmp_path / 'dec') == reference

# ----------------------------------------------------------------------------
# Errors: missing guide inputs, mismatched sizes, options that do not apply.

def test_guide_errors(snapshot, guide_files, classifier, tmp_path, monkeypatch):
    f = guide_files
    run = ['--network', snapshot, '--outdir', tmp_path / 'out', '--seeds', '0-1']
    _fails([*run, '--guide', 'l2'], 'needs --guide-image')
    _fails([*run, '--guide', 'inpaint', '--guide-image', f['image']], 'needs --guide-mask')
    _fails([*run, '--guide', 'lowbit', '--guide-image', f['image']], 'needs --guide-bits')
    _fails([*run, '--guide', 'classifier', '--class', 3], 'needs --guide-classifier')
    _fails([*run, '--guide', 'classifier', '--guide-classifier', classifier[1]], 'needs --class')
    _fails([*run, '--guide', 'clip'], 'needs --guide-text')
    _fails([*run, '--guide', 'blur'], "Unknown guide type 'blur'")
    _fails([*run, '--guide', 'l2:heavy', '--guide-image', f['image']], "Bad weight 'heavy'")
    _fails([*run, '--guide', 'l2', '--guide-image', tmp_path / 'none.png'], 'does not exist')
    # Sizes that do not fit the 8x8 network.
    _fails([*run, '--guide', 'l2', '--guide-image', f['big']], '16x16, but the network makes 8x8')
    _fails([*run, '--guide', 'superres', '--guide-image', f['odd']], 'divides')
    _fails([*run, '--guide', 'inpaint', '--guide-image', f['image'], '--guide-mask', f['small_mask']], 'Guide mask is 4x4')
    # Options without their guide, or outside sampling.
    _fails([*run, '--guide-image', f['image']], '--guide-image is only used with --guide')
    _fails([*run, '--guide', 'l2', '--guide-image', f['image'], '--guide-mask', f['mask']], '--guide-mask is not read by --guide l2')
    _fails([*run, '--guide-temp', 0.3], '--guide-temp is only used with --guide')
    _fails([*run, '--guide', 'l2', '--guide-image', f['image'], '--guide-temp', 0.3, '--guide-topk', 2], 'give one of them')
    _fails(['--network', snapshot, '--outdir', tmp_path / 'rec', '--reconstruct', 'digits', '--guide', 'l2',
            '--guide-image', f['image']], '--guide steers sampling')
    _fails([*run, '--class', 3], 'unconditional')                           # --class without a label input or classifier.
    _fails([*run, '--condition-image', f['image']], 'this network is unconditional')
    # CLIP without a CLIP package says what to install.
    monkeypatch.setitem(sys.modules, 'open_clip', None)
    monkeypatch.setitem(sys.modules, 'clip', None)
    _fails([*run, '--guide', 'clip', '--guide-text', 'a digit three'], 'pip install open_clip_torch')

# ----------------------------------------------------------------------------
# Conditional networks: --condition-image for a colour-conditional net trained on tinted digits.

TINTS = torch.tensor([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.3, 1.0]])

# Digits tinted by class (colour follows the digit), RGB in [-1, 1].
def _tinted(images, labels):
    gray = (images + 1) / 2
    return gray * TINTS[labels % 3][:, :, None, None] * 2 - 1

@pytest.fixture(scope='module')
def color_net(digits):
    images, labels = digits
    x = _tinted(images[:1000], labels[:1000])
    torch.manual_seed(0)
    net = DDNGenerator(8, 3, max_outputk=16, max_blockn=2, max_channels=32, condition='color')
    return _train(net, x, 50, condition_of=lambda batch, gen: net.make_condition(batch, generator=gen))

@pytest.fixture(scope='module')
def color_snapshot(color_net, tmp_path_factory):
    return _snapshot(color_net, tmp_path_factory.mktemp('color') / 'network-snapshot-000003.pkl')

def test_condition_image(color_net, color_snapshot, digits, tmp_path):
    images, labels = digits
    test = _tinted(images[1500:1502], labels[1500:1502])
    gray = test.mean(1, keepdim=True)
    gray_png = _save_png(gray[:1], tmp_path / 'gray.png')
    rgb_png = _save_png(to_float(to_uint8(gray[:1])).expand(-1, 3, -1, -1), tmp_path / 'gray-rgb.png')
    other_png = _save_png(gray[1:], tmp_path / 'other.png')
    big_png = _save_png(resize_area(gray[:1], 16), tmp_path / 'gray16.png')
    run = ['--network', color_snapshot, '--seeds', '0-7']
    _generate([*run, '--outdir', tmp_path / 'gray', '--condition-image', gray_png])

    # The same images as the Python API with net.make_condition of the image.
    x = load_guide_image(gray_png, channels=3)
    with torch.no_grad():
        expected = color_net(seeds=list(range(8)), condition=color_net.make_condition(images=x).expand(8, -1, -1, -1)).images
    out = _images(tmp_path / 'gray', 8)
    assert PIL.Image.open(tmp_path / 'gray' / '000000.png').mode == 'RGB'
    assert torch.equal(to_uint8(expected), to_uint8(out))
    # A grayscale file and its RGB copy are the same condition; any square size is accepted.
    _generate([*run, '--outdir', tmp_path / 'rgb', '--condition-image', rgb_png])
    assert _pngs(tmp_path / 'rgb') == _pngs(tmp_path / 'gray')
    _generate([*run, '--outdir', tmp_path / 'big', '--condition-image', big_png])
    assert len(_pngs(tmp_path / 'big')) == 8
    # The samples follow their condition: their grayscale is closer to it than to another digit's.
    _generate([*run, '--outdir', tmp_path / 'other', '--condition-image', other_png])
    luminance_err = lambda y, g: (y.mean(1, keepdim=True) - g).square().mean().item()
    g0 = load_guide_image(gray_png)
    assert luminance_err(out, g0) * 1.5 < luminance_err(_images(tmp_path / 'other', 8), g0)
    options = _json(tmp_path / 'gray' / 'generation_options.json')
    assert options['condition'] == 'color' and options['condition_image'] == gray_png and options['guide'] is None

    # The latents keep the shared condition, so decoding needs no --condition-image.
    with np.load(tmp_path / 'gray' / 'latents.npz') as npz:
        assert npz['conditions'].shape == (1, 1, 8, 8)
    _generate(['--network', color_snapshot, '--outdir', tmp_path / 'dec', '--codes', tmp_path / 'gray' / 'latents.npz'])
    assert _pngs(tmp_path / 'dec') == _pngs(tmp_path / 'gray')

    # Guidance combines with the condition: toward the tinted original by L2.
    target = _save_png(test[:1], tmp_path / 'target.png')
    _generate([*run, '--outdir', tmp_path / 'guided', '--condition-image', gray_png, '--guide', 'l2', '--guide-image', target])
    l2 = G.L2Scorer(load_guide_image(target))
    assert G.final_distance(l2, _images(tmp_path / 'guided', 8)).mean() < G.final_distance(l2, out).mean()

def test_condition_reconstruct_and_decode(color_snapshot, digits, tmp_path):
    # Reconstruction derives each image's condition from the image; the latents carry it to decoding.
    images, labels = digits
    data = tmp_path / 'data'
    data.mkdir()
    for i, x in enumerate(_tinted(images[1500:1506], labels[1500:1506])):
        _save_png(x[None], data / f'{i:06d}.png')
    _generate(['--network', color_snapshot, '--outdir', tmp_path / 'rec', '--reconstruct', data])
    with np.load(tmp_path / 'rec' / 'latents.npz') as npz:
        assert npz['conditions'].shape == (6, 1, 8, 8)
    originals = torch.stack([to_float(torch.from_numpy(_read_png(data / f'{i:06d}.png'))) for i in range(6)])
    np.testing.assert_allclose(np.load(tmp_path / 'rec' / 'latents.npz')['conditions'], originals.mean(1, keepdim=True).numpy(), atol=1e-6)
    assert _json(tmp_path / 'rec' / 'metrics.json')['psnr'] > 10
    _generate(['--network', color_snapshot, '--outdir', tmp_path / 'dec', '--codes', tmp_path / 'rec' / 'latents.npz', '--batch', 4])
    assert _pngs(tmp_path / 'dec') == _pngs(tmp_path / 'rec')

def test_condition_errors(color_snapshot, snapshot, digits, tmp_path):
    gray = digits[0][1500:1501]
    gray_png = _save_png(gray, tmp_path / 'gray.png')
    PIL.Image.new('L', (8, 6)).save(tmp_path / 'wide.png')
    run = ['--network', color_snapshot, '--outdir', tmp_path / 'out', '--seeds', '0-1']
    _fails(run, "conditioned on 'color': give --condition-image")
    _fails([*run, '--condition-image', tmp_path / 'wide.png'], 'must be square')
    _fails([*run, '--condition-image', tmp_path / 'none.png'], 'does not exist')
    _fails([*run, '--class', 1], 'unconditional')                            # No label input.
    _fails(['--network', color_snapshot, '--outdir', tmp_path / 'rec', '--reconstruct', 'digits'], 'has images of shape [1, 8, 8]')
    _fails(['--network', color_snapshot, '--outdir', tmp_path / 'rec', '--reconstruct', 'digits', '--condition-image', gray_png],
           'does not apply with --reconstruct')
    _fails(['--network', snapshot, '--outdir', tmp_path / 'u', '--condition-image', gray_png], 'this network is unconditional')
    # Latents of an unconditional net hold no condition for the colour net.
    _generate(['--network', snapshot, '--outdir', tmp_path / 'plain', '--seeds', '0-1'])
    _fails(['--network', color_snapshot, '--outdir', tmp_path / 'd', '--codes', tmp_path / 'plain' / 'latents.npz'], 'holds no conditions')

# ----------------------------------------------------------------------------
# Class- and resize-conditional nets (untrained: only the plumbing is checked).

def test_class_conditional_net(tmp_path):
    torch.manual_seed(0)
    net = DDNGenerator(8, 1, max_outputk=8, max_blockn=1, max_channels=16, condition='class', label_dim=10).eval()
    snap = _snapshot(net, tmp_path / 'class.pkl')
    _generate(['--network', snap, '--outdir', tmp_path / 'three', '--seeds', '0-3', '--class', 3])
    with torch.no_grad():
        expected = net(seeds=[0, 1, 2, 3], condition=torch.eye(10)[[3, 3, 3, 3]]).images
    assert torch.equal(to_uint8(expected), to_uint8(_images(tmp_path / 'three', 4)))
    with np.load(tmp_path / 'three' / 'latents.npz') as npz:
        assert npz['classes'].tolist() == [3, 3, 3, 3]
    _fails(['--network', snap, '--outdir', tmp_path / 'x', '--class', 10], 'the network has 10 classes')
    _fails(['--network', snap, '--outdir', tmp_path / 'x', '--condition-image', _save_png(torch.zeros(1, 1, 8, 8), tmp_path / 'c.png')],
           'class-conditional; give --class')
    # Reconstruction uses the dataset labels; decoding uses the stored classes, or --class instead.
    _generate(['--network', snap, '--outdir', tmp_path / 'rec', '--reconstruct', 'digits', '--max-images', 5])
    ds = DigitsDataset(resolution=8, use_labels=True)
    with np.load(tmp_path / 'rec' / 'latents.npz') as npz:
        assert npz['classes'].tolist() == [int(np.argmax(ds.get_label(i))) for i in range(5)]
    _generate(['--network', snap, '--outdir', tmp_path / 'dec', '--codes', tmp_path / 'rec' / 'latents.npz'])
    assert _pngs(tmp_path / 'dec') == _pngs(tmp_path / 'rec')
    _generate(['--network', snap, '--outdir', tmp_path / 'dec7', '--codes', tmp_path / 'rec' / 'latents.npz', '--class', 7])
    with np.load(tmp_path / 'dec7' / 'latents.npz') as npz:
        assert npz['classes'].tolist() == [7] * 5

def test_resize_conditional_net(tmp_path):
    torch.manual_seed(0)
    net = DDNGenerator(8, 1, max_outputk=8, max_blockn=1, max_channels=16, condition='resize4').eval()
    snap = _snapshot(net, tmp_path / 'resize.pkl')
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    low = _save_png(resize_area(x, 4), tmp_path / 'low.png')
    full = _save_png(x, tmp_path / 'full.png')
    _generate(['--network', snap, '--outdir', tmp_path / 'low', '--seeds', '0-3', '--condition-image', low])
    cond = load_guide_image(low)
    with torch.no_grad():
        expected = net(seeds=[0, 1, 2, 3], condition=cond.expand(4, -1, -1, -1)).images
    assert torch.equal(to_uint8(expected), to_uint8(_images(tmp_path / 'low', 4)))
    _generate(['--network', snap, '--outdir', tmp_path / 'full', '--seeds', '0-3', '--condition-image', full])  # Downsampled.
    _fails(['--network', snap, '--outdir', tmp_path / 'x', '--condition-image', _save_png(resize_area(x, 2), tmp_path / 'tiny.png')],
           'smaller than the 4x4 condition')
