"""Tests of evaluation/ (metrics.py, feature_metrics.py, image_sources.py, snapshot_metrics.py, detectors.py): KID and combined statistics against direct
computations, safe detector loading (a payload must not run), sFID and disjoint splits through
`fid.py calc`, the DINOv2 / CLIP loaders offline, and `train.py --metrics` (one JSON line per snapshot,
equal to `fid.py calc` on generate.py's PNGs of the same seeds; two gloo processes equal one).

Tiny detectors defined here stand in for Inception, DINOv2 and CLIP; nothing touches the network.
"""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fid
import generate
import train
from torch_utils import safe_pickle
from evaluation import detectors, feature_metrics, image_sources, metrics, snapshot_metrics
from training.dataset import DigitsDataset

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:DeprecationWarning')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------
# Stand-in detectors: uint8 NCHW in, (N, 16) float64 features; the spatial one also has spatial_features().

class TinyDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer('proj', torch.randn(3 * 4 * 4, 16, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 4).flatten(1) @ self.proj

class SpatialDetector(TinyDetector):
    @torch.jit.export
    def spatial_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 2).flatten(1)

def _script(module, path):
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)

# A pickle whose unpickling would create `marker` (the harmless stand-in for a malicious detector).
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))

# A pickle built like StyleGAN3's inception-2015-12-05.pkl: the TorchScript archive as bytes, rebuilt by one global.
class _TorchScriptInPickle:
    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))

def _write_pngs(folder, count, low, high, seed):
    os.makedirs(folder)
    rng = np.random.RandomState(seed)
    for i in range(count):
        Image.fromarray(rng.randint(low, high + 1, size=(16, 16, 3)).astype(np.uint8)).save(os.path.join(folder, f'{i:06d}.png'))
    return str(folder)

def _metric_lines(output):
    lines = [line for line in output.splitlines() if '=' in line and ' ' not in line]
    return {name: value for name, value in (line.split('=', 1) for line in lines)}

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / 'cache'
    monkeypatch.setenv('DDN_CACHE_DIR', str(path))
    return str(path)

# ----------------------------------------------------------------------------
# KID and combined statistics.

# With every real feature a and every generated one b, each block's unbiased MMD^2 is exactly
# k(a, a) + k(b, b) - 2 k(a, b) with KID's kernel k(x, y) = (x.y / D + 1)^3, whatever the blocks.
def test_kid_kernel_on_constant_features():
    rng = np.random.RandomState(0)
    a, b = rng.standard_normal(5), rng.standard_normal(5) + 0.3
    k = lambda x, y: (x @ y / 5 + 1) ** 3
    kid, se, blocks, size = feature_metrics.kernel_inception_distance(np.tile(a, (24, 1)), np.tile(b, (24, 1)), subset_size=12)
    assert (blocks, size) == (2, 12)
    assert kid == pytest.approx(k(a, a) + k(b, b) - 2 * k(a, b), rel=1e-10) and se == pytest.approx(0, abs=1e-9)

def test_kid_is_unbiased_and_has_a_standard_error():
    rng = np.random.RandomState(1)
    same = [feature_metrics.kernel_inception_distance(rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8)), subset_size=200, seed=s)
            for s in range(3)]
    for kid, se, blocks, size in same:
        assert blocks == 10 and size == 200 and se > 0
        assert abs(kid) < 4 * se        # Zero in expectation for one distribution (a biased estimate is > 0).
    kid, se, _, _ = feature_metrics.kernel_inception_distance(rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8)) + 0.5, subset_size=200)
    assert kid > 10 * se

def test_combined_split_statistics_equal_those_of_all_images():
    rng = np.random.RandomState(2)
    features = rng.standard_normal((50, 6))
    parts = []
    for chunk in np.array_split(features, 3):
        mu, sigma = feature_metrics.compute_stats(chunk)
        parts.append(dict(num=len(chunk), mu=mu, sigma=sigma, features=chunk))
    combined = metrics.combine_stats(parts)
    mu, sigma = feature_metrics.compute_stats(features)
    np.testing.assert_allclose(combined['mu'], mu, rtol=1e-12)
    np.testing.assert_allclose(combined['sigma'], sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(combined['features'], features)

# ----------------------------------------------------------------------------
# Safe detector loading.

def test_stylegan3_style_pickle_needs_exactly_one_global_and_its_torchscript_needs_trust(tmp_path):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyDetector()), buffer)
    data = pickle.dumps(_TorchScriptInPickle(buffer.getvalue()))
    assert safe_pickle.globals_of(data) == [('torch.storage', '_load_from_bytes')]
    # A TorchScript archive that is not the Inception would run its code: refused unless trusted.
    with pytest.raises(detectors.UntrustedDetectorError, match='not the FID Inception-v3.*trust_pickle=True'):
        detectors.deserialize(data, 'inception-like.pkl')
    detector = detectors.deserialize(data, 'inception-like.pkl', trust_pickle=True)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(detector(images), TinyDetector()(images))
    # The same global carrying a torch.save'd Python module is held to weights_only: refused.
    buffer = io.BytesIO()
    torch.save(TinyDetector(), buffer)
    with pytest.raises(ValueError, match='Cannot load the detector'):
        detectors.deserialize(pickle.dumps(_TorchScriptInPickle(buffer.getvalue())), 'evil.pkl')

