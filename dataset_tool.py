"""Convert CIFAR-10, MNIST or an image folder into ddn's (EDM's) dataset format.

    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/mnist/train-images-idx3-ubyte.gz --dest=datasets/mnist-32x32.zip
    python dataset_tool.py --source=photos/ --dest=datasets/photos-64x64.zip --resolution=64x64 --transform=center-crop

The output is a folder or a .zip holding PNGs named `00000/img00000000.png` (1000 per subfolder) and
`dataset.json` with `{"labels": [["00000/img00000000.png", 6], ...]}`, or `{"labels": null}` when the
source has no labels. `training.dataset.ImageFolderDataset` reads it. Images come out square with a
power-of-two side, uint8, grayscale (1 channel) or RGB. A .zip destination is written under a
temporary name and renamed at the end, so a failed run never leaves a half-written dataset.

Sources:
- CIFAR-10 `cifar-10-python.tar.gz`: the 50,000 training images of data_batch_1..5, with labels
  (test_batch is left out, as in EDM). Its batches are pickles; they are read with an unpickler that
  only accepts NumPy arrays, so a tampered archive cannot run code.
- MNIST `train-images-idx3-ubyte.gz` (or `t10k-...`), with labels from the matching
  `*-labels-idx1-ubyte.gz` beside it if present. The 28x28 digits are zero-padded to 32x32 (the
  next power of two), keeping them centred and unscaled.
- A folder (searched recursively) or .zip of images in any format PIL reads; labels come from its
  `dataset.json` if it has one.
"""

import errno
import gzip
import io
import json
import os
import pickle
import re
import shutil
import struct
import tarfile
import zipfile
import zlib
from typing import NamedTuple

import click
import numpy as np
import PIL.Image
import tqdm

import cli
from torch_utils import limits
from torch_utils.checkpoint import remove_stale_temps
from training.dataset import check_label, is_hidden, max_labels_json_bytes, to_uint8_array

# ----------------------------------------------------------------------------
# One source image: pixels as uint8 HW (grayscale) or HWC (RGB), its class or None, a name for errors.

class SourceImage(NamedTuple):
    img:    np.ndarray
    label:  int | None
    name:   str

# ----------------------------------------------------------------------------
# Unpickler for CIFAR-10 batches: allows the NumPy array reconstruction functions and nothing else.

class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = frozenset({
        ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
        ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
    })

    # Resolve only allowed globals; numpy.core was renamed numpy._core in NumPy 2.
    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f'Refusing to load {module}.{name}: a CIFAR-10 batch holds only NumPy arrays')
        if module.startswith('numpy.core.') and int(np.__version__.split('.')[0]) >= 2:
            module = 'numpy._core.' + module[len('numpy.core.'):]
        return super().find_class(module, name)

# ----------------------------------------------------------------------------
# CIFAR-10 training set from the official python tarball.

def open_cifar10(tarball, max_images=None):
    images, labels = [], []
    with tarfile.open(tarball, 'r:gz') as tar:
        for batch in range(1, 6):
            member = f'cifar-10-batches-py/data_batch_{batch}'
            try:
                f = tar.extractfile(member)
            except KeyError:
                raise click.ClickException(f'{tarball} is not a CIFAR-10 python archive: {member} is missing') from None
            with f:
                data = _NumpyOnlyUnpickler(f, encoding='bytes').load()
            pixels = np.asarray(data[b'data'], dtype=np.uint8)
            if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or len(data[b'labels']) != pixels.shape[0]:
                raise click.ClickException(f'{tarball}: {member} does not hold (N, 3072) images with N labels')
            # Rows are stored channel-major (1024 R, 1024 G, 1024 B); images are used as HWC.
            images.append(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(data[b'labels'], dtype=np.int64))
    images = np.concatenate(images)[:max_images]
    labels = np.concatenate(labels)[:max_images]
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise click.ClickException(f'{tarball}: CIFAR-10 labels must be in 0..9')
    source = os.path.basename(tarball)
    return len(images), (SourceImage(img, int(label), f'{source}[{idx}]') for idx, (img, label) in enumerate(zip(images, labels, strict=True)))

