"""Tests for fid.py: metric formulas against independent computations, detector formats, the
`ref` -> `calc` command line on PNG files, clear errors, and a 2-process gloo run of `fid.py ref`.

A tiny detector defined here stands in for Inception-v3, so everything runs on the CPU in seconds.
"""

import io
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import scipy.linalg
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import fid
from evaluation import detectors, feature_metrics, image_sources, metrics

# The stand-in detectors are TorchScript on purpose (the Inception pickle is one); PyTorch now warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:DeprecationWarning')

# ----------------------------------------------------------------------------
# Stand-in detectors.

# A small Inception stand-in: uint8 NCHW in, (N, 16) features, or (N, 10) class probabilities for IS.
# It computes in float64 so that results do not depend on batch composition or thread count, which lets
# the multi-process test compare statistics tightly.
class TinyDetector(torch.nn.Module):
    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer('proj', torch.randn(3 * 4 * 4, dim, generator=generator, dtype=torch.float64))
        self.register_buffer('head', torch.randn(dim, classes, generator=generator, dtype=torch.float64))

    # Average-pool to 4x4 so any resolution works, then a fixed random projection.
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 4).flatten(1)
        features = pooled @ self.proj
        if return_features:
            return features
        return torch.softmax(features @ self.head, dim=1)

# A detector with features only: asked for probabilities it returns features again, which are no probabilities.
class FeaturesOnlyDetector(TinyDetector):
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 4).flatten(1) @ self.proj

# A detector with StyleGAN3's no_output_bias switch; here it makes the probabilities uniform, to be recognisable.
class OutputBiasDetector(TinyDetector):
    def forward(self, x: torch.Tensor, return_features: bool = True, no_output_bias: bool = False) -> torch.Tensor:
        features = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 4).flatten(1) @ self.proj
        if return_features:
            return features
        if no_output_bias:
            return torch.full((x.shape[0], 10), 0.1, dtype=torch.float64)
        return torch.softmax(features @ self.head, dim=1)

# StyleGAN3's inception-2015-12-05.pkl is built like this: a pickle whose only global rebuilds the
# TorchScript archive carried as bytes (plain pickle.load returns the scripted module).
class _TorchScriptInPickle:
    def __init__(self, module):
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(module), buffer)
        self.data = buffer.getvalue()

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))

# Save `module` as TorchScript, a StyleGAN3-style pickle, a plain pickle of the Python module or a torch.save file.
def _save_detector(module, path, kind):
    if kind == 'script':
        torch.jit.save(torch.jit.script(module), path)
    elif kind in ('pickle', 'python_pickle'):
        with open(path, 'wb') as f:
            pickle.dump(_TorchScriptInPickle(module) if kind == 'pickle' else module, f)
    else:
        torch.save(module, path)
    return str(path)

# Write `count` 16x16 RGB (or grayscale) PNGs of uniform noise in [low, high] into a new folder.
def _write_pngs(folder, count, low, high, seed, channels=3):
    os.makedirs(folder)
    rng = np.random.RandomState(seed)
    for i in range(count):
        pixels = rng.randint(low, high + 1, size=(16, 16, channels)).astype(np.uint8)
        Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(os.path.join(folder, f'img{i:04d}.png'))
    return str(folder)

# A localhost port with nothing listening on it (bound, then released).
def _closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

# The `name=value` metric lines of a CLI run, as a dict of floats.
def _metric_lines(output):
    lines = [line for line in output.splitlines() if '=' in line and ' ' not in line]
    return {name: float(value) for name, value in (line.split('=', 1) for line in lines) if value != 'unavailable'}

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / 'cache'
    monkeypatch.setenv('DDN_CACHE_DIR', str(path))
    return str(path)

# ----------------------------------------------------------------------------
# Metric formulas.

