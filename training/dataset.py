"""Training datasets: image folders / zips in EDM's format, and the built-in digits dataset.

Every dataset yields `(image, label)`: the image as uint8 NumPy CHW (1 or 3 channels, square,
power-of-two side), the label as a float32 one-hot vector, or an empty float32 vector when labels are
not used. The network scales images to [-1, 1] itself, so datasets stay raw and lossless.

- `ImageFolderDataset`: a folder (searched recursively) or a .zip of PNG/JPG files, as written by
  `dataset_tool.py`, with optional `dataset.json` `{"labels": [["relative/path.png", int], ...]}`.
- `DigitsDataset`: scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped inside the
  sklearn package, so no download), upscaled; the dataset for smoke tests and tiny experiments.
- `open_dataset(path)` / `dataset_kwargs_for(path)`: pick the right class from a CLI `--data` value.
"""

import os
import re
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib
from training.images import GRAYSCALE_MODES, channels_of
from torch_utils import limits

# File extensions read as images (lower case).
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

# The sample images of a generate.py --outdir ({name:06d}.png, or {thousands:06d}/{name:06d}.png
# with --subdirs), which a folder marks by its generation_options.json; grid.png is not one of them.
GENERATED_IMAGE_PATTERN = r'(\d{6}/)?\d{6}\.png'
GENERATED_MARKER = 'generation_options.json'

# Largest class label accepted (a label of 2e9 would make one-hot vectors of gigabytes).
MAX_LABEL = (1 << 20) - 1

# Largest dataset.json accepted: 1 MiB plus 1 KiB per image (a label entry is a path and a number).
def max_labels_json_bytes(num_images):
    return (1 << 20) + 1024 * num_images

# A label of dataset.json as an int, or ValueError naming `what` (bools, floats, negatives, huge values).
def check_label(label, what):
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= MAX_LABEL:
        raise ValueError(f'{what}: a label must be an integer in [0, {MAX_LABEL}], got {label!r:.40}')
    return label


# PIL modes of integer grayscale with more than 8 bits (16-bit PNGs open as 'I;16' or 'I').
_WIDE_GRAY_MODES = ('I', 'I;16', 'I;16B', 'I;16L')