def test_payload_detector_is_refused_unrun_by_fid_py_and_train_py(tmp_path, cache_dir):
    marker = tmp_path / 'payload-ran'
    payload = tmp_path / 'detector.pkl'
    payload.write_bytes(pickle.dumps(_Payload(str(marker))))
    images = _write_pngs(tmp_path / 'images', 4, 0, 255, seed=0)
    result = CliRunner().invoke(fid.cli, ['calc', '--images', images, '--metrics', 'is', '-n', '4', '--detector', str(payload), '--workers', '0'])
    assert result.exit_code != 0 and 'io.open' in result.output and '--trust-code' in result.output
    assert not marker.exists()
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--metrics', 'fid10', '--detector', str(payload)])
    assert result.exit_code != 0 and 'io.open' in result.output and '--trust-code' in result.output
    assert not marker.exists() and not (tmp_path / 'runs').exists()

# ----------------------------------------------------------------------------
# fid.py calc: KID, sFID, disjoint splits.

def test_calc_kid_sfid_and_splits(tmp_path, cache_dir):
    detector = _script(SpatialDetector(), tmp_path / 'spatial.pt')
    plain = _script(TinyDetector(), tmp_path / 'plain.pt')
    real = _write_pngs(tmp_path / 'real', 40, 0, 255, seed=0)
    fake = _write_pngs(tmp_path / 'fake', 40, 40, 255, seed=1)
    runner = CliRunner()
    ref = str(tmp_path / 'ref.npz')
    assert runner.invoke(fid.cli, ['ref', '--data', real, '--dest', ref, '--detector', detector, '--trust-code', '--workers', '0']).exit_code == 0
    with np.load(ref) as npz:
        assert npz['mu_s'].shape == (12,) and npz['sigma_s'].shape == (12, 12)

    out = str(tmp_path / 'out.json')
    result = runner.invoke(fid.cli, ['calc', '--images', fake, '--ref', ref, '-n', '40', '--metrics', 'fid,kid,sfid',
        '--splits', '4', '--detector', detector, '--trust-code', '--workers', '0', '--out', out])
    assert result.exit_code == 0, result.output
    printed = _metric_lines(result.stdout)
    assert set(printed) == {'fid', 'fid_mean', 'fid_std', 'kid', 'kid_se', 'sfid'}
    with open(out) as f:
        saved = json.load(f)

    # The splits are the files in order, 10 each (seed ranges 0-9, 10-19, ...); each one's FID as computed directly.
    loaded = detectors.load_detector(detector, 'cpu', trust_pickle=True)
    ref_stats = metrics.load_ref(ref)
    pngs = sorted(os.listdir(fake))
    images = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(fake, n))).transpose(2, 0, 1) for n in pngs]))
    expected = [metrics.calc_metrics([part], ref_stats, ['fid'], detector=loaded, device='cpu')['fid'] for part in images.split(10)]
    np.testing.assert_allclose(saved['fid_splits'], expected, rtol=1e-9)
    assert saved['fid_mean'] == pytest.approx(np.mean(expected), rel=1e-9) and saved['fid_std'] == pytest.approx(np.std(expected, ddof=1), rel=1e-9)
    whole = metrics.calc_metrics([images], ref_stats, ['fid', 'kid', 'sfid'], detector=loaded, device='cpu')
    for name in ('fid', 'kid', 'kid_se', 'sfid'):
        assert saved[name] == pytest.approx(whole[name], rel=1e-9), name
    assert saved['sfid'] > 0 and saved['kid'] > 0

    # A detector without spatial features, or a reference without them: sFID is unavailable, with the reason.
    result = runner.invoke(fid.cli, ['calc', '--images', fake, '--ref', ref, '-n', '40', '--metrics', 'fid,sfid',
        '--detector', plain, '--trust-code', '--workers', '0'])
    assert result.exit_code == 0 and result.stdout.splitlines()[-1] == 'sfid=unavailable'
    assert 'no spatial features' in result.stdout
    ref_plain = str(tmp_path / 'ref-plain.npz')
    assert runner.invoke(fid.cli, ['ref', '--data', real, '--dest', ref_plain, '--detector', plain, '--trust-code', '--workers', '0']).exit_code == 0
    result = runner.invoke(fid.cli, ['calc', '--images', fake, '--ref', ref_plain, '-n', '40', '--metrics', 'sfid',
        '--detector', detector, '--trust-code', '--workers', '0'])
    assert result.exit_code == 0 and 'hold no spatial statistics' in result.stdout

