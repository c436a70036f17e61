"""Issue 21, classes 5, 6, 9 and 10: bounded loaders (resource bombs), damaged and hostile network
files, unwritable or full disks, and values that were never checked. Each test gives the input that
used to allocate gigabytes, hang, print a traceback or pass silently, and expects a one-line error."""

import copyreg
import errno
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import click

import cli
import dnnlib
import dataset_tool
import train
import zscg
from torch_utils import limits, safe_pickle
from training import latent, snapshot
from training.dataset import ImageFolderDataset
from training.networks import DDNGenerator

TINY = dict(img_resolution=8, img_channels=1, max_channels=8, max_blockn=1, max_outputk=4)
TRAIN_TINY = ['--batch=20', '--max-channels=8', '--max-blockn=1', '--max-outputk=4', '--lr-rampup=0', '--workers=0', '--seed=0']

def _fails(command, args, message):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert message in result.output, result.output
    return result.output

@pytest.fixture(scope='module')
def safe_file():
    torch.manual_seed(0)
    return snapshot.safe_bytes(DDNGenerator(**TINY))

def _parts(data):
    (n,) = struct.unpack('<Q', data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]

def _join(header, body, raw=None):
    raw = raw if raw is not None else json.dumps(header).encode()
    return struct.pack('<Q', len(raw)) + raw + body

def _with_kwargs(data, **changes):
    header, body = _parts(data)
    meta = json.loads(header['__metadata__']['ddn'])
    meta['init_kwargs'].update(changes)
    header['__metadata__'] = {'ddn': json.dumps(meta)}
    return _join(header, body)

# 5. Constructor arguments are checked against limits and the file's tensor shapes before anything is
# built for real: a 1e6-channel claim is refused by its bound, a plausible but wrong one by the shapes
# of the meta-device build, and nothing is allocated for either.
def test_network_arguments_checked_before_allocation(safe_file, monkeypatch):
    with pytest.raises(ValueError, match='max_channels=1000000 is beyond the limit'):
        snapshot.network_from_bytes(_with_kwargs(safe_file, max_channels=1000000), 'f.safetensors')
    with pytest.raises(ValueError, match='not finite'):
        snapshot.network_from_bytes(_with_kwargs(safe_file, max_outputk=float('nan')), 'f.safetensors')
    built = []
    real_init = DDNGenerator.__init__
    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(next(self.parameters()).device.type)
    monkeypatch.setattr(DDNGenerator, '__init__', spy)
    with pytest.raises(ValueError, match='the tensors do not fit .* of another shape'):
        snapshot.network_from_bytes(_with_kwargs(safe_file, max_channels=16), 'f.safetensors')
    assert built == ['meta']                        # Only the probe was built.
    with pytest.raises(ValueError, match='missing'):
        snapshot.network_from_bytes(_with_kwargs(safe_file, max_blockn=200), 'f.safetensors')
    built.clear()
    assert snapshot.network_from_bytes(safe_file, 'f.safetensors').ks
    assert built == ['meta', 'cpu']

# 5. The same checks for a snapshot pickle whose persistent constructor arguments were edited.
def test_pickled_network_arguments_checked(tmp_path):
    net = DDNGenerator(**TINY)
    net.init_kwargs['max_channels'] = 1000000
    snapshot.save_network_pickle(net, tmp_path / 'n.pkl')
    with pytest.raises(ValueError, match='beyond the limit'):
        snapshot.load_network(tmp_path / 'n.pkl')

# 5. The restricted unpickler never builds a container from a count: set(range(4e8)), bytearray(4e9).
class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args
    def __reduce__(self):
        return (self.fn, self.args)

@pytest.mark.parametrize('payload', [
    _Reduce(set, (_Reduce(range, (400_000_000,)),)),
    _Reduce(frozenset, (_Reduce(range, (400_000_000,)),)),
    _Reduce(bytearray, (4_000_000_000,)),
    _Reduce(copyreg._reconstructor, (bytearray, bytearray, 4_000_000_000)),
], ids=['set-range', 'frozenset-range', 'bytearray-count', 'reconstructor-count'])
def test_unpickler_refuses_inflating_containers(payload):
    for protocol in (2, 4):
        with pytest.raises(safe_pickle.UnsafePickleError, match='x.pkl: refusing'):
            safe_pickle.load(pickle.dumps(dict(a=payload), protocol=protocol), source='x.pkl')
    assert safe_pickle.load(pickle.dumps(dict(a=bytearray(b'ab'), b={1, 2}, c=frozenset('xy')))) == \
        dict(a=bytearray(b'ab'), b={1, 2}, c=frozenset('xy'))