def to_uint8_array(image, what='image'):
    """uint8 pixels of a PIL image: HW for grayscale modes, HWC RGB for the others (alpha dropped).
    16-bit grayscale is scaled from [0, 65535] (value / 257, rounded), not clipped to white; a
    floating-point image ('F') or values beyond 16 bits raise ValueError naming `what`."""
    if image.mode in _WIDE_GRAY_MODES:
        array = np.asarray(image).astype(np.int64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f'{what}: {image.mode} pixel values outside [0, 65535]; convert it to an 8- or 16-bit image')
        return ((array * 255 + 32767) // 65535).astype(np.uint8)
    if image.mode == 'F':
        raise ValueError(f'{what} is a floating-point image (mode F); convert it to an 8- or 16-bit PNG')
    if image.mode in GRAYSCALE_MODES:
        image = image.convert('L') if image.mode != 'L' else image
    elif image.mode != 'RGB':
        image = image.convert('RGB')
    return np.array(image, dtype=np.uint8)

# ----------------------------------------------------------------------------
# Base class: subset (max_size), mirroring (xflip), labels and caching on top of raw images.

# An image of the dataset cannot be read (raised while training, possibly in a DataLoader worker,
# which re-raises it in the main process with the same type and message).
class DatasetError(ValueError):
    pass

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,                       # Dataset name, used in run folder names.
        raw_shape,                  # Shape of all raw images: [N, C, H, W].
        max_size        = None,     # Use a random subset of at most this many images; None = all.
        use_labels      = False,    # Return one-hot labels; False returns zeros(0).
        xflip           = False,    # Append a mirrored copy of every image (doubles the length).
        random_seed     = 0,        # Seed of the max_size subset (not of training randomness).
        cache           = False,    # Keep decoded images in memory after their first use.
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = {}
        self._raw_labels = None

        # Subset: a fixed random choice, sorted so the subset keeps the files' order.
        raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and raw_idx.size > max_size:
            raw_idx = np.sort(np.random.default_rng(random_seed).choice(raw_idx.size, size=max_size, replace=False))
        # Mirroring: indices [0, N) are the images as stored, [N, 2N) their mirror images.
        self._raw_idx = np.tile(raw_idx, 2) if xflip else raw_idx
        self._xflip = np.repeat(np.array([False, True]), raw_idx.size) if xflip else np.zeros(raw_idx.size, dtype=bool)

        # Read the labels now, so a missing dataset.json fails at construction, not in a worker.
        if use_labels:
            self._get_raw_labels()

    # Raw labels of all N images as int64 (N,), or None if the dataset has none.
    def _get_raw_labels(self):
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                if self._use_labels:
                    raise ValueError(f'use_labels=True but dataset {self._name!r} has no labels '
                                     '(for an image folder: no dataset.json with a "labels" list)')
                labels = np.zeros(self._raw_shape[0], dtype=np.int64)
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (self._raw_shape[0],) or (labels.size and labels.min() < 0):
                raise ValueError(f'Dataset {self._name!r}: expected {self._raw_shape[0]} non-negative integer labels')
            self._raw_labels = labels
        return self._raw_labels

    # Subclass hook: decode raw image `raw_idx` as uint8 CHW.
    def _load_raw_image(self, raw_idx):
        raise NotImplementedError

    # Subclass hook: int labels of all raw images, or None when there are none.
    def _load_raw_labels(self):
        raise NotImplementedError

    # Subclass hook: how to name raw image `raw_idx` in an error message.
    def _describe_raw_image(self, raw_idx):
        return f'image {raw_idx} of dataset {self._name!r}'

    # Free resources (open zip files); the dataset reopens them on demand.
    def close(self):
        pass

    # Number of items, mirrored copies included.
    def __len__(self):
        return self._raw_idx.size

    # (uint8 CHW image, float32 label) of item `idx`.
    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            try:
                image = self._load_raw_image(raw_idx)
            except (OSError, ValueError, SyntaxError) as err:     # Truncated or corrupt files, in a worker too.
                raise DatasetError(f'{self._describe_raw_image(raw_idx)}: cannot decode: {err}') from None
            if image.dtype != np.uint8 or list(image.shape) != self.image_shape:
                raise ValueError(f'{self._describe_raw_image(raw_idx)} has shape {list(image.shape)} (dtype {image.dtype}); '
                                 f'expected {self.image_shape} (uint8) like the rest of the dataset')
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    # Label of item `idx`: float32 one-hot of length label_dim, or zeros(0) without labels.
    def get_label(self, idx):
        if not self._use_labels:
            return np.zeros([0], dtype=np.float32)
        onehot = np.zeros([self.label_dim], dtype=np.float32)
        onehot[self._get_raw_labels()[self._raw_idx[idx]]] = 1
        return onehot

    # Name of the dataset ('digits', or the folder / zip name without extension).
    @property
    def name(self):
        return self._name

    # [C, H, W] of every image.
    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    # Number of image channels (1 or 3).
    @property
    def num_channels(self):
        return self.image_shape[0]

    # Side length of the (square) images.
    @property
    def resolution(self):
        return self.image_shape[1]

    # Number of classes: 1 + the largest label (0 when labels are not used).
    @property
    def label_dim(self):
        if not self._use_labels:
            return 0
        labels = self._get_raw_labels()
        return int(labels.max()) + 1 if labels.size else 0

# ----------------------------------------------------------------------------
# Check the common constraint of all datasets: square images with a power-of-two side.

def _check_square_power_of_two(width, height, what):
    if width != height or width < 1 or width & (width - 1):
        raise ValueError(f'{what} is {width}x{height}; images must be square with a power-of-two side '
                         '(dataset_tool.py converts images to such a resolution)')

# ----------------------------------------------------------------------------
# A folder (recursive) or .zip of PNG/JPG images with optional dataset.json labels.

class ImageFolderDataset(Dataset):
    def __init__(self,
        path,                       # Folder or .zip file.
        resolution      = None,     # Expected side length; None accepts whatever the images have.
        name_pattern    = None,     # Regex the relative path of an image must match, e.g. GENERATED_IMAGE_PATTERN.
        **super_kwargs,             # Options of Dataset: max_size, use_labels, xflip, random_seed, cache.
    ):
        self._path = os.fspath(path)
        self._zipfile = None
        if os.path.isdir(self._path):
            self._type = 'dir'
            all_fnames = [os.path.relpath(os.path.join(root, fname), start=self._path).replace(os.sep, '/')
                          for root, _dirs, fnames in os.walk(self._path) for fname in fnames]
            for fname in all_fnames:      # A FIFO named x.png would block the reader forever.
                if os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS + ('.json',):
                    limits.require_regular_file(os.path.join(self._path, fname), f'{fname} in {self._path}')
        elif os.path.isfile(self._path) and zipfile.is_zipfile(self._path):
            self._type = 'zip'
            all_fnames = [fname for fname in self._get_zipfile().namelist() if not fname.endswith('/')]
        elif os.path.exists(self._path):
            raise ValueError(f'Dataset path {self._path} is neither a folder nor a .zip file')
        else:
            raise FileNotFoundError(f'Dataset not found: {self._path}')
        self._image_fnames = sorted(fname for fname in all_fnames
                                    if os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS and not is_hidden(fname)
                                    and (name_pattern is None or re.fullmatch(name_pattern, fname)))
        if not self._image_fnames:
            raise ValueError(f'No PNG/JPG images found in {self._path}')

        # Read every header (cheap: PIL does not decode pixels for .size/.mode) so that a stray
        # image of another size fails now, naming the file, instead of hours into training.
        shape = None
        for fname in self._image_fnames:
            with self._open_file(fname) as f, limits.open_image(f, f'Image {fname} in {self._path}') as image:
                width, height = image.size
                channels = channels_of(image.mode)
            if shape is None:
                _check_square_power_of_two(width, height, f'Image {fname} in {self._path}')
                if resolution is not None and width != resolution:
                    raise ValueError(f'Image {fname} in {self._path} is {width}x{height}, but resolution={resolution} was requested')
                shape = [channels, height, width]
            elif [channels, height, width] != shape:
                raise ValueError(f'Image {fname} in {self._path} is {width}x{height} with {channels} channel(s), but '
                                 f'{self._image_fnames[0]} is {shape[2]}x{shape[1]} with {shape[0]}; all images must match')
        name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        super().__init__(name=name, raw_shape=[len(self._image_fnames), *shape], **super_kwargs)

    # The zip file, opened lazily per process (handles must not be shared with DataLoader workers).
    def _get_zipfile(self):
        if self._zipfile is None:
            self._zipfile = zipfile.ZipFile(self._path)
        return self._zipfile

    # Binary file object of `fname` (a path relative to the folder / zip root, '/'-separated).
    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    # Close the zip file, if open.
    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
            self._zipfile = None

    # Pickling (DataLoader workers, spawn): never ship an open zip handle.
    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None)

    # Name the file in error messages.
    def _describe_raw_image(self, raw_idx):
        return f'Image {self._image_fnames[raw_idx]} in {self._path}'

    # Decode one image to uint8 CHW, grayscale staying one channel.
    def _load_raw_image(self, raw_idx):
        with self._open_file(self._image_fnames[raw_idx]) as f, limits.open_image(f, self._describe_raw_image(raw_idx)) as image:
            array = to_uint8_array(image, self._describe_raw_image(raw_idx))
        return array[np.newaxis] if array.ndim == 2 else array.transpose(2, 0, 1)

    # Labels from dataset.json; None when it is absent or its "labels" is null.
    def _load_raw_labels(self):
        if self._type == 'dir':
            json_path = os.path.join(self._path, 'dataset.json')
            if not os.path.isfile(json_path):
                return None
        elif 'dataset.json' not in self._get_zipfile().namelist():
            return None
        what = f'dataset.json in {self._path}'
        max_bytes = max_labels_json_bytes(len(self._image_fnames))
        if self._type == 'dir':
            if os.path.getsize(os.path.join(self._path, 'dataset.json')) > max_bytes:
                raise ValueError(f'{what} is larger than the limit of {max_bytes} bytes for {len(self._image_fnames)} images')
            with open(os.path.join(self._path, 'dataset.json'), 'rb') as f:
                text = f.read()
        else:
            text = limits.read_zip_member(self._get_zipfile(), 'dataset.json', max_bytes, what)
        try:
            meta = limits.loads_json(text, what)
            labels = meta.get('labels') if isinstance(meta, dict) else meta['labels']
            if labels is None:
                return None
            labels = dict(labels)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
            raise ValueError(f'dataset.json in {self._path} is malformed ({type(err).__name__}: {err}); expected '
                             '{"labels": [["path/in/dataset.png", class], ...]} or {"labels": null}') from None
        result = []
        for fname in self._image_fnames:
            if fname not in labels:
                raise ValueError(f'dataset.json in {self._path} has no label for {fname}')
            result.append(check_label(labels[fname], f'dataset.json in {self._path}, {fname}'))
        return np.array(result, dtype=np.int64)

