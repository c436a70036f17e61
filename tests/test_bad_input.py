"""Bad input, as a careless or unlucky user gives it: a clear error naming the file or option, no
traceback, and no existing output lost. One test per finding of the bad-input review (issue 10)."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import compress
import dataset_tool
import generate
import toy_2d
import tree
import zscg
from torch_utils import checkpoint
from evaluation import image_sources
from training import snapshot
from training.dataset import DatasetError, ImageFolderDataset
from training.networks import DDNGenerator

TINY = dict(img_resolution=8, img_channels=1, max_channels=8, max_blockn=1, max_outputk=4)

def _fails(cli, args, message):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert message in result.output, result.output
    return result.output

def _gray16(path, values):
    PIL.Image.fromarray(np.asarray(values, np.uint16)).save(path)

# 3. 16-bit PNGs keep their levels (value / 257), in dataset_tool.py and in the training loader.
def test_16_bit_pngs_are_scaled_not_white(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    levels = np.arange(64).reshape(8, 8) * 1000                       # 0 .. 63000 of 65535.
    _gray16(src / 'a.png', levels)
    expected = ((levels * 255 + 32767) // 65535).astype(np.uint8)
    image, _ = ImageFolderDataset(str(src))[0]
    assert np.array_equal(image[0], expected)
    CliRunner().invoke(dataset_tool.main, ['--source', str(src), '--dest', str(tmp_path / 'out.zip')], catch_exceptions=False)
    image, _ = ImageFolderDataset(str(tmp_path / 'out.zip'))[0]
    assert np.array_equal(image[0], expected) and image.max() < 255

# 5. An existing --dest zip is never replaced silently, and never when it is the --source.
def test_dataset_tool_keeps_existing_dest(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.new('L', (8, 8), 100).save(src / 'a.png')
    dest = tmp_path / 'd.zip'
    assert CliRunner().invoke(dataset_tool.main, ['--source', str(src), '--dest', str(dest)]).exit_code == 0
    before = dest.read_bytes()
    _fails(dataset_tool.main, ['--source', src, '--dest', dest], 'add --force')
    _fails(dataset_tool.main, ['--source', dest, '--dest', dest, '--force'], 'is the --source')
    assert dest.read_bytes() == before
    assert CliRunner().invoke(dataset_tool.main, ['--source', str(src), '--dest', str(dest), '--force']).exit_code == 0

# 10. Truncated downloads and a malformed dataset.json: a message, not "Aborted!" or a traceback.
def test_dataset_tool_truncated_sources_and_bad_json(tmp_path):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode='w:gz') as tar:
        data = os.urandom(200000)
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / 'cifar-10-python.tar.gz').write_bytes(payload.getvalue()[:5000])
    out = _fails(dataset_tool.main, ['--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'c.zip'], 'truncated')
    assert 'Aborted' not in out and not (tmp_path / 'c.zip').exists()
    gz = tmp_path / 'train-images-idx3-ubyte.gz'
    import gzip
    import struct
    idx = struct.pack('>IIII', 0x803, 100, 28, 28) + os.urandom(100 * 28 * 28)
    gz.write_bytes(gzip.compress(idx)[:3000])
    _fails(dataset_tool.main, ['--source', gz, '--dest', tmp_path / 'm.zip'], 'Cannot convert')
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.new('L', (8, 8)).save(src / 'a.png')
    (src / 'dataset.json').write_text('[1, 2')
    _fails(dataset_tool.main, ['--source', src, '--dest', tmp_path / 'j.zip'], 'dataset.json is malformed')
    (src / 'dataset.json').write_text('{"labels": 5}')
    with pytest.raises(ValueError, match='dataset.json in .* is malformed'):
        ImageFolderDataset(str(src), use_labels=True).get_label(0)

# 9. A PNG with a valid header and truncated data: training stops naming the file (also from a
# DataLoader worker), with no traceback and no empty run folder left behind.
def test_truncated_png_is_named(tmp_path, subprocess_env):
    data = tmp_path / 'data'
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(data / f'{i}.png')
    raw = (data / '3.png').read_bytes()
    (data / '3.png').write_bytes(raw[:60])
    with pytest.raises(DatasetError, match='3.png.*cannot decode'):
        ds = ImageFolderDataset(str(data))
        [ds[i] for i in range(len(ds))]
    env = dict(subprocess_env, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, 'train.py', f'--outdir={tmp_path / "runs"}', f'--data={data}', '--duration=0.001',
                           '--batch=4', '--max-channels=8', '--max-blockn=1', '--max-outputk=4', '--workers=1'],
                          cwd=os.path.dirname(generate.__file__), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert '3.png' in proc.stderr and 'cannot decode' in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert [n for n in os.listdir(tmp_path / 'runs') if not n.startswith('.')] == []

# 8. A non-empty --outdir is refused; --force replaces the earlier run's files (no stale PNG left).
# 10. Unbounded --seeds, --device=foo, decoding latents of another network.
def test_generate_outdir_seeds_device_and_latents(net_file, tmp_path):
    out = tmp_path / 'out'
    run = ['--network', net_file, '--outdir', out]
    assert CliRunner().invoke(generate.main, [str(a) for a in [*run, '--seeds', '0-9']]).exit_code == 0
    _fails(generate.main, [*run, '--seeds', '0-3'], 'is not empty')
    result = CliRunner().invoke(generate.main, [str(a) for a in [*run, '--seeds', '0-3', '--force']])
    assert result.exit_code == 0, result.output
    assert sorted(n for n in os.listdir(out) if n.endswith('.png') and n != 'grid.png') == [f'{i:06d}.png' for i in range(4)]
    assert len(np.load(out / 'latents.npz')['codes']) == 4
    _fails(generate.main, ['--network', net_file, '--outdir', tmp_path / 'o2', '--seeds', '0-99999999999'], 'more than')
    _fails(generate.main, ['--network', net_file, '--outdir', tmp_path / 'o3', '--device', 'foo'], 'is not a device')
    # Same shape, other weights: a warning names the mismatch.
    torch.manual_seed(1)
    other = tmp_path / 'other.safetensors'
    snapshot.save_network_safe(DDNGenerator(**TINY), other)
    result = CliRunner().invoke(generate.main, ['--network', str(other), '--outdir', str(tmp_path / 'dec'), '--codes', str(out / 'latents.npz')])
    assert result.exit_code == 0 and 'made by another network' in result.output, result.output
    result = CliRunner().invoke(generate.main, ['--network', str(net_file), '--outdir', str(tmp_path / 'dec2'), '--codes', str(out / 'latents.npz')])
    assert result.exit_code == 0 and 'another network' not in result.output
    # A training state is not a network.
    torch.save(dict(net={}), tmp_path / 'training-state-000001.pt')
    _fails(generate.main, ['--network', tmp_path / 'training-state-000001.pt', '--outdir', tmp_path / 'o4'], 'train.py --resume')
    # A read-only outdir fails before any work.
    ro = tmp_path / 'ro'
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if not os.access(ro, os.W_OK):                              # (root can write anyway)
            _fails(generate.main, ['--network', net_file, '--outdir', ro / 'x'], 'no permission')
    finally:
        os.chmod(ro, 0o700)

# 10. compress.py codes record their network too: decoding them with another one warns.
def test_compress_codes_name_their_network(net_file, tmp_path):
    codes = tmp_path / 'codes.bin'
    data = tmp_path / 'data'
    data.mkdir()
    for i in range(3):
        PIL.Image.new('L', (8, 8), 60 * i).save(data / f'{i}.png')
    assert CliRunner().invoke(compress.main, ['encode', '--network', str(net_file), '--data', str(data), '--out', str(codes)]).exit_code == 0
    torch.manual_seed(1)
    other = tmp_path / 'other.safetensors'
    snapshot.save_network_safe(DDNGenerator(**TINY), other)
    result = CliRunner().invoke(compress.main, ['decode', '--network', str(other), '--codes', str(codes), '--outdir', str(tmp_path / 'a')])
    assert result.exit_code == 0 and 'written by another network' in result.output, result.output
    result = CliRunner().invoke(compress.main, ['decode', '--network', str(net_file), '--codes', str(codes), '--outdir', str(tmp_path / 'b')])
    assert result.exit_code == 0 and 'another network' not in result.output
    assert compress.read_codes_file(codes, with_network=True)[2] == snapshot.fingerprint(snapshot.load_network(net_file)[1])

# 4. fid.py reads a generate.py outdir's samples, not its grid.png (with or without --subdirs).
def test_fid_scans_only_generated_samples(net_file, tmp_path):
    for subdirs in ([], ['--subdirs']):
        out = tmp_path / f'out{len(subdirs)}'
        result = CliRunner().invoke(generate.main, ['--network', str(net_file), '--outdir', str(out), '--seeds', '0-4', *subdirs])
        assert result.exit_code == 0 and (out / 'grid.png').exists()
        batches = list(image_sources.image_batches(str(out), batch=100, workers=0, progress=False))
        assert sum(len(b) for b in batches) == 5

# 10. Tracebacks of the other scripts: missing --codes, --out a folder or not a PNG, toy densities.
def test_script_messages(net_file, tmp_path):
    _fails(compress.main, ['decode', '--network', net_file, '--codes', tmp_path / 'missing.bin', '--outdir', tmp_path / 'd'], 'does not exist')
    _fails(zscg.main, ['--network', net_file, '--out', tmp_path], 'is a folder')
    _fails(zscg.main, ['--network', net_file, '--out', tmp_path / 'z.gif2'], 'ending in .png')
    _fails(zscg.main, ['--network', net_file, '--device', 'foo'], 'is not a device')
    _fails(tree.main, ['--network', net_file, '--out', tmp_path / 't.jpgx'], 'ending in .png')
    _fails(toy_2d.main, ['--density', 'foo', '--steps', '1'], 'neither built in')
    _fails(toy_2d.main, ['--density', 'uniform', '--steps', '1', '--out', tmp_path], 'ending in .npy')
    _fails(toy_2d.main, ['--density', 'uniform', '--steps', '1', '--gif', tmp_path / 'a.png'], 'ending in .gif')
    PIL.Image.new('L', (16, 16)).save(tmp_path / 'black.png')
    _fails(toy_2d.main, ['--density', str(tmp_path / 'black.png'), '--steps', '1'], 'all black')

# 10. Temporary files of a killed process are removed on the next start; a live one's are kept.
def test_stale_temp_files_removed(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True).stdout.strip()
    (tmp_path / f'training-state-000001.pt.tmp-{dead}').write_bytes(b'x')      # Its writer is gone.
    (tmp_path / f'network-snapshot-000001.pkl.tmp-{os.getppid()}').write_bytes(b'x')  # Its writer still runs.
    (tmp_path / 'keep.txt').write_bytes(b'x')
    removed = checkpoint.remove_stale_temps(str(tmp_path))
    assert [os.path.basename(p) for p in removed] == [f'training-state-000001.pt.tmp-{dead}']
    assert sorted(os.listdir(tmp_path)) == ['keep.txt', f'network-snapshot-000001.pkl.tmp-{os.getppid()}']