def test_fid_of_stats_with_themselves_is_zero():
    features = np.random.RandomState(0).standard_normal((3000, 32)) @ np.random.RandomState(1).standard_normal((32, 32))
    mu, sigma = feature_metrics.compute_stats(features)
    np.testing.assert_allclose(mu, features.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False))
    assert abs(feature_metrics.calculate_fid(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)

def test_fid_matches_analytic_diagonal_gaussians():
    rng = np.random.RandomState(2)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    s1, s2 = rng.uniform(0.1, 3.0, 64), rng.uniform(0.1, 3.0, 64)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert feature_metrics.calculate_fid(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)

def test_fid_matches_sqrtm_for_full_covariances():
    rng = np.random.RandomState(3)
    a, b = rng.standard_normal((48, 48)), rng.standard_normal((48, 48))
    s1, s2 = a @ a.T / 48 + 0.1 * np.eye(48), b @ b.T / 48 + 0.1 * np.eye(48)
    mu1, mu2 = rng.standard_normal(48), rng.standard_normal(48)
    # The textbook formula with scipy's general matrix square root (the route of the reference code).
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert feature_metrics.calculate_fid(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # Singular covariances (fewer samples than dimensions) give a finite value, the same as sqrtm's.
    f1, f2 = rng.standard_normal((20, 48)), rng.standard_normal((30, 48)) + 0.5
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    m1, m2 = f1.mean(0), f2.mean(0)
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
    assert feature_metrics.calculate_fid(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-6)

def test_compute_stats_of_samples_approaches_the_true_gaussian():
    rng = np.random.RandomState(4)
    scale = rng.uniform(0.5, 2.0, 8)
    samples = rng.standard_normal((200000, 8)) * scale + 3.0
    mu, sigma = feature_metrics.compute_stats(torch.from_numpy(samples))
    assert feature_metrics.calculate_fid(mu, sigma, np.full(8, 3.0), np.diag(scale ** 2)) < 1e-3

def test_inception_score_uniform_is_one():
    score, std = feature_metrics.inception_score(np.full((1000, 10), 0.1))
    assert score == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)

def test_inception_score_confident_diverse_is_number_of_classes():
    probs = np.eye(10)[np.arange(1000) % 10]
    score, _std = feature_metrics.inception_score(probs)
    assert score == pytest.approx(10.0, rel=1e-9)
    # Slightly less confident predictions score a little lower, but still near the number of classes.
    soft, _std = feature_metrics.inception_score(0.95 * probs + 0.005)
    assert 7.0 < soft < 10.0

def test_precision_recall_of_a_set_with_itself_is_one():
    real = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    assert feature_metrics.precision_recall(real, real, k=3, batch=64) == (1.0, 1.0)

def test_precision_recall_of_far_away_set_is_zero():
    generator = torch.Generator().manual_seed(1)
    real, far = torch.randn(300, 8, generator=generator), torch.randn(300, 8, generator=generator) + 100
    assert feature_metrics.precision_recall(real, far, k=3, batch=64) == (0.0, 0.0)

def test_precision_recall_of_half_covered_set():
    generator = torch.Generator().manual_seed(2)
    real = torch.randn(1000, 4, generator=generator)
    gen = torch.cat([torch.randn(500, 4, generator=generator), torch.randn(500, 4, generator=generator) + 100])
    precision, recall = feature_metrics.precision_recall(real, gen, k=3, batch=128)
    # Half the generated samples are on the real manifold; the real set is covered by the other half.
    assert 0.4 < precision < 0.6 and recall > 0.8

# ----------------------------------------------------------------------------
# Detector loading and feature extraction.

@pytest.mark.parametrize('kind', ['script', 'pickle', 'python_pickle', 'torch_save'])
def test_load_detector_formats_give_the_same_features(tmp_path, kind):
    path = _save_detector(TinyDetector(), tmp_path / f'detector-{kind}.pkl', kind)
    # Every format of a detector that is not the Inception runs code (TorchScript too): only when trusted.
    with pytest.raises(detectors.UntrustedDetectorError, match='trust_pickle=True'):
        detectors.load_detector(path, 'cpu')
    detector = detectors.load_detector(path, 'cpu', trust_pickle=True)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = detectors.detector_features(detector, images, 'cpu')
    torch.testing.assert_close(features, TinyDetector()(images))

def test_compute_features_accepts_in_memory_batches_and_grayscale():
    detector = TinyDetector()
    gray = torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    # Batches larger than `batch` are split; grayscale is repeated to 3 channels.
    chunks = list(image_sources.compute_features(iter([gray[:7], gray[7:]]), detector, batch=4, device='cpu', progress=False))
    assert [c.shape[0] for c in chunks] == [4, 3, 3]
    torch.testing.assert_close(torch.cat(chunks), detector(gray.repeat(1, 3, 1, 1)))

@pytest.mark.parametrize('scripted', [False, True])
def test_probabilities_use_no_output_bias_when_the_detector_has_it(scripted):
    detector = torch.jit.script(OutputBiasDetector()) if scripted else OutputBiasDetector()
    images = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    torch.testing.assert_close(detectors.detector_probabilities(detector, images, 'cpu'), torch.full((3, 10), 0.1, dtype=torch.float64))

def test_calc_metrics_on_in_memory_batches_as_generate_py_does():
    detector = TinyDetector()
    images = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mu, sigma = feature_metrics.compute_stats(detector(images))
    ref = {'mu': mu, 'sigma': sigma, 'features': detector(images).numpy()}
    results = metrics.calc_metrics(iter(images.split(25)), ref, metrics='fid,is,pr', detector=detector, device='cpu', progress=False)
    assert results['num'] == 60 and abs(results['fid']) < 1e-6 and (results['precision'], results['recall']) == (1.0, 1.0)
    with pytest.raises(ValueError, match='iterable of batches'):
        metrics.calc_metrics(iter(images.split(25)), ref, num=10, detector=detector, device='cpu')

def test_probabilities_unavailable_is_explained():
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    assert detectors.detector_probabilities(TinyDetector(), images, 'cpu').shape == (2, 10)
    with pytest.raises(detectors.ProbabilitiesUnavailable, match='not a probability distribution'):
        detectors.detector_probabilities(FeaturesOnlyDetector(), images, 'cpu')

def test_offline_detector_url_names_the_cache_file(tmp_path):
    url = f'http://127.0.0.1:{_closed_port()}/x.pkl'
    with pytest.raises(OSError) as info:
        detectors.load_detector(url, 'cpu', cache_dir=str(tmp_path / 'cache'))
    message = str(info.value)
    assert url in message and str(tmp_path / 'cache') in message and 'detector_url=PATH' in message

# ----------------------------------------------------------------------------
# Command line: ref -> calc on PNG folders.

@pytest.fixture
def image_sets(tmp_path):
    return {
        'a': _write_pngs(tmp_path / 'a', 40, 0, 255, seed=0),
        'a2': _write_pngs(tmp_path / 'a2', 40, 0, 255, seed=1),
        'bright': _write_pngs(tmp_path / 'bright', 40, 150, 255, seed=2),
        'gray': _write_pngs(tmp_path / 'gray', 40, 0, 255, seed=3, channels=1),
    }

@pytest.mark.parametrize('kind', ['script', 'pickle'])
def test_cli_ref_then_calc(tmp_path, image_sets, cache_dir, kind):
    detector = _save_detector(TinyDetector(), tmp_path / 'detector.pkl', kind)
    runner = CliRunner()
    ref_path = str(tmp_path / 'refs' / 'a.npz')
    result = runner.invoke(fid.cli, ['ref', '--data', image_sets['a'], '--dest', ref_path, '--batch', '16',
        '--detector', detector, '--trust-code', '--workers', '0'])
    assert result.exit_code == 0, result.output
    with np.load(ref_path) as ref:
        assert ref['mu'].shape == (16,) and ref['mu'].dtype == np.float64
        assert ref['sigma'].shape == (16, 16) and ref['sigma'].dtype == np.float64
        assert ref['features'].shape == (40, 16) and int(ref['num']) == 40

    # calc prints its metrics last, one name=value per line.
    def calc(images, *extra):
        result = runner.invoke(fid.cli, ['calc', '--images', images, '--ref', ref_path, '--num', '40', '--batch', '16',
            '--detector', detector, '--trust-code', '--workers', '0', *extra])
        assert result.exit_code == 0, result.output
        return result

    same = calc(image_sets['a'])
    assert same.stdout.splitlines()[-1].startswith('fid=')
    assert abs(_metric_lines(same.stdout)['fid']) < 1e-6
    other = _metric_lines(calc(image_sets['bright']).stdout)['fid']
    assert other > 1.0

    out = str(tmp_path / 'results' / 'metrics.json')
    full = calc(image_sets['a2'], '--metrics', 'fid,is,pr', '--out', out)
    printed = _metric_lines(full.stdout)
    with open(out) as f:
        saved = json.load(f)
    assert set(printed) == {'fid', 'is', 'is_std', 'precision', 'recall'}
    assert saved['fid'] == pytest.approx(printed['fid'], rel=1e-5) and saved['num'] == 40
    # Another draw of the same noise: close to the reference, unlike the bright set.
    assert 0 < printed['fid'] < other
    assert 1.0 <= printed['is'] <= 10.0 and 0.0 <= printed['precision'] <= 1.0 and 0.0 <= printed['recall'] <= 1.0

def test_cli_random_subset_and_grayscale(tmp_path, image_sets, cache_dir):
    detector = _save_detector(TinyDetector(), tmp_path / 'detector.pt', 'script')
    ref_path = str(tmp_path / 'gray.npz')
    runner = CliRunner()
    assert runner.invoke(fid.cli, ['ref', '--data', image_sets['gray'], '--dest', ref_path, '--detector', detector, '--trust-code',
        '--workers', '0']).exit_code == 0
    # A 30-image subset chosen by seed: the same seed gives the same FID, another seed another one.
    fids = []
    for seed in ('0', '0', '1'):
        result = runner.invoke(fid.cli, ['calc', '--images', image_sets['gray'], '--ref', ref_path, '--num', '30',
            '--seed', seed, '--detector', detector, '--trust-code', '--workers', '2'])
        assert result.exit_code == 0, result.output
        fids.append(_metric_lines(result.stdout)['fid'])
    assert fids[0] == fids[1] != fids[2] and fids[0] > 0

def test_cli_is_unavailable_without_probabilities(tmp_path, image_sets, cache_dir):
    detector = _save_detector(FeaturesOnlyDetector(), tmp_path / 'features-only.pt', 'script')
    out = str(tmp_path / 'metrics.json')
    result = CliRunner().invoke(fid.cli, ['calc', '--images', image_sets['a'], '--num', '40', '--metrics', 'is',
        '--detector', detector, '--trust-code', '--workers', '0', '--out', out])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == 'is=unavailable'
    assert 'not a probability distribution' in result.stdout
    with open(out) as f:
        saved = json.load(f)
    assert 'is' not in saved and 'not a probability distribution' in saved['unavailable']['is']

# ----------------------------------------------------------------------------
# Clear errors from the command line.

def test_cli_error_offline_detector(tmp_path, image_sets, cache_dir):
    url = f'http://127.0.0.1:{_closed_port()}/x.pkl'
    result = CliRunner().invoke(fid.cli, ['ref', '--data', image_sets['a'], '--dest', str(tmp_path / 'r.npz'),
        '--detector', url, '--workers', '0'])
    assert result.exit_code != 0
    assert url in result.output and cache_dir in result.output and '--detector PATH' in result.output
    assert not os.path.exists(tmp_path / 'r.npz')

def test_cli_error_dimension_mismatch(tmp_path, image_sets, cache_dir):
    detector = _save_detector(TinyDetector(), tmp_path / 'detector.pt', 'script')
    ref_path = str(tmp_path / 'edm-like.npz')
    np.savez(ref_path, mu=np.zeros(7), sigma=np.eye(7))
    result = CliRunner().invoke(fid.cli, ['calc', '--images', image_sets['a'], '--ref', ref_path, '--num', '40',
        '--detector', detector, '--trust-code', '--workers', '0'])
    assert result.exit_code != 0
    assert ref_path in result.output and 'dimension 7' in result.output and '16-dimensional' in result.output

def test_cli_error_num_too_large(tmp_path, image_sets, cache_dir):
    detector = _save_detector(TinyDetector(), tmp_path / 'detector.pt', 'script')
    result = CliRunner().invoke(fid.cli, ['calc', '--images', image_sets['a'], '--metrics', 'is', '--num', '1000',
        '--detector', detector, '--trust-code', '--workers', '0'])
    assert result.exit_code != 0
    assert 'Asked for 1000 images' in result.output and 'only 40' in result.output

def test_cli_error_pr_needs_reference_features(tmp_path, image_sets, cache_dir):
    detector = _save_detector(TinyDetector(), tmp_path / 'detector.pt', 'script')
    ref_path = str(tmp_path / 'no-features.npz')
    assert CliRunner().invoke(fid.cli, ['ref', '--data', image_sets['a'], '--dest', ref_path, '--features', '0',
        '--detector', detector, '--trust-code', '--workers', '0']).exit_code == 0
    result = CliRunner().invoke(fid.cli, ['calc', '--images', image_sets['a'], '--ref', ref_path, '--num', '40',
        '--metrics', 'fid,pr', '--detector', detector, '--trust-code', '--workers', '0'])
    assert result.exit_code != 0 and 'holds no features' in result.output

# ----------------------------------------------------------------------------
# Two gloo processes under torchrun give the results of one process.

# Run fid.py under `torchrun --standalone --nproc_per_node=2` (gloo on the CPU).
def _torchrun(args):
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
        os.path.join(REPO, 'fid.py'), *args], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout

