"""Tests of training/dataset.py: image folders and zips (pixels and labels exact), the built-in digits
dataset, subset / mirror / cache options, and the errors users meet with malformed datasets."""

import json
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from torch_utils import misc
from training import dataset as ds

# ----------------------------------------------------------------------------
# Write a small dataset: RGB PNGs in nested folders, with or without dataset.json labels.

def _make_folder(root, num=6, size=8, channels=3, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images, label_list = {}, []
    for i in range(num):
        fname = f'{i % 2:05d}/img{i:08d}.png'
        pixels = rng.integers(0, 256, size=(size, size, channels) if channels == 3 else (size, size), dtype=np.uint8)
        (root / fname).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(pixels).save(root / fname)
        images[fname] = pixels
        label_list.append([fname, int(i % 3)])
    if labels:
        (root / 'dataset.json').write_text(json.dumps({'labels': label_list}))
    return images, dict(label_list)

# Zip a folder's files under their relative paths.
def _zip_folder(root, zip_path):
    with zipfile.ZipFile(zip_path, 'w') as zf:
        for path in sorted(root.rglob('*')):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())
    return zip_path

# ----------------------------------------------------------------------------
# Folder and zip give the same exact pixels (CHW) and one-hot labels, in sorted path order.

@pytest.mark.parametrize('as_zip', [False, True])
def test_image_folder_pixels_and_labels(tmp_path, as_zip):
    images, labels = _make_folder(tmp_path / 'mydata')
    path = _zip_folder(tmp_path / 'mydata', tmp_path / 'mydata.zip') if as_zip else tmp_path / 'mydata'
    dataset = ds.ImageFolderDataset(str(path), use_labels=True)
    assert len(dataset) == 6 and dataset.name == 'mydata'
    assert dataset.image_shape == [3, 8, 8] and dataset.resolution == 8 and dataset.num_channels == 3
    assert dataset.label_dim == 3
    for idx, fname in enumerate(sorted(images)):
        image, label = dataset[idx]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
        np.testing.assert_array_equal(image, images[fname].transpose(2, 0, 1))
        assert label.dtype == np.float32 and label.tolist() == np.eye(3)[labels[fname]].tolist()

# Without use_labels the label is an empty float32 vector; use_labels without dataset.json fails early.
def test_image_folder_without_labels(tmp_path):
    _make_folder(tmp_path / 'nolabels', labels=False)
    dataset = ds.ImageFolderDataset(str(tmp_path / 'nolabels'))
    label = dataset[0][1]
    assert label.shape == (0,) and label.dtype == np.float32
    assert dataset.label_dim == 0
    with pytest.raises(ValueError, match='dataset.json'):
        ds.ImageFolderDataset(str(tmp_path / 'nolabels'), use_labels=True)
    (tmp_path / 'nolabels' / 'dataset.json').write_text(json.dumps({'labels': None}))
    with pytest.raises(ValueError, match='no labels'):
        ds.ImageFolderDataset(str(tmp_path / 'nolabels'), use_labels=True)

# A label missing from dataset.json is named in the error.
def test_image_folder_missing_label(tmp_path):
    _, labels = _make_folder(tmp_path / 'd')
    del labels['00001/img00000003.png']
    (tmp_path / 'd' / 'dataset.json').write_text(json.dumps({'labels': list(labels.items())}))
    with pytest.raises(ValueError, match='img00000003.png'):
        ds.ImageFolderDataset(str(tmp_path / 'd'), use_labels=True)

# Grayscale PNGs stay one channel (HW -> 1HW).
def test_image_folder_grayscale(tmp_path):
    images, _ = _make_folder(tmp_path / 'gray', channels=1, labels=False)
    dataset = ds.ImageFolderDataset(str(tmp_path / 'gray'))
    assert dataset.image_shape == [1, 8, 8]
    np.testing.assert_array_equal(dataset[0][0], images[min(images)][np.newaxis])

# JPEGs are read too (lossy, so only shape and rough values are checked); RGBA drops alpha.
def test_image_folder_jpeg_and_rgba(tmp_path):
    root = tmp_path / 'mixedformats'
    root.mkdir()
    PIL.Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8)).save(root / 'a.jpg', quality=95)
    PIL.Image.fromarray(np.full((4, 4, 4), 100, dtype=np.uint8)).save(root / 'b.png')
    (root / 'notes.txt').write_text('not an image')
    dataset = ds.ImageFolderDataset(str(root))
    assert len(dataset) == 2 and dataset.image_shape == [3, 4, 4]
    assert np.abs(dataset[0][0].astype(int) - 200).max() <= 3
    np.testing.assert_array_equal(dataset[1][0], np.full((3, 4, 4), 100, dtype=np.uint8))