# ----------------------------------------------------------------------------
# Read one gzip'ed IDX file (MNIST's format) with the expected number of dimensions.

def _read_idx(path, ndim):
    with gzip.open(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0:2] != b'\x00\x00' or data[2] != 0x08 or data[3] != ndim:
        raise click.ClickException(f'{path} is not an IDX file of uint8 with {ndim} dimension(s)')
    dims = struct.unpack(f'>{ndim}I', data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise click.ClickException(f'{path}: header says {dims} but the file holds {array.size} values')
    return array.reshape(dims)

# ----------------------------------------------------------------------------
# MNIST images (+ labels if the matching labels file is beside them), padded to a power-of-two side.

def open_mnist(images_gz, max_images=None):
    images = _read_idx(images_gz, 3)[:max_images]
    labels_gz = os.path.join(os.path.dirname(images_gz), os.path.basename(images_gz).replace('images-idx3-ubyte', 'labels-idx1-ubyte'))
    labels = None
    if labels_gz != images_gz and os.path.isfile(labels_gz):
        labels = _read_idx(labels_gz, 1)[:max_images]
        if len(labels) != len(images):
            raise click.ClickException(f'{labels_gz} has {len(labels)} labels for {len(images)} images in {images_gz}')
    # Pad (not resize) to the next power of two: 28x28 digits become 32x32 with a black border.
    height, width = images.shape[1:]
    side = 1 << max(height - 1, width - 1, 0).bit_length()
    top, left = (side - height) // 2, (side - width) // 2
    images = np.pad(images, [(0, 0), (top, side - height - top), (left, side - width - left)])
    source = os.path.basename(images_gz)
    return len(images), (SourceImage(img, None if labels is None else int(labels[idx]), f'{source}[{idx}]')
                         for idx, img in enumerate(images))

# ----------------------------------------------------------------------------
# Decode an image file to uint8 HW (grayscale modes) or HWC RGB (everything else; alpha dropped).

def _decode_image(f, name):
    try:
        with limits.open_image(f, name) as image:
            return to_uint8_array(image, name)      # 16-bit grayscale scaled, not clipped to white.
    except (OSError, SyntaxError) as err:
        raise click.ClickException(f'{name}: cannot decode: {err}') from None
    except ValueError as err:
        raise click.ClickException(str(err)) from None

# ----------------------------------------------------------------------------
# Images of a folder (recursive) or a zip, sorted by path, labels from its dataset.json if present.

def open_image_files(source, max_images=None):
    PIL.Image.init()
    extensions = {ext.lower() for ext in PIL.Image.registered_extensions()}
    if os.path.isdir(source):
        all_fnames = [os.path.relpath(os.path.join(root, fname), start=source).replace(os.sep, '/')
                      for root, _dirs, fnames in os.walk(source) for fname in fnames]
        archive = None
    else:
        archive = zipfile.ZipFile(source)
        all_fnames = [fname for fname in archive.namelist() if not fname.endswith('/')]

    # Open a file of the folder / zip by its '/'-separated relative path.
    def open_file(fname):
        return archive.open(fname, 'r') if archive is not None else open(os.path.join(source, fname), 'rb')

    fnames = sorted(fname for fname in all_fnames if os.path.splitext(fname)[1].lower() in extensions and not is_hidden(fname))
    fnames = fnames[:max_images]
    if archive is None:       # A FIFO named x.png would block the conversion forever.
        for fname in fnames + ['dataset.json'] * ('dataset.json' in all_fnames):
            try:
                limits.require_regular_file(os.path.join(source, fname), f'{source}/{fname}')
            except ValueError as err:
                raise click.ClickException(str(err)) from None
    labels = None
    if 'dataset.json' in all_fnames:
        what, max_bytes = f'{source}/dataset.json', max_labels_json_bytes(len(fnames))
        try:
            if archive is not None:
                text = limits.read_zip_member(archive, 'dataset.json', max_bytes, what)
            else:
                if os.path.getsize(os.path.join(source, 'dataset.json')) > max_bytes:
                    raise click.ClickException(f'{what} is larger than the limit of {max_bytes} bytes for {len(fnames)} images')
                with open_file('dataset.json') as f:
                    text = f.read()
            labels = limits.loads_json(text, what)['labels']
            labels = dict(labels) if labels is not None else None
            if labels is not None:
                for fname in fnames:
                    if fname in labels:
                        check_label(labels[fname], f'{what}, {fname}')
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
            if any(m in str(err) for m in ('a label must be', 'than the limit of', 'nested too deeply')):
                raise click.ClickException(str(err)) from None
            raise click.ClickException(f'{source}/dataset.json is malformed ({type(err).__name__}: {err}); expected '
                                       '{"labels": [["path.png", class], ...]} or {"labels": null}') from None

    # Decode lazily, one image at a time, so huge folders do not need to fit in memory.
    def iterate():
        try:
            for fname in fnames:
                if labels is not None and fname not in labels:
                    raise click.ClickException(f'{source}/dataset.json has no label for {fname}')
                with open_file(fname) as f:
                    img = _decode_image(f, f'{source}/{fname}')
                yield SourceImage(img, None if labels is None else int(labels[fname]), fname)
        finally:
            if archive is not None:
                archive.close()
    return len(fnames), iterate()

# ----------------------------------------------------------------------------
# Pick the reader for --source from what it is.

def open_source(source, max_images=None):
    if os.path.isdir(source):
        return open_image_files(source, max_images)
    if not os.path.isfile(source):
        raise click.ClickException(f'--source not found: {source}')
    basename = os.path.basename(source)
    if basename == 'cifar-10-python.tar.gz' or (tarfile.is_tarfile(source) and _is_cifar10_tarball(source)):
        return open_cifar10(source, max_images)
    if basename.endswith('images-idx3-ubyte.gz'):
        return open_mnist(source, max_images)
    if zipfile.is_zipfile(source):
        return open_image_files(source, max_images)
    raise click.ClickException(f'Unknown source format: {source}; expected a folder or .zip of images, '
                               'cifar-10-python.tar.gz, or an MNIST *-images-idx3-ubyte.gz')

# ----------------------------------------------------------------------------
# Whether a (renamed) tarball has CIFAR-10's python layout.

def _is_cifar10_tarball(path):
    try:
        with tarfile.open(path, 'r:*') as tar:
            return 'cifar-10-batches-py/data_batch_1' in tar.getnames()
    except (tarfile.TarError, OSError):
        return False

# ----------------------------------------------------------------------------
# Parse --resolution 'WxH' into (W, H).

def parse_resolution(_ctx, _param, value):
    if value is None:
        return None
    match = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', value)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise click.BadParameter(f'resolution must be given as WxH, e.g. 32x32; got {value!r}')
    return int(match.group(1)), int(match.group(2))

# ----------------------------------------------------------------------------
# Resize an HW / HWC uint8 image to (width, height) with Lanczos filtering (identity if already there).

def _resize(img, width, height):
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.Resampling.LANCZOS))