# 6. Truncated and hostile safetensors, and JSON nested a hundred thousand levels: ValueError naming the file.
def test_damaged_safetensors(safe_file):
    header, body = _parts(safe_file)
    deep = '[' * 100000 + ']' * 100000
    shape_key = next(k for k in header if k != '__metadata__')
    cases = {
        'truncated': (safe_file[:-100], 'damaged or truncated'),
        'deep header': (_join(None, body, raw=('{"a": ' + deep + '}').encode()), 'nested too deeply'),
        'deep metadata': (_join(dict(header, __metadata__={'ddn': deep}), body), 'nested too deeply'),
        'huge shape': (_join(dict(header, **{shape_key: dict(header[shape_key], shape=[10**6, 10**6])}), body), 'damaged or truncated'),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            snapshot.network_from_bytes(data, f'{name}.safetensors')
        assert f'{name}.safetensors' in str(err.value)

# 6 and 5. dataset.json nested too deeply, inflating past its limit, or a FIFO: errors, not RecursionError or a hang.
def _pngs(folder, n=2):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        PIL.Image.new('L', (8, 8), 40 * i).save(folder / f'{i}.png')

def test_dataset_json_bounded(tmp_path):
    _pngs(tmp_path / 'deep')
    (tmp_path / 'deep' / 'dataset.json').write_text('{"labels": ' + '[' * 100000 + ']' * 100000 + '}')
    with pytest.raises(ValueError, match='nested too deeply'):
        ImageFolderDataset(str(tmp_path / 'deep'), use_labels=True)
    _fails(dataset_tool.main, ['--source', tmp_path / 'deep', '--dest', tmp_path / 'o.zip'], 'nested too deeply')
    with zipfile.ZipFile(tmp_path / 'bomb.zip', 'w', compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(2):
            z.write(tmp_path / 'deep' / f'{i}.png', f'{i}.png')
        z.writestr('dataset.json', '{"labels": [' + ' ' * 50_000_000 + ']}')
    assert os.path.getsize(tmp_path / 'bomb.zip') < 200_000
    with pytest.raises(ValueError, match='than the limit'):
        ImageFolderDataset(str(tmp_path / 'bomb.zip'), use_labels=True)
    _fails(dataset_tool.main, ['--source', tmp_path / 'bomb.zip', '--dest', tmp_path / 'o2.zip'], 'than the limit')

@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='needs FIFOs')
def test_fifos_refused_not_waited_on(tmp_path):
    _pngs(tmp_path / 'd')
    os.mkfifo(tmp_path / 'd' / 'x.png')
    with pytest.raises(ValueError, match='x.png .* is a FIFO'):
        ImageFolderDataset(str(tmp_path / 'd'))
    _fails(dataset_tool.main, ['--source', tmp_path / 'd', '--dest', tmp_path / 'o.zip'], 'is a FIFO')
    os.mkfifo(tmp_path / 'g.png')
    with pytest.raises(ValueError, match='is a FIFO'):
        limits.open_image(str(tmp_path / 'g.png'))
    os.mkfifo(tmp_path / 'l.npz')
    with pytest.raises(ValueError, match='is a FIFO'):
        latent.load_latents(str(tmp_path / 'l.npz'), [4, 4])

# 5. Images whose header claims more pixels than the limit: refused from the header, PIL's own
# warning and error turned into the same one-line error.
def _png_claiming(path, width, height):
    import zlib
    buf = io.BytesIO()
    PIL.Image.new('L', (8, 8)).save(buf, format='png')
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack('>II', width, height)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))

@pytest.mark.parametrize('side', [10000, 40000])
def test_decompression_bombs(tmp_path, side):
    _pngs(tmp_path / 'd')
    _png_claiming(tmp_path / 'd' / '9.png', side, side)
    with pytest.raises(ValueError, match='9.png .*pixels, the limit'):
        ImageFolderDataset(str(tmp_path / 'd'))
    _fails(dataset_tool.main, ['--source', tmp_path / 'd', '--dest', tmp_path / 'o.zip'], 'pixels, the limit')
    assert not (tmp_path / 'o.zip').exists() and not [n for n in os.listdir(tmp_path) if '.tmp-' in n]

# 5. latents.npz whose arrays inflate far beyond the file.
def test_latents_zip_bomb(tmp_path):
    with zipfile.ZipFile(tmp_path / 'l.npz', 'w', compression=zipfile.ZIP_DEFLATED) as z:
        buf = io.BytesIO()
        np.save(buf, np.zeros((20_000_000, 4), np.int64))
        z.writestr('codes.npy', buf.getvalue())
    with pytest.raises(ValueError, match='inflate to .* more than the limit'):
        latent.load_latents(str(tmp_path / 'l.npz'), [4] * 4)

# 10. Labels of dataset.json outside [0, 2^20) or not integers: refused by dataset_tool and the loader.
@pytest.mark.parametrize('label', [2_000_000_000, -1, 1.5, 1e30, True, 'a'])
def test_labels_checked(tmp_path, label):
    _pngs(tmp_path / 'd')
    (tmp_path / 'd' / 'dataset.json').write_text(json.dumps({'labels': [['0.png', label], ['1.png', 0]]}))
    _fails(dataset_tool.main, ['--source', tmp_path / 'd', '--dest', tmp_path / 'o.zip'], 'a label must be an integer')
    with pytest.raises(ValueError, match='a label must be an integer'):
        ImageFolderDataset(str(tmp_path / 'd'), use_labels=True)