# Malformed datasets: the error names the offending file and the size found.
def test_image_folder_size_errors(tmp_path):
    _make_folder(tmp_path / 'mixed', labels=False)
    PIL.Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / 'mixed' / '00001' / 'zzz.png')
    with pytest.raises(ValueError, match=r'zzz\.png.*16x16'):
        ds.ImageFolderDataset(str(tmp_path / 'mixed'))

    (tmp_path / 'rect').mkdir()
    PIL.Image.fromarray(np.zeros((8, 16, 3), dtype=np.uint8)).save(tmp_path / 'rect' / 'wide.png')
    with pytest.raises(ValueError, match=r'wide\.png.*16x8'):
        ds.ImageFolderDataset(str(tmp_path / 'rect'))

    (tmp_path / 'npot').mkdir()
    PIL.Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(tmp_path / 'npot' / 'odd.png')
    with pytest.raises(ValueError, match=r'odd\.png.*12x12.*power-of-two'):
        ds.ImageFolderDataset(str(tmp_path / 'npot'))

    with pytest.raises(ValueError, match='resolution=16'):
        ds.ImageFolderDataset(str(tmp_path / 'mixed' / '00000'), resolution=16)
    assert ds.ImageFolderDataset(str(tmp_path / 'mixed' / '00000'), resolution=8).resolution == 8

# Missing paths, empty folders and non-dataset files are clear errors naming the path.
def test_image_folder_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does-not-exist'):
        ds.ImageFolderDataset(str(tmp_path / 'does-not-exist'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='No PNG/JPG'):
        ds.ImageFolderDataset(str(tmp_path / 'empty'))
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(ValueError, match='file.txt'):
        ds.ImageFolderDataset(str(tmp_path / 'file.txt'))

# ----------------------------------------------------------------------------
# xflip doubles the length; the second half holds the mirror images of the first.

def test_xflip(tmp_path):
    images, _ = _make_folder(tmp_path / 'd', num=3, labels=True)
    dataset = ds.ImageFolderDataset(str(tmp_path / 'd'), xflip=True, use_labels=True)
    assert len(dataset) == 6
    for idx, fname in enumerate(sorted(images)):
        original, label = dataset[idx]
        mirrored, mirrored_label = dataset[idx + 3]
        np.testing.assert_array_equal(mirrored, original[:, :, ::-1])
        np.testing.assert_array_equal(original, images[fname].transpose(2, 0, 1))
        assert label.tolist() == mirrored_label.tolist()
        assert mirrored.flags['C_CONTIGUOUS']

# max_size picks a fixed random subset per random_seed.
def test_max_size_subset():
    full = ds.DigitsDataset(resolution=8, use_labels=True)
    a = ds.DigitsDataset(resolution=8, max_size=50, random_seed=1, use_labels=True)
    b = ds.DigitsDataset(resolution=8, max_size=50, random_seed=1, use_labels=True)
    c = ds.DigitsDataset(resolution=8, max_size=50, random_seed=2, use_labels=True)
    assert len(a) == 50 and len(full) == 1797
    items = lambda d: [(d[i][0].tobytes(), tuple(d[i][1].tolist())) for i in range(len(d))]
    ia, ib, ic = items(a), items(b), items(c)
    assert ia == ib != ic
    # The subset keeps the dataset's order: its items are a subsequence of the full dataset's.
    rest = iter(items(full))
    assert all(item in rest for item in ia)
    assert len(ds.DigitsDataset(resolution=8, max_size=5000)) == 1797
    assert a.label_dim == 10  # classes counted over the whole dataset, not the subset

# cache=True decodes each image once: files changed afterwards are not read again; without it they are.
def test_cache(tmp_path):
    images, _ = _make_folder(tmp_path / 'd', num=2, labels=False)
    cached = ds.ImageFolderDataset(str(tmp_path / 'd'), cache=True)
    uncached = ds.ImageFolderDataset(str(tmp_path / 'd'))
    first, before = cached[1][0].copy(), uncached[1][0].copy()
    np.testing.assert_array_equal(first, before)
    cached[1][0][:] = 0  # callers get copies; the cache must not be modified through them
    for fname, pixels in images.items():
        PIL.Image.fromarray(255 - pixels).save(tmp_path / 'd' / fname)
    np.testing.assert_array_equal(cached[1][0], first)
    np.testing.assert_array_equal(uncached[1][0], 255 - before)

# A zip dataset pickles (for DataLoader workers) after its zip handle was opened.
def test_zip_dataset_pickles(tmp_path):
    images, _ = _make_folder(tmp_path / 'd', labels=False)
    dataset = ds.ImageFolderDataset(str(_zip_folder(tmp_path / 'd', tmp_path / 'd.zip')))
    _ = dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[2][0], dataset[2][0])
    dataset.close()
    np.testing.assert_array_equal(dataset[2][0], images[sorted(images)[2]].transpose(2, 0, 1))