# ----------------------------------------------------------------------------
# Largest centred crop of an HW / HWC image with the aspect ratio width:height.

def _center_crop_to_aspect(img, width, height):
    img_h, img_w = img.shape[:2]
    crop_w = min(img_w, round(img_h * width / height))
    crop_h = min(img_h, round(crop_w * height / width))
    top, left = (img_h - crop_h) // 2, (img_w - crop_w) // 2
    return img[top : top + crop_h, left : left + crop_w]

# ----------------------------------------------------------------------------
# The per-image transform selected by --transform and --resolution.

def make_transform(transform, resolution):
    if transform is None:
        if resolution is None:
            return lambda img: img
        return lambda img: _resize(img, *resolution)
    if resolution is None:
        raise click.ClickException(f'--transform={transform} needs --resolution=WxH')
    width, height = resolution
    if transform == 'center-crop':
        return lambda img: _resize(_center_crop_to_aspect(img, width, height), width, height)
    if transform == 'center-crop-wide':
        # A wide WxH crop letterboxed into a WxW square: square datasets with the full width kept.
        if height > width:
            raise click.ClickException('--transform=center-crop-wide needs a resolution at least as wide as tall')

        # Crop, resize, and paste vertically centred on a black square canvas.
        def center_crop_wide(img):
            img = _resize(_center_crop_to_aspect(img, width, height), width, height)
            canvas = np.zeros((width, width, *img.shape[2:]), dtype=np.uint8)
            top = (width - height) // 2
            canvas[top : top + height] = img
            return canvas
        return center_crop_wide
    raise click.ClickException(f'Unknown --transform: {transform}')