# 10. A network whose weights are NaN is refused when loaded, not sampled into black images.
def test_nan_weights_refused(tmp_path):
    net = DDNGenerator(**TINY)
    with torch.no_grad():
        next(net.parameters()).fill_(float('nan'))
    snapshot.save_network_safe(net, tmp_path / 'n.safetensors')
    snapshot.save_network_pickle(net, tmp_path / 'n.pkl')
    for name in ('n.safetensors', 'n.pkl'):
        with pytest.raises(ValueError, match='non-finite values'):
            snapshot.load_network(tmp_path / name)

# 10. nan / inf options and seeds beyond int64: usage errors naming the option.
def test_non_finite_options_and_huge_seeds(tmp_path):
    for value in ('nan', 'inf', '-inf', '1e400'):
        _fails(train.main, [f'--outdir={tmp_path}', '--dry-run', *TRAIN_TINY, f'--lr={value}'], "'--lr'")
    _fails(train.main, [f'--outdir={tmp_path}', '--dry-run', *TRAIN_TINY, '--lr-rampup=nan'], 'not a finite number')
    _fails(train.main, [f'--outdir={tmp_path}', '--dry-run', *TRAIN_TINY, f'--seed={2**63}'], "'--seed'")
    with pytest.raises(ValueError, match='at most 9223372036854775807'):
        dnnlib.util.parse_int_list(f'1,{2**63}')
    assert dnnlib.util.parse_int_list(f'{2**63 - 1}') == [2**63 - 1]
    with pytest.raises(click.BadParameter, match='not a finite number'):
        cli.FiniteFloatRange(min=0).convert('nan', None, None)
    _fails(zscg.main, ['--network', 'x', '--seeds=0-9999999'], 'more than 256')

# 10. --transfer of another architecture fails before a run folder exists.
def test_transfer_of_another_architecture(tmp_path):
    snapshot.save_network_safe(DDNGenerator(**dict(TINY, max_channels=16)), tmp_path / 'other.safetensors')
    _fails(train.main, [f'--outdir={tmp_path / "runs"}', '--transfer', tmp_path / 'other.safetensors', '--duration=0.0001', *TRAIN_TINY],
           '--transfer')
    assert not (tmp_path / 'runs').exists() or not [n for n in os.listdir(tmp_path / 'runs') if not n.startswith('.')]

# 9. A full disk while dataset_tool writes: a one-line error, and its temporary zip removed.
def test_dataset_tool_full_disk(tmp_path, monkeypatch):
    _pngs(tmp_path / 'd', 3)
    real = zipfile.ZipFile.writestr
    def full(self, name, data, *args, **kwargs):
        if str(name).endswith('img00000001.png'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, name, data, *args, **kwargs)
    monkeypatch.setattr(zipfile.ZipFile, 'writestr', full)
    _fails(dataset_tool.main, ['--source', tmp_path / 'd', '--dest', tmp_path / 'o.zip'], 'the disk is full')
    assert sorted(os.listdir(tmp_path)) == ['d']

# 9. Outputs are checked writable before the work: a read-only folder (simulated, since root may write
# anywhere) fails at once, naming the option.
def test_outputs_checked_before_the_work(tmp_path, monkeypatch):
    import tempfile
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, 'NamedTemporaryFile', refuse)
    import fid
    _fails(fid.cli, ['ref', '--data', 'nowhere', '--dest', tmp_path / 'r.npz'], '--dest: cannot write')
    import compress
    _fails(compress.main, ['encode', '--network', 'nowhere', '--out', tmp_path / 'c.bin'], '--out: cannot write')
    import toy_2d
    _fails(toy_2d.main, ['--density=gaussian', '--steps=1', '--out', tmp_path / 'p.npy'], '--out: cannot write')

# 10. A run whose loss turns non-finite stops with an error before writing that tick's files: the
# snapshot on disk is the last good one (and loads, finite).
def test_diverging_run_stops_and_keeps_last_good_snapshot(tmp_path):
    out = _fails(train.main, [f'--outdir={tmp_path}', '--duration=0.002', '--tick=0.1', '--snap=1', '--dump=1', *TRAIN_TINY, '--lr=1e30'],
                 'Training diverged')
    assert 'the last good snapshot' in out
    run = next(p for p in tmp_path.iterdir() if not p.name.startswith('.'))
    snapshots = sorted(run.glob('network-snapshot-*.safetensors'))
    assert snapshots, sorted(p.name for p in run.iterdir())
    net = snapshot.load_network(snapshots[-1])[1]           # Refused if it held NaN.
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
