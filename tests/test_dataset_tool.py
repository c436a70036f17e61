"""Tests of dataset_tool.py through its click CLI: tiny fake CIFAR-10 and MNIST archives and image
folders are converted, then read back with ImageFolderDataset; pixels and labels must round-trip
exactly, and every user error must be clear and leave no half-written output."""

import gzip
import io
import json
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset

# ----------------------------------------------------------------------------
# Run the CLI with arguments; returns click's Result.

def _run(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])

# Paths of everything under a folder, relative, for "nothing left behind" checks.
def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*'))

# ----------------------------------------------------------------------------
# A fake cifar-10-python.tar.gz: 5 training batches of `per_batch` images plus a test batch.

def _make_cifar(path, per_batch=3, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, 'w:gz') as tar:
        for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, size=per_batch).tolist()
            batches[name] = (data, labels)
            payload = pickle.dumps({b'batch_label': name.encode(), b'data': data, b'labels': labels}, protocol=protocol)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    images = np.concatenate([batches[f'data_batch_{i}'][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    labels = [label for i in range(1, 6) for label in batches[f'data_batch_{i}'][1]]
    return images, labels

# CIFAR-10 to a zip: the 15 training images (not the test batch) come back bit-exact with labels.
@pytest.mark.parametrize('protocol', [2, 5])
def test_cifar10_roundtrip(tmp_path, protocol):
    images, labels = _make_cifar(tmp_path / 'cifar-10-python.tar.gz', protocol=protocol)
    dest = tmp_path / 'cifar10-32x32.zip'
    result = _run('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', dest)
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(dest), use_labels=True)
    assert len(dataset) == 15 and dataset.image_shape == [3, 32, 32] and dataset.label_dim == max(labels) + 1
    for idx in range(15):
        image, label = dataset[idx]
        np.testing.assert_array_equal(image, images[idx])
        assert int(label.argmax()) == labels[idx]
    with zipfile.ZipFile(dest) as zf:
        meta = json.loads(zf.read('dataset.json'))
        assert meta['labels'][0] == ['00000/img00000000.png', labels[0]]
        assert zf.namelist()[0] == '00000/img00000000.png'
    assert _listing(tmp_path) == ['cifar-10-python.tar.gz', 'cifar10-32x32.zip']

# A folder destination and --max-images; a renamed tarball is still recognised by its contents.
def test_cifar10_to_folder_with_max_images(tmp_path):
    images, labels = _make_cifar(tmp_path / 'renamed.tar.gz')
    dest = tmp_path / 'out'
    result = _run('--source', tmp_path / 'renamed.tar.gz', '--dest', dest, '--max-images', 7)
    assert result.exit_code == 0, result.output
    assert (dest / '00000' / 'img00000006.png').is_file() and not (dest / '00000' / 'img00000007.png').exists()
    dataset = ImageFolderDataset(str(dest), use_labels=True)
    assert len(dataset) == 7
    np.testing.assert_array_equal(dataset[6][0], images[6])
    assert [int(dataset[i][1].argmax()) for i in range(7)] == labels[:7]

# A tampered CIFAR pickle that would run code is refused, and the code does not run.
def test_cifar10_refuses_code(tmp_path):
    marker = tmp_path / 'pwned'
    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        payload = pickle.dumps(_Exploit(str(marker)), protocol=2)
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    result = _run('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'out.zip')
    assert result.exit_code != 0 and 'Refusing' in str(result.exception) + result.output
    assert not marker.exists() and not (tmp_path / 'out.zip').exists()

# Pickles as a call to a builtin that would create a file (must never be executed).
class _Exploit:
    def __init__(self, path):
        self.path = path

    # Unpickling this calls open(path, 'w').
    def __reduce__(self):
        return (open, (self.path, 'w'))

# ----------------------------------------------------------------------------
# Gzip'ed IDX file (MNIST's format) from a uint8 array.

def _write_idx(path, array):
    header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())

# MNIST: 28x28 digits padded to 32x32 (exact center, zero border), labels, 1000 images per folder.
def test_mnist_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(1003, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=1003, dtype=np.uint8)
    _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', images)
    _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', labels)
    dest = tmp_path / 'mnist'
    result = _run('--source', tmp_path / 'train-images-idx3-ubyte.gz', '--dest', dest)
    assert result.exit_code == 0, result.output
    assert (dest / '00001' / 'img00001002.png').is_file()
    dataset = ImageFolderDataset(str(dest), use_labels=True)
    assert len(dataset) == 1003 and dataset.image_shape == [1, 32, 32] and dataset.label_dim == int(labels.max()) + 1
    for idx in (0, 999, 1000, 1002):
        image, label = dataset[idx]
        np.testing.assert_array_equal(image[0, 2:30, 2:30], images[idx])
        assert image[0, :2].sum() == 0 and image[0, 30:].sum() == 0 and image[0, :, :2].sum() == 0 and image[0, :, 30:].sum() == 0
        assert int(label.argmax()) == labels[idx]

# MNIST without its labels file: labels are null; a corrupt header is a clear error.
def test_mnist_without_labels_and_bad_header(tmp_path):
    _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', np.zeros((2, 28, 28), dtype=np.uint8))
    dest = tmp_path / 'out.zip'
    result = _run('--source', tmp_path / 't10k-images-idx3-ubyte.gz', '--dest', dest)
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(dest) as zf:
        assert json.loads(zf.read('dataset.json')) == {'labels': None}
    assert len(ImageFolderDataset(str(dest))) == 2
    with gzip.open(tmp_path / 'bad-images-idx3-ubyte.gz', 'wb') as f:
        f.write(b'\x00\x00\x0d\x03' + b'\x00' * 20)
    result = _run('--source', tmp_path / 'bad-images-idx3-ubyte.gz', '--dest', tmp_path / 'bad.zip')
    assert result.exit_code != 0 and 'IDX' in result.output
    assert not (tmp_path / 'bad.zip').exists()

# ----------------------------------------------------------------------------
# Image folder source (recursive) with labels: sorted order, pixels and labels preserved.

def test_image_folder_source_with_labels(tmp_path):
    src = tmp_path / 'src'
    (src / 'b').mkdir(parents=True)
    (src / 'a').mkdir()
    rng = np.random.default_rng(2)
    arrays = {name: rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8) for name in ('a/1.png', 'a/2.png', 'b/0.png')}
    for name, array in arrays.items():
        PIL.Image.fromarray(array).save(src / name)
    (src / 'dataset.json').write_text(json.dumps({'labels': [['a/1.png', 4], ['a/2.png', 0], ['b/0.png', 2]]}))
    result = _run('--source', src, '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(tmp_path / 'out.zip'), use_labels=True)
    for idx, name in enumerate(['a/1.png', 'a/2.png', 'b/0.png']):
        np.testing.assert_array_equal(dataset[idx][0], arrays[name].transpose(2, 0, 1))
    assert [int(dataset[i][1].argmax()) for i in range(3)] == [4, 0, 2]

# A zip of grayscale images stays grayscale; --resolution resizes.
def test_zip_source_grayscale_and_resize(tmp_path):
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as zf:
        for i in range(3):
            buffer = io.BytesIO()
            PIL.Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(buffer, format='png')
            zf.writestr(f'imgs/{i}.png', buffer.getvalue())
    result = _run('--source', tmp_path / 'src.zip', '--dest', tmp_path / 'out', '--resolution', '8x8')
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(tmp_path / 'out'))
    assert dataset.image_shape == [1, 8, 8]
    np.testing.assert_array_equal(dataset[2][0], np.full((1, 8, 8), 80, dtype=np.uint8))

# center-crop keeps the centre square; center-crop-wide letterboxes a wide crop into a square.
def test_transforms(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    wide = np.zeros((8, 16, 3), dtype=np.uint8)  # 16 wide, 8 tall; white centre 8x8, black sides
    wide[:, 4:12] = 255
    PIL.Image.fromarray(wide).save(src / 'wide.png')
    result = _run('--source', src, '--dest', tmp_path / 'crop', '--resolution', '8x8', '--transform', 'center-crop')
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(ImageFolderDataset(str(tmp_path / 'crop'))[0][0], np.full((3, 8, 8), 255, dtype=np.uint8))

    result = _run('--source', src, '--dest', tmp_path / 'wide', '--resolution', '16x8', '--transform', 'center-crop-wide')
    assert result.exit_code == 0, result.output
    image = ImageFolderDataset(str(tmp_path / 'wide'))[0][0]
    assert image.shape == (3, 16, 16)
    np.testing.assert_array_equal(image[:, 4:12], wide.transpose(2, 0, 1))
    assert image[:, :4].sum() == 0 and image[:, 12:].sum() == 0

# ----------------------------------------------------------------------------
# Mixed sizes without --resolution: clear error naming the file, no zip and no temp file left.

def test_mixed_sizes_fail_cleanly(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(src / f'{i}.png')
    PIL.Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(src / 'z_big.png')
    out = tmp_path / 'out'
    out.mkdir()
    result = _run('--source', src, '--dest', out / 'data.zip')
    assert result.exit_code != 0
    assert 'z_big.png' in result.output and '16x16' in result.output and '--resolution' in result.output
    assert _listing(out) == []
    result = _run('--source', src, '--dest', out / 'folder')
    assert result.exit_code != 0 and _listing(out) == []

# Other user errors: non-empty destination, bad --resolution, unknown source, non-square output.
def test_cli_errors(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.fromarray(np.zeros((12, 8, 3), dtype=np.uint8)).save(src / 'tall.png')
    busy = tmp_path / 'busy'
    busy.mkdir()
    (busy / 'keep.txt').write_text('x')

    result = _run('--source', src, '--dest', busy, '--resolution', '8x8')
    assert result.exit_code != 0 and 'not empty' in result.output and _listing(busy) == ['keep.txt']
    result = _run('--source', src, '--dest', tmp_path / 'o1', '--resolution', '32')
    assert result.exit_code == 2 and 'WxH' in result.output
    (tmp_path / 'notes.txt').write_text('hello')
    result = _run('--source', tmp_path / 'notes.txt', '--dest', tmp_path / 'o2')
    assert result.exit_code != 0 and 'Unknown source format' in result.output
    result = _run('--source', tmp_path / 'missing', '--dest', tmp_path / 'o3')
    assert result.exit_code != 0 and 'not found' in result.output
    result = _run('--source', src, '--dest', tmp_path / 'o4')
    assert result.exit_code != 0 and 'tall.png' in result.output and '8x12' in result.output
    result = _run('--source', src, '--dest', tmp_path / 'o5', '--resolution', '24x24')
    assert result.exit_code != 0 and 'power-of-two' in result.output
    result = _run('--source', src, '--dest', tmp_path / 'o6', '--transform', 'center-crop')
    assert result.exit_code != 0 and '--resolution' in result.output
    assert not any((tmp_path / f'o{i}').exists() for i in range(1, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['busy', 'notes.txt', 'src']

# An existing empty destination folder is fine, and the converted images fill it.
def test_empty_destination_folder_is_used(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.fromarray(np.full((4, 4, 3), 7, dtype=np.uint8)).save(src / 'x.png')
    (tmp_path / 'dest').mkdir()
    result = _run('--source', src, '--dest', tmp_path / 'dest')
    assert result.exit_code == 0, result.output
    assert _listing(tmp_path / 'dest') == ['00000', '00000/img00000000.png', 'dataset.json']
    np.testing.assert_array_equal(ImageFolderDataset(str(tmp_path / 'dest'))[0][0], np.full((3, 4, 4), 7, dtype=np.uint8))
