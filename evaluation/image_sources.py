"""The images a metric measures, as this rank's uint8 RGB NCHW batches: a folder or zip of image
files (a generate.py --outdir gives its samples only), a dataset (all images or `num` chosen with a
seed, shared out over the ranks), an iterable of batches, or samples streamed straight from a DDN.
"""

import os

import numpy as np
import torch
import tqdm

from torch_utils import distributed as dist
from training.conditions import condition_kind, make_condition_fn
from training.dataset import GENERATED_IMAGE_PATTERN, GENERATED_MARKER, ImageFolderDataset
from evaluation.detectors import detector_features
from sampling.generation import generate_batches

# ----------------------------------------------------------------------------
# Image batches.

# Stack dataset items (uint8 CHW array, label) into one uint8 NCHW tensor, dropping the labels.
def collate_images(items):
    return torch.from_numpy(np.stack([np.asarray(image) for image, _label in items]))

# Check a batch is uint8 NCHW and give the detector 3 channels (grayscale is repeated).
def to_rgb(images):
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f'Expected uint8 NCHW image batches, got {images.dtype} of shape {tuple(images.shape)}')
    if images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise ValueError(f'Expected 1 or 3 image channels, got {images.shape[1]}')
    return images

# Indices of the images to use: all, or `num` chosen at random with `seed`, so every rank agrees on the set.
def select_indices(total, num, seed, what):
    if num is None:
        return np.arange(total)
    if num > total:
        raise ValueError(f'Asked for {num} images but {what} has only {total}; ask for at most {total}')
    return np.sort(np.random.RandomState(seed).choice(total, size=num, replace=False))

# The images of a folder or zip. A generate.py --outdir (it holds generation_options.json) gives its
# samples only, not grid.png.
def scan_folder(path):
    generated = os.path.isfile(os.path.join(os.fspath(path), GENERATED_MARKER))
    return ImageFolderDataset(os.fspath(path), name_pattern=GENERATED_IMAGE_PATTERN if generated else None)

# This rank's uint8 RGB NCHW batches (at most `batch` images each) from a folder or zip path, a dataset
# (`num` images chosen with `seed`, or all; rank r takes images r, r + W, ... of them) or an iterable of
# batches (each rank passes its own share, used as given).
def image_batches(source, batch=64, num=None, seed=0, workers=2, progress=True):
    what = f'"{os.fspath(source)}"' if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        source = scan_folder(source)
    if isinstance(source, torch.utils.data.Dataset):
        share = select_indices(len(source), num, seed, what)[dist.get_rank()::dist.get_world_size()]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(source, share.tolist()),
            batch_size=batch, num_workers=workers, collate_fn=collate_images)
    elif num is not None:
        raise ValueError('num/seed choose images from a dataset; an iterable of batches is used as given '
            '(each rank passes its own share)')
    else:
        loader = source
    for images in tqdm.tqdm(loader, unit='batch', disable=(not progress or dist.get_rank() != 0)):
        yield from to_rgb(images).split(batch)

# Samples of a DDN for `seeds` (this rank's share), as uint8 NCHW batches straight from the network; the
# same images as `generate.py --seeds` (sampling/generation.py; a class-conditional net draws each seed's class).
def generator_batches(net, seeds, batch=64):
    if condition_kind(net) not in (None, 'class'):
        raise ValueError(f'Unconditional metrics need samples without a condition image; this network is '
                         f'conditioned on {net.condition!r}')
    condition_fn = make_condition_fn(net, net.init_feature.device)
    for b in generate_batches(net, seeds, batch, condition_fn=condition_fn):
        yield b.images

# Detector features of this rank's images (any source of image_batches), one (B, D) tensor per batch.
def compute_features(source, detector, batch=64, device=None, num=None, seed=0, progress=True, workers=2):
    device = dist.device() if device is None else torch.device(device)
    for images in image_batches(source, batch=batch, num=num, seed=seed, workers=workers, progress=progress):
        yield detector_features(detector, images, device)

# ----------------------------------------------------------------------------