def test_two_processes_match_one_process(tmp_path, cache_dir):
    images = _write_pngs(tmp_path / 'images', 41, 0, 255, seed=5)
    other = _write_pngs(tmp_path / 'other', 41, 30, 255, seed=6)
    detector = _save_detector(TinyDetector(), tmp_path / 'detector.pt', 'script')
    single, double = str(tmp_path / 'single.npz'), str(tmp_path / 'double.npz')
    # An odd image count and batch size give the two ranks unequal shares and ragged last batches.
    common = ['--batch', '7', '--detector', detector, '--trust-code', '--workers', '0']
    result = CliRunner().invoke(fid.cli, ['ref', '--data', images, '--dest', single, *common])
    assert result.exit_code == 0, result.output
    _torchrun(['ref', '--data', images, '--dest', double, *common])
    with np.load(single) as a, np.load(double) as b:
        assert int(a['num']) == int(b['num']) == 41
        np.testing.assert_allclose(b['mu'], a['mu'], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b['sigma'], a['sigma'], rtol=1e-10, atol=1e-12)
        # The gathered features come back in the single-process order.
        np.testing.assert_array_equal(b['features'], a['features'])

    # All three metrics agree too (IS splits depend on the order of the gathered probabilities). `-n`, since
    # torchrun's parser takes `--num` for an abbreviation of its own `--numa-binding`.
    calc = ['calc', '--images', other, '--ref', single, '-n', '41', '--metrics', 'fid,is,pr', *common]
    result = CliRunner().invoke(fid.cli, calc)
    assert result.exit_code == 0, result.output
    one, two = _metric_lines(result.stdout), _metric_lines(_torchrun(calc))
    assert set(one) == set(two) == {'fid', 'is', 'is_std', 'precision', 'recall'}
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