# ----------------------------------------------------------------------------
# Destination folder or zip, written under a temporary name and moved into place on success.

class DatasetWriter:
    def __init__(self,
        dest,                       # Folder, or a path ending in .zip.
        source          = None,     # --source: never replaced.
        force           = False,    # Replace an existing .zip --dest.
    ):
        self.dest = dest
        self.is_zip = dest.lower().endswith('.zip')
        if source is not None and os.path.exists(dest) and os.path.exists(source) and os.path.samefile(source, dest):
            raise click.ClickException(f'--dest {dest} is the --source: converting would replace the dataset it reads')
        if self.is_zip and os.path.isfile(dest) and not force:
            raise click.ClickException(f'--dest {dest} exists; add --force to replace it, or choose another name')
        if os.path.isdir(dest) and os.listdir(dest):
            raise click.ClickException(f'--dest folder {dest} is not empty; choose a new or empty folder')
        if os.path.exists(dest) and not os.path.isdir(dest) and not self.is_zip:
            raise click.ClickException(f'--dest {dest} exists and is not a folder')
        if self.is_zip and os.path.isdir(dest):
            raise click.ClickException(f'--dest {dest} is a folder, not a .zip file')
        cli.check_writable(dest, '--dest')
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(parent)      # Left by a killed conversion.
        self.tmp = os.path.join(parent, f'.{os.path.basename(os.path.normpath(dest))}.tmp-{os.getpid()}')
        if self.is_zip:
            # PNGs are already compressed: store them as they are.
            self.zip = zipfile.ZipFile(self.tmp, 'w', compression=zipfile.ZIP_STORED)
        else:
            self.zip = None
            os.makedirs(self.tmp)

    # Add one file (a '/'-separated path inside the dataset).
    def write(self, fname, data):
        if self.zip is not None:
            self.zip.writestr(fname, data)
        else:
            path = os.path.join(self.tmp, *fname.split('/'))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)

    # Success: move the finished dataset to --dest (an existing zip is replaced).
    def commit(self):
        if self.zip is not None:
            self.zip.close()
            os.replace(self.tmp, self.dest)
        else:
            if os.path.isdir(self.dest):
                os.rmdir(self.dest)  # empty, checked in __init__
            os.replace(self.tmp, self.dest)

    # Failure: remove everything written so far (even when closing fails on a full disk).
    def abort(self):
        if self.zip is not None:
            try:
                self.zip.close()
            except (OSError, ValueError):
                pass
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

# ----------------------------------------------------------------------------
# Encode an HW / HWC uint8 image as PNG bytes.

def _encode_png(img):
    buffer = io.BytesIO()
    # Level 1: nearly the size of the default level, several times faster to write.
    PIL.Image.fromarray(img).save(buffer, format='png', compress_level=1)
    return buffer.getvalue()

# ----------------------------------------------------------------------------
# The conversion itself: read, transform, check, write; all or nothing.