# ----------------------------------------------------------------------------
# FD-DINOv2 and CLIP-FID detectors, offline.

class _Embed(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))

    def encode_image(self, x):
        return x.amax(dim=(2, 3))

def test_embedding_detectors_resize_and_normalise():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x = torch.nn.functional.interpolate(images.float() / 255, size=(224, 224), mode='bicubic', antialias=True).clamp(0, 1)
    mean, std = torch.tensor(detectors.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(detectors.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(detectors.dinov2_detector(_Embed())(images), ((x - mean) / std).mean(dim=(2, 3)))
    mean, std = torch.tensor(detectors.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(detectors.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(detectors.clip_detector(_Embed())(images), ((x - mean) / std).amax(dim=(2, 3)))
    with pytest.raises(detectors.ProbabilitiesUnavailable):
        detectors.detector_probabilities(detectors.clip_detector(_Embed()), images, 'cpu')

def _offline(*args, **kwargs):
    raise urllib.error.URLError('no network')

def test_dinov2_offline_error_names_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(detectors, '_hub_dinov2', _offline)
    with pytest.raises(OSError) as info:
        detectors.load_detector('dinov2', 'cpu')
    message = str(info.value)
    assert detectors.DINOV2_WEIGHTS_URL in message and str(tmp_path / 'hub' / 'checkpoints' / 'dinov2_vitl14_pretrain.pth') in message
    assert str(tmp_path / 'hub' / 'facebookresearch_dinov2_main') in message

def test_clip_needs_open_clip_and_names_the_file_offline(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setitem(sys.modules, 'open_clip', None)
    with pytest.raises(ImportError, match='pip install open_clip_torch'):
        detectors.load_detector('clip', 'cpu')
    monkeypatch.setitem(sys.modules, 'open_clip', types.ModuleType('open_clip'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', _offline)
    with pytest.raises(OSError) as info:
        detectors.load_detector('clip', 'cpu')
    assert detectors.CLIP_WEIGHTS_URL in str(info.value) and os.path.join(cache_dir, 'clip', 'ViT-L-14.pt') in str(info.value)
    # A file that is not a TorchScript archive is refused before open_clip would unpickle it.
    path = os.path.join(cache_dir, 'clip', 'ViT-L-14.pt')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'weights': torch.zeros(1)}, path)
    with pytest.raises(ValueError, match='not OpenAI'):
        detectors.load_detector('clip', 'cpu')
    # Any other TorchScript file is refused too (open_clip would run its code): the file is pinned by SHA-256.
    _script(_Embed(), path)
    with pytest.raises(ValueError, match='SHA-256'):
        metrics.load_detector('clip', 'cpu')
    # With the official file in place (here: the pin moved to this file), open_clip builds the model from it.
    with open(path, 'rb') as f:
        monkeypatch.setattr(detectors, 'CLIP_SHA256', hashlib.sha256(f.read()).hexdigest())
    calls = []
    sys.modules['open_clip'].load_openai_model = lambda name, precision, device: calls.append((name, precision)) or _Embed()
    detector = detectors.load_detector('clip', 'cpu')
    assert calls == [(path, 'fp32')] and detector(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape == (1, 3)

# ----------------------------------------------------------------------------
# train.py --metrics.

def test_training_metric_names():
    assert snapshot_metrics.parse_training_metrics('fid50k,fid10k,kid10k,pr10k,fid200') == [
        ('fid50k', 'fid', 50000), ('fid10k', 'fid', 10000), ('kid10k', 'kid', 10000), ('pr10k', 'pr', 10000), ('fid200', 'fid', 200)]
    with pytest.raises(ValueError, match='fid50k'):
        snapshot_metrics.parse_training_metrics('fid')
    result = CliRunner().invoke(train.main, ['--outdir', 'unused', '--metrics', 'is50k'])
    assert result.exit_code != 0 and '--metrics' in result.output

TINY = ['--batch=50', '--lr-rampup=0', '--max-channels=8', '--max-blockn=1', '--max-outputk=8', '--duration=0.002',
        '--tick=1', '--snap=1', '--dump=10', '--seed=1', '--workers=0']

def _env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', DDN_CACHE_DIR=str(tmp_path / 'cache'),
               PYTHONPATH=REPO, PYTHONWARNINGS='ignore')
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    return env

def _run(args, env, nproc=None):
    launcher = [] if nproc is None else ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    proc = subprocess.run([sys.executable, *launcher, *[str(a) for a in args]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout

def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]

def test_train_metrics_equal_fid_py_on_generated_pngs(tmp_path):
    env = _env(tmp_path)
    detector = _script(TinyDetector(), tmp_path / 'detector.pt')
    stdout = _run([os.path.join(REPO, 'train.py'), '--outdir', tmp_path / 'runs', '--desc', 'm', '--metrics', 'fid24,kid24',
                   '--detector', detector, '--trust-code', *TINY], env)
    run_dir = tmp_path / 'runs' / '00000-digits-m'
    snapshots = sorted(name for name in os.listdir(run_dir) if name.startswith('network-snapshot-') and name.endswith('.pkl'))
    lines = _jsonl(run_dir / 'metric-fid24.jsonl')
    assert [line['snapshot'] for line in lines] == snapshots and len(snapshots) == 3
    assert all(line['num'] == 24 and line['value'] == line['results']['fid'] > 0 for line in lines)
    assert [line['snapshot'] for line in _jsonl(run_dir / 'metric-kid24.jsonl')] == snapshots
    with open(run_dir / 'metric-fid24-best.json') as f:
        best = json.load(f)
    assert best['value'] == min(line['value'] for line in lines)
    assert f'best {best["value"]:.6g} at {best["snapshot"]}' in stdout
    ref = lines[0]['ref']
    assert os.path.isfile(ref) and ref.startswith(str(tmp_path / 'cache' / 'fid-refs'))
    with np.load(ref) as npz:
        assert int(npz['num']) == len(DigitsDataset())

    # The last snapshot's value is fid.py calc on generate.py's PNGs of seeds 0-23.
    outdir = tmp_path / 'samples'
    result = CliRunner().invoke(generate.main, ['--network', str(run_dir / snapshots[-1]), '--outdir', str(outdir), '--seeds', '0-23'])
    assert result.exit_code == 0, result.output
    os.remove(outdir / 'grid.png')      # Only the samples (generate.py's outdir also holds its grid).
    result = CliRunner().invoke(fid.cli, ['calc', '--images', str(outdir), '--ref', ref, '-n', '24', '--metrics', 'fid,kid',
                                          '--detector', detector, '--trust-code', '--workers', '0'])
    assert result.exit_code == 0, result.output
    printed = _metric_lines(result.stdout)
    assert float(printed['fid']) == pytest.approx(lines[-1]['value'], rel=1e-5)
    assert float(printed['kid']) == pytest.approx(_jsonl(run_dir / 'metric-kid24.jsonl')[-1]['results']['kid'], rel=1e-5, abs=1e-9)

    # Another run on the same data with the same detector finds the cached reference statistics.
    with open(run_dir / 'training_options.json') as f:
        dataset_kwargs = json.load(f)['dataset_kwargs']
    written = os.stat(ref).st_mtime_ns
    path, cached = snapshot_metrics.training_reference(dataset_kwargs, detectors.load_detector(detector, 'cpu', trust_pickle=True), detector, 'cpu',
                                              cache_dir=str(tmp_path / 'cache' / 'fid-refs'))
    assert path == ref and cached['mu'].shape == (16,) and os.stat(ref).st_mtime_ns == written

def test_train_metrics_two_processes_match_one(tmp_path):
    env = _env(tmp_path)
    detector = _script(TinyDetector(), tmp_path / 'detector.pt')
    _run([os.path.join(REPO, 'train.py'), '--outdir', tmp_path / 'runs', '--desc', 'ddp', '--metrics', 'fid25',
          '--detector', detector, '--trust-code', *TINY, '--duration=0.001'], env, nproc=2)
    run_dir = tmp_path / 'runs' / '00000-digits-ddp'
    lines = _jsonl(run_dir / 'metric-fid25.jsonl')
    assert len(lines) == 2
    # One process, the same snapshot and reference: the same number (25 seeds split unevenly over 2 ranks).
    with open(run_dir / lines[-1]['snapshot'], 'rb') as f:
        net = pickle.load(f)['ema']
    expected = metrics.calc_metrics(image_sources.generator_batches(net, range(25), batch=7), lines[-1]['ref'], ['fid'],
                                    detector=detectors.load_detector(detector, 'cpu', trust_pickle=True), device='cpu')
    assert lines[-1]['value'] == pytest.approx(expected['fid'], rel=1e-6)
