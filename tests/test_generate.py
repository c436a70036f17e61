"""Tests for generate.py: per-seed determinism (batch size, 1 vs 2 processes), latents that decode to
the same images, reconstruction, FID streamed from generation, run folders, seed lists, clear errors.

A tiny DDN (8x8 grayscale, L=7, K=8) is trained for a few steps on the built-in digits and saved as
a snapshot pickle, so every test runs on the CPU in seconds.
"""

import json
import os
import pickle
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import fid
from evaluation import detectors
from evaluation import metrics as metrics_lib
import generate
from dnnlib.util import format_int_list, parse_int_list
from training.dataset import DigitsDataset
from torch_utils import checkpoint
from training.networks import DDNGenerator

# The stand-in detector is TorchScript on purpose (the Inception pickle is one); PyTorch warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:DeprecationWarning')

# ----------------------------------------------------------------------------
# Fixtures: a tiny trained network in a run folder, and one reference generation from it.

# A tiny untrained DDN (an older snapshot beside the trained one in the run folder).
def _untrained_net(seed):
    torch.manual_seed(seed)
    return DDNGenerator(8, 1, max_outputk=8, max_blockn=2, max_channels=32).eval()

# Write a snapshot the way the training loop does: a pickle of dict(ema=...).
def _save_snapshot(net, path):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net), f)
    return str(path)

# One thread: on a busy 2-core machine, two threads contending with other jobs make these tiny nets
# 30x slower. (Subprocesses keep the default, so results are also compared across thread counts.)
@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope='module')
def run_dir(tiny_net, tmp_path_factory):
    folder = tmp_path_factory.mktemp('run')
    _save_snapshot(_untrained_net(seed=1), folder / 'network-snapshot-000000.pkl')       # Older, untrained.
    _save_snapshot(tiny_net, folder / 'network-snapshot-000010.pkl')                     # Latest: conftest's tiny net.
    (folder / 'network-snapshot-000020.pkl.tmp-123').write_bytes(b'interrupted save')     # Never picked.
    return folder

@pytest.fixture(scope='module')
def snapshot(run_dir):
    return str(run_dir / 'network-snapshot-000010.pkl')