# ----------------------------------------------------------------------------
# True for files inside hidden folders or macOS zip metadata, which are not part of a dataset (dataset_tool.py skips them too).

def is_hidden(fname):
    return any(part.startswith('.') or part == '__MACOSX' for part in fname.split('/'))

# ----------------------------------------------------------------------------
# scikit-learn's bundled handwritten digits, 1 channel, upscaled to `resolution`, labels 0..9.

class DigitsDataset(Dataset):
    def __init__(self,
        resolution      = 16,       # Output side: a power of two >= 8 (None = 16); 8 keeps the originals.
        **super_kwargs,             # Options of Dataset: max_size, use_labels, xflip, random_seed, cache.
    ):
        resolution = 16 if resolution is None else int(resolution)
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f'DigitsDataset resolution must be a power of two >= 8, got {resolution}')
        # Imported here: scikit-learn takes a second to import and only this dataset needs it.
        from sklearn.datasets import load_digits
        digits = load_digits()
        # The originals hold intensities 0..16; spread them over the full uint8 range.
        originals = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        if resolution != 8:
            originals = np.stack([np.array(PIL.Image.fromarray(image).resize((resolution, resolution), PIL.Image.Resampling.BILINEAR))
                                  for image in originals])
        self._images = originals[:, np.newaxis]
        self._labels = digits.target.astype(np.int64)
        super().__init__(name='digits', raw_shape=self._images.shape, **super_kwargs)

    # Images live in memory already.
    def _load_raw_image(self, raw_idx):
        return self._images[raw_idx]

    # Digit classes 0..9.
    def _load_raw_labels(self):
        return self._labels

# ----------------------------------------------------------------------------
# Constructor kwargs (with class_name) of the dataset for a --data value, for training_options.json.

def dataset_kwargs_for(path=None, **kwargs):
    """EasyDict for `dnnlib.util.construct_class_by_name`: None or 'digits' selects `DigitsDataset`,
    anything else an existing folder or .zip for `ImageFolderDataset`; `kwargs` are passed through."""
    if path is None or path == 'digits':
        return dnnlib.EasyDict(class_name='training.dataset.DigitsDataset', **kwargs)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Dataset not found: {path} (expected a folder or .zip of images, or 'digits')")
    return dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=path, **kwargs)

# ----------------------------------------------------------------------------
# Open the dataset for a --data value: None / 'digits' -> DigitsDataset, else ImageFolderDataset.

def open_dataset(path=None, **kwargs):
    return dnnlib.util.construct_class_by_name(**dataset_kwargs_for(path, **kwargs))