def convert_dataset(source, dest, max_images=None, transform=None, resolution=None, force=False):
    transform_fn = make_transform(transform, resolution)
    if resolution is not None:
        out_w, out_h = (resolution[0], resolution[0]) if transform == 'center-crop-wide' else resolution
        if out_w != out_h or out_w & (out_w - 1):
            raise click.ClickException(f'Output images would be {out_w}x{out_h}; they must be square with a power-of-two side')
    try:
        writer = DatasetWriter(dest, source=source, force=force)
    except OSError as err:      # A read-only or missing parent folder, a full disk.
        raise click.ClickException(f'--dest {dest}: cannot write there: {err}') from None
    try:
        num_images, images = open_source(source, max_images)
        if num_images == 0:
            raise click.ClickException(f'No images found in {source}')
        labels = []
        shape = None  # (height, width, channels) of the first output image
        for idx, item in enumerate(tqdm.tqdm(images, total=num_images, unit='img', desc='Converting')):
            img = transform_fn(item.img)
            height, width = img.shape[:2]
            channels = 1 if img.ndim == 2 else img.shape[2]
            if shape is None:
                if width != height or width & (width - 1):
                    raise click.ClickException(f'{item.name} is {width}x{height}; images must be square with a power-of-two side: '
                                               'use --resolution=WxH (with --transform=center-crop for non-square sources)')
                shape = (height, width, channels)
            if shape[2] == 3 and channels == 1:
                img = np.repeat(img[:, :, np.newaxis], 3, axis=2)  # a grayscale image in an RGB dataset
                channels = 3
            if (height, width, channels) != shape:
                raise click.ClickException(f'{item.name} is {width}x{height} with {channels} channel(s), but the first image is '
                                           f'{shape[1]}x{shape[0]} with {shape[2]}; all images must match '
                                           '(use --resolution=WxH to resize them to one size)')
            fname = f'{idx // 1000:05d}/img{idx:08d}.png'
            writer.write(fname, _encode_png(img))
            labels.append([fname, item.label])
        has_labels = all(label is not None for _fname, label in labels)
        writer.write('dataset.json', json.dumps({'labels': labels if has_labels else None}).encode('utf-8'))
        writer.commit()
    except OSError as err:
        writer.abort()
        if err.errno == errno.ENOSPC:
            raise click.ClickException(f'--dest {dest}: the disk is full ({err}); nothing was written') from None
        raise click.ClickException(f'Cannot convert {source} to {dest}: {type(err).__name__}: {err} '
                                   '(a truncated or corrupt download, or an unwritable --dest?)') from None
    except (EOFError, tarfile.TarError, zlib.error) as err:
        # A truncated .gz / tarball: click would print only "Aborted!" for an EOFError.
        writer.abort()
        raise click.ClickException(f'Cannot convert {source} to {dest}: {type(err).__name__}: {err} '
                                   '(a truncated or corrupt download, or an unwritable --dest?)') from None
    except BaseException:
        writer.abort()
        raise
    return len(labels)

# ----------------------------------------------------------------------------
# Command line.

@click.command()
@click.option('--source',       help='CIFAR-10 tarball, MNIST images .gz, or a folder / .zip of images', metavar='PATH', required=True)
@click.option('--dest',         help='Output folder or .zip file', metavar='PATH', required=True)
@click.option('--max-images',   help='Convert at most this many images', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--transform',    help='Crop before resizing', type=click.Choice(['center-crop', 'center-crop-wide']), default=None)
@click.option('--resolution',   help='Output resolution, e.g. 32x32', metavar='WxH', type=str, callback=parse_resolution, default=None)
@click.option('--force',        help='Replace an existing --dest .zip (never the --source)', is_flag=True)
def main(source, dest, max_images, transform, resolution, force):
    """Convert an image dataset into ddn's dataset format (a folder or .zip of PNGs + dataset.json)."""
    num = convert_dataset(source=source, dest=dest, max_images=max_images, transform=transform, resolution=resolution, force=force)
    click.echo(f'Wrote {num} images to {dest}')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