# ----------------------------------------------------------------------------
# DigitsDataset: sklearn's digits scaled to 0..255, resized, labels 0..9.

def test_digits_dataset():
    from sklearn.datasets import load_digits
    digits = load_digits()
    d8 = ds.DigitsDataset(resolution=8, use_labels=True)
    assert d8.name == 'digits' and len(d8) == 1797 and d8.image_shape == [1, 8, 8] and d8.label_dim == 10
    image, label = d8[5]
    np.testing.assert_array_equal(image[0], np.rint(digits.images[5] * 255 / 16).astype(np.uint8))
    assert label.argmax() == digits.target[5] and label.sum() == 1
    d16 = ds.DigitsDataset()
    assert d16.image_shape == [1, 16, 16] and d16.resolution == 16 and d16[0][1].shape == (0,)
    big = d16[5][0].astype(np.float64)
    assert big.max() > 200 and big.min() == 0
    # Bilinear upscaling keeps the coarse picture: block means track the 8x8 original.
    block_means = big[0].reshape(8, 2, 8, 2).mean(axis=(1, 3))
    assert np.corrcoef(block_means.ravel(), image[0].ravel().astype(np.float64))[0, 1] > 0.9
    assert ds.DigitsDataset(resolution=None).resolution == 16
    assert ds.DigitsDataset(resolution=32)[0][0].shape == (1, 32, 32)
    for bad in (4, 12):
        with pytest.raises(ValueError, match='power of two'):
            ds.DigitsDataset(resolution=bad)

# ----------------------------------------------------------------------------
# open_dataset / dataset_kwargs_for choose the class and name missing paths.

def test_open_dataset_and_kwargs(tmp_path):
    assert isinstance(ds.open_dataset(), ds.DigitsDataset)
    assert isinstance(ds.open_dataset('digits', resolution=8), ds.DigitsDataset)
    _make_folder(tmp_path / 'imgs', labels=True)
    opened = ds.open_dataset(str(tmp_path / 'imgs'), use_labels=True, xflip=True)
    assert isinstance(opened, ds.ImageFolderDataset) and len(opened) == 12 and opened.label_dim > 0

    kwargs = ds.dataset_kwargs_for(str(tmp_path / 'imgs'), use_labels=True)
    assert isinstance(kwargs, dnnlib.EasyDict)
    assert kwargs == {'class_name': 'training.dataset.ImageFolderDataset', 'path': str(tmp_path / 'imgs'), 'use_labels': True}
    assert json.loads(json.dumps(kwargs)) == kwargs  # fits in training_options.json
    rebuilt = dnnlib.util.construct_class_by_name(**kwargs)
    np.testing.assert_array_equal(rebuilt[3][0], opened[3][0])
    assert ds.dataset_kwargs_for(None, max_size=10) == {'class_name': 'training.dataset.DigitsDataset', 'max_size': 10}
    with pytest.raises(FileNotFoundError, match='nowhere-to-be-found'):
        ds.open_dataset(str(tmp_path / 'nowhere-to-be-found'))

# The dataset feeds a DataLoader with InfiniteSampler: uint8 NCHW batches and float labels.
def test_dataloader_integration():
    dataset = ds.DigitsDataset(resolution=8, use_labels=True, xflip=True)
    sampler = misc.InfiniteSampler(dataset, seed=0)
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=16, sampler=sampler)))
    assert images.shape == (16, 1, 8, 8) and images.dtype == torch.uint8
    assert labels.shape == (16, 10) and labels.dtype == torch.float32 and torch.all(labels.sum(1) == 1)
