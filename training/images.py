"""Pixels and picture files: the one place that turns network outputs into uint8 images, grids and PNGs.

Pixel convention (EDM): the network works in [-1, 1]; an image is saved as uint8 `x * 127.5 + 128`
truncated and clipped to [0, 255] (so 0 -> 128, and the boundaries -1 / 1 -> 0 / 255), and read back
as `u / 127.5 - 1`. Every script and the training loop use these functions, so a sample grid written
during training, `generate.py`'s PNGs and the demo show the same pixel values for the same image.

Also here: which PIL modes are grayscale (`GRAYSCALE_MODES`, for datasets and guide files alike), and the
reconstruction PSNR of uint8 images (`psnr` per image, `mean_psnr` the figure every report prints).
"""

import math
import os

import numpy as np
import PIL.Image
import torch

from torch_utils.checkpoint import check_writable, write_atomic

# PIL modes that hold one channel (grayscale); every other mode is RGB (alpha dropped) for our images.
GRAYSCALE_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F')

# Channels (1 or 3) of our image made from a PIL image of mode `mode`.
def channels_of(mode):
    return 1 if mode in GRAYSCALE_MODES else 3

# Grids upscale their cells (nearest) to at least this many pixels, so 16 px digits stay legible.
GRID_MIN_CELL = 32

# ----------------------------------------------------------------------------
# [-1, 1] floats <-> uint8.

def to_uint8(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

def to_float(images):
    return images.to(torch.float32) / 127.5 - 1

# Reconstruction PSNR: the PSNR (dB) of each uint8 image pair (N, C, H, W), 10 log10(255^2 / MSE of
# that image), in float64; inf for identical images. Reports give the mean over the images with finite
# PSNR (`mean_psnr`), the usual figure of codecs and reconstruction papers.
def psnr(images, originals):
    mse = (images.to(torch.float64) - originals.to(torch.float64)).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)

# (mean over the images with finite PSNR or inf if none, number of exact images) of per-image PSNRs.
def mean_psnr(values):
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    finite = values[torch.isfinite(values)]
    return (float(finite.mean()) if finite.numel() else float('inf')), int(values.numel() - finite.numel())

# ----------------------------------------------------------------------------
# uint8 CHW arrays <-> PIL images and PNG files.

# A PIL image of one uint8 CHW array (or tensor): 'L' for one channel, 'RGB' for three.
def to_pil(image):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(f'Expected a uint8 (1 or 3, H, W) image, got {image.dtype} of shape {image.shape}')
    return PIL.Image.fromarray(image[0], 'L') if image.shape[0] == 1 else PIL.Image.fromarray(image.transpose(1, 2, 0), 'RGB')

# An open PIL image converted to `channels` (1: PIL's Rec.601 'L'; 3: 'RGB', gray repeated, alpha
# dropped), which must be square; `source` names it in the error.
def square_pil(image, channels, source='Image'):
    if channels not in (1, 3):
        raise ValueError(f'channels must be 1 or 3, got {channels}')
    image = image.convert('L' if channels == 1 else 'RGB')
    w, h = image.size
    if w != h:
        raise ValueError(f'{source} is {w}x{h}; it must be square')
    return image

# An 'L' or 'RGB' PIL image as a (1, C, H, W) float32 tensor in [-1, 1].
def pil_to_float(image):
    array = np.array(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return to_float(torch.from_numpy(array))[None]

# Write a uint8 CHW image (or a PIL image) as a PNG, atomically (a temporary file, then a rename).
def save_png(image, path):
    pil = image if isinstance(image, PIL.Image.Image) else to_pil(image)
    write_atomic(path, lambda f: pil.save(f, format='png'))

# File of image `name`: outdir/{name:06d}.png, or outdir/{thousands:06d}/{name:06d}.png with subdirs.
def image_path(outdir, name, subdirs=False):
    if subdirs:
        return os.path.join(outdir, f'{name - name % 1000:06d}', f'{name:06d}.png')
    return os.path.join(outdir, f'{name:06d}.png')

# ----------------------------------------------------------------------------
# Grids.

def make_grid(images, cols=None, min_cell=GRID_MIN_CELL, gap=0, fill=0):
    """Tile uint8 (N, C, H, W) images row by row into one (C, H', W') uint8 grid.

    `cols` defaults to ceil(sqrt(N)); cells are nearest-upscaled by max(1, min_cell // min(H, W));
    `gap` pixels separate neighbouring cells (none around the border); gaps and empty cells are `fill`.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f'Expected uint8 (N, C, H, W) images, got {images.dtype} of shape {images.shape}')
    n, c, h, w = images.shape
    scale = max(1, min_cell // min(h, w))
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((c, rows * (h + gap) - gap, cols * (w + gap) - gap), fill, dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[:, r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = image
    return grid

# Two grids of equal height side by side with a white gap: originals | reconstructions.
def side_by_side(left, right):
    gap = np.full((left.shape[0], left.shape[1], max(2, left.shape[2] // 64)), 255, dtype=np.uint8)
    return np.concatenate([left, gap, right], axis=2)

# ----------------------------------------------------------------------------
# Output paths.

# Raise ValueError unless `out` can become a PNG file: a name ending in .png, not a folder, in a place we
# may write (its folder may not exist yet). Scripts turn the error into click.BadParameter for --out.
def check_png_out(out):
    if os.path.isdir(out):
        raise ValueError(f'{out} is a folder; give a file name ending in .png')
    if os.path.splitext(out)[1].lower() != '.png':
        raise ValueError(f'{out}: the output is a PNG; give a name ending in .png')
    check_writable(out)