# Seeds 0-9 generated one at a time: the reference every other generation must match.
@pytest.fixture(scope='module')
def reference(snapshot, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('reference')
    _generate(['--network', snapshot, '--outdir', outdir, '--seeds', '0-9', '--batch', '1'])
    return outdir

# Run generate.py in this process; returns the click result after checking it succeeded.
def _generate(args, ok=True):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result

# Run generate.py in a fresh interpreter, or under torchrun with `nproc` gloo processes on the CPU.
def _generate_subprocess(args, nproc=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONWARNINGS='ignore')
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    launcher = [] if nproc is None else ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    proc = subprocess.run([sys.executable, *launcher, os.path.join(REPO, 'generate.py'), *[str(a) for a in args]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout

# {file name: bytes} of the PNG images of a folder (the grid excluded).
def _pngs(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
            if name.endswith('.png') and name != 'grid.png'}

# uint8 CHW array of one PNG.
def _read_png(path):
    image = np.asarray(PIL.Image.open(path))
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)

def _latents(folder):
    with np.load(folder / 'latents.npz') as npz:
        return {key: npz[key] for key in npz.files}

# ----------------------------------------------------------------------------
# Seed lists.

def test_parse_int_list():
    assert parse_int_list('1,5,9-12') == [1, 5, 9, 10, 11, 12]
    assert parse_int_list('7') == [7]
    assert parse_int_list('0-2, 1, 3') == [0, 1, 2, 3]    # Duplicates dropped, order kept.
    for bad in ['3-1', 'a', '-1', '1,,2', '1.5']:
        with pytest.raises(ValueError):
            parse_int_list(bad)
    for values in ([0, 1, 2, 3, 7], [5], [9, 3, 4, 5, 1], []):
        assert parse_int_list(format_int_list(values) or '0')[:len(values)] == values
    assert format_int_list([0, 1, 2, 3, 7, 9, 10]) == '0-3,7,9-10'
    result = _generate(['--network', 'x.pkl', '--outdir', 'o', '--seeds', '5-2'], ok=False)
    assert result.exit_code != 0 and 'Empty range' in result.output

# ----------------------------------------------------------------------------
# Determinism: the image of a seed does not depend on the batch size or the number of processes.

def test_outputs(reference, snapshot):
    pngs = _pngs(reference)
    assert sorted(pngs) == [f'{seed:06d}.png' for seed in range(10)]
    assert PIL.Image.open(reference / '000003.png').mode == 'L'
    assert PIL.Image.open(reference / 'grid.png').size == (4 * 32, 3 * 32)     # 10 images, 8x8 upscaled 4x.
    latents = _latents(reference)
    net = pickle.load(open(snapshot, 'rb'))['ema']
    assert latents['seeds'].tolist() == list(range(10))
    assert latents['codes'].shape == (10, net.num_layers) and latents['ks'].tolist() == net.ks
    assert latents['codes'].dtype.kind == 'i' and (latents['codes'] < np.array(net.ks)).all()
    # The latents are the per-seed codes of the network.
    np.testing.assert_array_equal(latents['codes'], net.sample_codes(range(10)).numpy())
    assert sorted(latents) == ['codes', 'ks', 'network', 'seeds']                     # No condition: an unconditional net.
    # The options of the run, next to the outputs.
    with open(reference / 'generation_options.json') as f:
        options = json.load(f)
    assert options['mode'] == 'sample' and options['seeds'] == '0-9' and options['num'] == 10 and options['batch'] == 1
    assert options['guide'] is None and options['condition'] is None and options['network'] == snapshot

def test_batch_size_invariance(reference, snapshot, tmp_path):
    _generate(['--network', snapshot, '--outdir', tmp_path, '--seeds', '0-9', '--batch', '7'])
    assert _pngs(tmp_path) == _pngs(reference)
    np.testing.assert_array_equal(_latents(tmp_path)['codes'], _latents(reference)['codes'])

# --exact=False (the fastest kernels): the same codes per seed, every pixel within one grey level.
def test_fast_mode_same_codes_within_one_grey_level(reference, snapshot, tmp_path):
    _generate(['--network', snapshot, '--outdir', tmp_path, '--seeds', '0-9', '--batch', '7', '--exact', 'False'])
    np.testing.assert_array_equal(_latents(tmp_path)['codes'], _latents(reference)['codes'])
    for name in _pngs(reference):
        diff = _read_png(tmp_path / name).astype(int) - _read_png(reference / name).astype(int)
        assert np.abs(diff).max() <= 1, name
    with open(tmp_path / 'generation_options.json') as f:
        assert json.load(f)['exact'] is False

def test_two_processes(reference, snapshot, tmp_path):
    # Seeds given out of order: the latents come back sorted by seed.
    _generate_subprocess(['--network', snapshot, '--outdir', tmp_path, '--seeds', '5-9,0-4', '--batch', '2'], nproc=2)
    assert _pngs(tmp_path) == _pngs(reference)
    latents, ref = _latents(tmp_path), _latents(reference)
    np.testing.assert_array_equal(latents['seeds'], ref['seeds'])
    np.testing.assert_array_equal(latents['codes'], ref['codes'])

def test_outdir_check_ignores_another_ranks_write_probe(tmp_path):
    # Under torchrun every rank checks --outdir at once; one rank's write probe (a race CI hit) is not
    # an earlier run's file, but any other file is.
    (tmp_path / (checkpoint.WRITE_TEST_PREFIX + 'abc123')).write_bytes(b'')
    assert generate.check_outdir(str(tmp_path), False) == set()
    (tmp_path / 'seed0000.png').write_bytes(b'')
    with pytest.raises(click.UsageError, match='is not empty'):
        generate.check_outdir(str(tmp_path), False)

def test_subdirs(snapshot, tmp_path):
    _generate(['--network', snapshot, '--outdir', tmp_path, '--seeds', '998-1001', '--subdirs'])
    assert sorted(os.listdir(tmp_path / '000000')) == ['000998.png', '000999.png']
    assert sorted(os.listdir(tmp_path / '001000')) == ['001000.png', '001001.png']

# ----------------------------------------------------------------------------
# Latents: decoding the saved codes gives the generated images exactly.

def test_decode_latents(reference, snapshot, tmp_path):
    _generate(['--network', snapshot, '--outdir', tmp_path, '--codes', reference / 'latents.npz', '--batch', '3'])
    assert _pngs(tmp_path) == _pngs(reference)

# ----------------------------------------------------------------------------
# Reconstruction: L2-guided encoding gets closer to the data than random samples, and its latents decode to it.

def test_reconstruct(reference, snapshot, tmp_path):
    num = 10
    result = _generate(['--network', snapshot, '--outdir', tmp_path / 'rec', '--reconstruct', 'digits', '--max-images', num])
    with open(tmp_path / 'rec' / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['num'] == num and metrics['pixel_range'] == 'uint8 [0, 255]'
    assert f'psnr={metrics["psnr"]:g}' in result.output

    # The reported MSE is the [0, 255] MSE of the saved reconstructions against the data.
    data = np.stack([DigitsDataset(resolution=8)[i][0] for i in range(num)]).astype(np.float64)
    recon = np.stack([_read_png(tmp_path / 'rec' / f'{i:06d}.png') for i in range(num)]).astype(np.float64)
    assert metrics['mse'] == pytest.approx(np.mean((recon - data) ** 2), rel=1e-9)
    # The reported PSNR is the mean of the per-image PSNRs (compress.py prints the same figure).
    per_image = 10 * np.log10(255 ** 2 / np.mean((recon - data) ** 2, axis=(1, 2, 3)))
    assert metrics['psnr'] == pytest.approx(np.mean(per_image[np.isfinite(per_image)]), rel=1e-9)
    assert metrics['psnr_exact_images'] == int(np.sum(~np.isfinite(per_image)))
    # Random samples (seed i against image i) are much farther from the data.
    samples = np.stack([_read_png(reference / f'{i:06d}.png') for i in range(num)]).astype(np.float64)
    sample_mse = np.mean((samples - data) ** 2)
    assert metrics['mse'] < 0.7 * sample_mse, (metrics['mse'], sample_mse)

    # Grid: originals | reconstructions, side by side.
    grid = PIL.Image.open(tmp_path / 'rec' / 'grid.png')
    assert grid.mode == 'L' and grid.size[1] == 3 * 32 and grid.size[0] > 2 * 4 * 32
    latents = _latents(tmp_path / 'rec')
    assert latents['indices'].tolist() == list(range(num))
    _generate(['--network', snapshot, '--outdir', tmp_path / 'dec', '--codes', tmp_path / 'rec' / 'latents.npz'])
    assert _pngs(tmp_path / 'dec') == _pngs(tmp_path / 'rec')

# ----------------------------------------------------------------------------
# FID streamed from generation, with a tiny detector and a reference made by `fid.py ref`.

# Inception stand-in: uint8 NCHW in, (N, 8) features, or (N, 5) class probabilities; float64 throughout.
class TinyDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer('proj', torch.randn(3 * 4 * 4, 8, generator=generator, dtype=torch.float64))
        self.register_buffer('head', torch.randn(8, 5, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        features = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 4).flatten(1) @ self.proj
        if return_features:
            return features
        return torch.softmax(features @ self.head, dim=1)

def test_fid_ref(snapshot, reference, tmp_path):
    detector = str(tmp_path / 'detector.pt')
    torch.jit.save(torch.jit.script(TinyDetector()), detector)
    data = tmp_path / 'data'
    data.mkdir()
    digits = DigitsDataset(resolution=8)
    for i in range(40):
        PIL.Image.fromarray(digits[i][0][0], 'L').save(data / f'{i:06d}.png')
    ref = str(tmp_path / 'ref.npz')
    result = CliRunner().invoke(fid.cli, ['ref', '--data', str(data), '--dest', ref, '--features', '0',
        '--detector', detector, '--trust-code', '--workers', '0'])
    assert result.exit_code == 0, result.output

    outdir = tmp_path / 'out'
    stdout = _generate_subprocess(['--network', snapshot, '--outdir', outdir, '--seeds', '0-11', '--batch', '5',
        '--fid-ref', ref, '--detector', detector, '--trust-code'])
    assert stdout.strip().splitlines()[-1].startswith('fid=')
    with open(outdir / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['num'] == 12 and np.isfinite(metrics['fid']) and metrics['fid'] > 0 and 'is' in metrics
    assert stdout.strip().splitlines()[-1] == f'fid={metrics["fid"]:g}'
    assert not [name for name in os.listdir(outdir) if name.startswith('.tmp')]
    # A fresh process with its default thread count draws the same images as this one-thread process.
    assert {name: data for name, data in _pngs(outdir).items() if name in _pngs(reference)} == _pngs(reference)

    # The same numbers as measuring the written PNGs afterwards.
    images = torch.from_numpy(np.stack([_read_png(outdir / f'{i:06d}.png') for i in range(12)]))
    expected = metrics_lib.calc_metrics([images], ref, metrics=('fid', 'is'), detector=detectors.load_detector(detector, 'cpu', trust_pickle=True),
        device='cpu')
    assert metrics['fid'] == pytest.approx(expected['fid'], rel=1e-6)
    assert metrics['is'] == pytest.approx(expected['is'], rel=1e-6)

# ----------------------------------------------------------------------------
# Run folders and errors.

def test_run_dir_picks_latest(run_dir, reference, tmp_path):
    result = _generate(['--network', run_dir, '--outdir', tmp_path / 'latest', '--seeds', '0-9'])
    assert 'network-snapshot-000010.pkl' in result.output
    assert _pngs(tmp_path / 'latest') == _pngs(reference)
    _generate(['--network', run_dir / 'network-snapshot-000000.pkl', '--outdir', tmp_path / 'old', '--seeds', '0-9'])
    assert _pngs(tmp_path / 'old') != _pngs(reference)

def test_errors(run_dir, snapshot, reference, tmp_path):
    def fails(args, message):
        result = _generate(args, ok=False)
        assert result.exit_code != 0 and message in result.output, result.output
    out = ['--outdir', tmp_path / 'out']
    fails(['--network', tmp_path / 'missing.pkl', *out], 'Network not found')
    fails(['--network', tmp_path, *out], 'No network-snapshot-*.safetensors or .pkl in run folder')
    (tmp_path / 'junk.pkl').write_bytes(b'not a pickle')
    fails(['--network', tmp_path / 'junk.pkl', *out], 'is not a network file')
    fails(['--network', snapshot, '--class', '3', *out], 'unconditional')
    fails(['--network', snapshot, '--reconstruct', tmp_path / 'nowhere', *out], 'cannot open the dataset')
    (tmp_path / 'empty').mkdir()
    fails(['--network', snapshot, '--reconstruct', tmp_path / 'empty', *out], 'cannot open the dataset')
    fails(['--network', snapshot, '--codes', tmp_path / 'none.npz', *out], 'Codes file not found')
    fails(['--network', snapshot, '--codes', reference / 'latents.npz', '--seeds', '1', *out], '--seeds')
    fails(['--network', snapshot, '--seeds', '0-3', '--fid-ref', tmp_path / 'none.npz', *out], 'not found')

    # Codes that do not fit the network: wrong L, wrong K, a code out of range.
    latents = _latents(reference)
    L = latents['codes'].shape[1]
    bad = tmp_path / 'bad.npz'
    np.savez(bad, seeds=latents['seeds'], codes=latents['codes'][:, :L - 1], ks=latents['ks'][:L - 1])
    fails(['--network', snapshot, '--codes', bad, *out], f'L={L - 1} layers, but the network has L={L}')
    np.savez(bad, seeds=latents['seeds'], codes=latents['codes'], ks=latents['ks'] * 2)
    ks = latents['ks'].tolist()
    fails(['--network', snapshot, '--codes', bad, *out], f'at layer 0, but the network has K={ks[0]}')
    codes = latents['codes'].copy()
    codes[4, 2] = ks[2]
    np.savez(bad, seeds=latents['seeds'], codes=codes, ks=latents['ks'])
    fails(['--network', snapshot, '--codes', bad, *out], f'row 4 has code {ks[2]} at layer 2')
    (tmp_path / 'text.npz').write_text('hello')
    fails(['--network', snapshot, '--codes', tmp_path / 'text.npz', *out], 'Cannot read codes file')

# ----------------------------------------------------------------------------
