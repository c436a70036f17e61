"""2D density estimation with K free points and Split-and-Prune (paper §4.1, `DDN.md` §5).

K points in the plane are the K nodes of one discrete distribution. Each step samples a batch from a
target density, moves each sample's nearest point toward it (gradient descent on the L2 distance,
Adam by default) and runs Split-and-Prune: the very `training.split_prune` code the networks use,
through a small `SplittableNodes` subclass whose node k is row k of a (K, 2) parameter.
`--balance=none` is the paper's ablation: plain gradient descent, which leaves dead points where
no data is and lets points born in dense regions keep too large a share (density shift).

Densities follow the conventions of the author's `distribution-playground` package: a probability
map on a square grid (row 0 at the top) over the domain [-1, 1]^2, sampled uniformly inside the
chosen cell, points as (x, y) with y up, and the KL divergence KL(P || Q) in nats between the
histogram P of the points on the density's grid (nearest cell) and the ground-truth map Q. `uniform`,
`gaussian` and `blur_circles` are rebuilt here after the package's recipes (the package imports
OpenCV, boxx and matplotlib at import time, too heavy for us, so it is never imported); the image maps
(`QR_code`, `spiral`, `words`) are read from the PNG files the package ships, which needs only
`pip install --no-deps distribution-playground`. Any image file path also works as a density.

Examples:
    python toy_2d.py --density blur_circles --k 1000 --steps 5000
    python toy_2d.py --density blur_circles --k 1000 --steps 5000 --balance none
    python toy_2d.py --density blur_circles,QR_code,spiral,words,gaussian,blur_circles \\
        --k 2000 --steps 2000 --gif density.gif
"""

import importlib.util
import math
import os
import time
from typing import NamedTuple

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import scipy.ndimage
import scipy.spatial
import torch
import tqdm
from torch import nn

import cli
from torch_utils import limits
from torch_utils.checkpoint import write_atomic
from training.split_prune import BALANCE_METHODS, SplittableNodes, balance

# ----------------------------------------------------------------------------
# Ground-truth densities: (n, n) float64 maps summing to 1, row 0 at the top (y = +1).

# Mass added to every cell of a map with empty cells, so that KL(P || Q) stays finite (as in
# distribution-playground: a point in an empty cell costs about P * 46 nats).
EMPTY_CELL_MASS = 1e-20

# The package's density images are named after their files; 'spiral' is spelled 'sprial' there.
ALIASES = {'spiral': 'sprial'}

def _normalise(img):
    img = np.asarray(img, dtype=np.float64)
    img = img / img.sum()
    img = img + EMPTY_CELL_MASS / img.size
    return img / img.sum()

def uniform_density(n):
    return np.full((n, n), 1.0 / (n * n))

def gaussian_density(n):
    ys, xs = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing='ij')
    img = np.exp(-(xs ** 2 + ys ** 2) / 0.3)
    return img / img.sum()

# OpenCV's GaussianBlur with sigma=0 derives sigma from the kernel size; same border (reflect-101).
def _blur_like_opencv(img, ksize):
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    out = scipy.ndimage.gaussian_filter(img.astype(np.float64), sigma, mode='mirror', truncate=((ksize - 1) / 2) / sigma)
    return np.rint(out).clip(0, 255).astype(np.uint8)

# Five rings (a disc of radius n/10 minus one of radius n/20); the four quadrants are blurred
# differently: none (top left), slightly, more, a lot (bottom right). After the package's recipe,
# which rasterises with OpenCV: our cells may differ from it on the ring borders.
def blur_circles_density(n):
    img = np.zeros((n, n), np.uint8)
    yy, xx = np.mgrid[:n, :n]
    r = n // 10
    for cx, cy in [(n // 2, n // 2), (n // 4, n // 4), (n * 3 // 4, n // 4), (n // 4, n * 3 // 4), (n * 3 // 4, n * 3 // 4)]:
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        img[d2 <= r * r] = 128
        img[d2 <= (r // 2) ** 2] = 0
    b1 = _blur_like_opencv(img, (n // 40) * 2 + 1)
    b2 = _blur_like_opencv(img, (n // 10) * 2 + 1)
    b3 = _blur_like_opencv(img, int((n / 2.5) * 2 + 1))
    h = n // 2
    img[:h, h:] = b1[:h, h:]
    img[h:, :h] = b2[h:, :h]
    img[h:, h:] = b3[h:, h:]
    return _normalise(img)

BUILTIN_DENSITIES = {'uniform': uniform_density, 'gaussian': gaussian_density, 'blur_circles': blur_circles_density}

# Folder of distribution-playground's density images, found without importing the package.
def playground_image_dir():
    spec = importlib.util.find_spec('distribution_playground')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], 'density_map_imgs')
    return path if os.path.isdir(path) else None

# Names accepted by load_density().
def density_names():
    names = list(BUILTIN_DENSITIES)
    folder = playground_image_dir()
    if folder is not None:
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(folder) if f.lower().endswith('.png'))
        names += [next((a for a, s in ALIASES.items() if s == stem), stem) for stem in stems]
    return names

# A grayscale image as a density: brighter = more likely; area-resized to (n, n).
def image_density(path, n):
    try:
        with limits.open_image(path, f'--density {path}') as image:
            img = image.convert('RGB')
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(f'--density {path}: cannot read the image: {err}') from None
    if img.size != (n, n):
        img = img.resize((n, n), PIL.Image.Resampling.BOX)
    gray = np.asarray(img, dtype=np.float64).mean(axis=2)
    if not gray.sum() > 0:
        raise click.ClickException(f'--density {path} is all black: a density needs some bright (likely) pixels')
    return _normalise(gray)

# Density map by name (see density_names()) or image path, on an (n, n) grid.
def load_density(name, n=100):
    if name in BUILTIN_DENSITIES:
        return BUILTIN_DENSITIES[name](n)
    if os.path.isfile(name):
        return image_density(name, n)
    folder = playground_image_dir()
    if folder is None:
        raise click.ClickException(f'Density {name!r} is neither built in ({", ".join(BUILTIN_DENSITIES)}) nor an image file; '
                                   'distribution-playground\'s densities (QR_code, spiral, words, ...) need '
                                   '`pip install --no-deps distribution-playground`')
    path = os.path.join(folder, ALIASES.get(name, name) + '.png')
    if not os.path.isfile(path):
        raise click.ClickException(f'Unknown density {name!r}; choose from {", ".join(density_names())} or give an image path')
    return image_density(path, n)

# ----------------------------------------------------------------------------
# Sampling and divergences, in the package's coordinates: (x, y) in [-1, 1]^2, y up.

# n samples (n, 2): a cell drawn with the map's probabilities, then a uniform position inside it.
def sample_density(density, n, rng):
    rows, cols = density.shape
    cdf = np.cumsum(density, axis=None)
    cell = np.searchsorted(cdf, rng.random(n) * cdf[-1], side='right').clip(0, density.size - 1)
    r, c = np.divmod(cell, cols)
    jitter = rng.random((n, 2))
    x = -1 + (c + jitter[:, 0]) * (2 / cols)
    y = 1 - (r + jitter[:, 1]) * (2 / rows)
    return np.stack([x, y], axis=1)

# The grid cell (row, col) of each point; points outside the domain go to the border cells.
def point_cells(xy, shape):
    xy = np.asarray(xy, dtype=np.float64)
    rows, cols = shape
    c = np.round((xy[:, 0] + 1) / (2 / cols) - 0.5).astype(np.int64).clip(0, cols - 1)
    r = np.round((1 - xy[:, 1]) / (2 / rows) - 0.5).astype(np.int64).clip(0, rows - 1)
    return r, c

# Histogram of the points on the density's grid, as probabilities.
def point_histogram(xy, shape):
    r, c = point_cells(xy, shape)
    hist = np.bincount(r * shape[1] + c, minlength=shape[0] * shape[1]).astype(np.float64)
    return (hist / hist.sum()).reshape(shape)

# KL(P || Q) in nats: P = histogram of the points, Q = the ground-truth map (as scipy.stats.entropy(P, Q)).
def kl_divergence(xy, density):
    p = point_histogram(xy, density.shape).ravel()
    q = density.ravel() / density.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))

# Number of points that are the nearest point of none of `samples` (dead nodes).
def count_dead(points, samples):
    nearest = scipy.spatial.cKDTree(points).query(samples)[1]
    return int(len(points) - np.unique(nearest).size)

# ----------------------------------------------------------------------------
# K free points as the K nodes of one discrete distribution: node k is row k of `points`.

class FreePoints(SplittableNodes):
    def __init__(self,
        K,                  # Number of points (nodes).
        init    = None,     # (K, 2) initial positions; default uniform in [-1, 1]^2.
    ):
        super().__init__(K, track_near2=False)     # O(K) statistics: K is large here.
        self.points = nn.Parameter(torch.rand(K, 2) * 2 - 1 if init is None else torch.as_tensor(init, dtype=torch.float32).clone())

    def node_params(self):
        return [(self.points, 1)]

    # Squared distances (B, K) of a batch (B, 2) to every point; record the selection statistics in
    # training; return the squared L2 distance (B,) of each sample to its selected point (the
    # nearest, after the balancing bias in training). Only the selected points get a gradient: the
    # (B, K) matrix is computed without autograd.
    def forward(self, batch):
        with torch.no_grad():
            dist = torch.cdist(batch, self.points).square_()
            if self.training:   # As in the DDL: the node set's selection (biased under --balance=bias).
                nearest = self.node_stats.select(dist)
            else:
                nearest = dist.argmin(dim=1)
        return (self.points[nearest] - batch).square().sum(dim=1)

# ----------------------------------------------------------------------------
# Fitting.

class FitResult(NamedTuple):
    frames:     list        # Snapshots (K, 2) of the points, one every `snapshot_every` steps.
    splits:     int         # Splits performed.
    seconds:    float       # Time spent in the optimisation loop.

def make_optimizer(model, name, lr):
    if name == 'adam':
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=lr)
    raise ValueError(f'Unknown optimizer {name!r}')

# Run `steps` optimisation steps of `model` on `density`. Each step: a batch of samples, the loss
# sum over the batch (each sample pulls its nearest point), the optimizer step, node balancing
# by `method` (see split_prune.balance; 'none' only folds the statistics).
def fit(model, optimizer, density, steps, batch, rng, method='tv', bias_rate=1e-2, snapshot_every=0, progress=None):
    model.train()
    frames, splits = [], torch.zeros([], dtype=torch.int64)
    chunk = 1000  # Steps whose samples are drawn at once.
    t0 = time.perf_counter()
    for start in range(0, steps, chunk):
        n = min(chunk, steps - start)
        samples = torch.from_numpy(sample_density(density, n * batch, rng).astype(np.float32)).view(n, batch, 2)
        for i in range(n):
            loss = model(samples[i]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            splits += balance(model, optimizer, method, bias_rate=bias_rate)
            step = start + i + 1
            if snapshot_every and step % snapshot_every == 0:
                frames.append(model.points.detach().numpy().copy())
            if progress is not None:
                progress.update(1)
    return FitResult(frames, int(splits), time.perf_counter() - t0)

# ----------------------------------------------------------------------------
# Pictures: the points (left) and the ground-truth density (right), as in the project page's GIF.

# Colour stops of the viridis colour map, dark to bright.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)

def colormap(values):
    v = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(v.astype(np.int64), len(_VIRIDIS) - 2)
    t = (v - i)[..., None]
    return (_VIRIDIS[i] * (1 - t) + _VIRIDIS[i + 1] * t).astype(np.uint8)

# The density map as an RGB (size, size) image.
def render_density(density, size):
    img = PIL.Image.fromarray(colormap(density / density.max()))
    return img.resize((size, size), PIL.Image.Resampling.NEAREST)

# The points as dots on white, (size, size) RGB: each point darkens a square of `dot` pixels (by
# default about a quarter of the spacing of K evenly spread points, so sparse sets stay visible).
def render_points(xy, size, dot=None, alpha=0.8):
    if dot is None:
        dot = int(np.clip(round(size / math.sqrt(max(len(xy), 1)) / 4), 1, 4))
    px = np.floor((xy[:, 0] + 1) / 2 * size).astype(np.int64)
    py = np.floor((1 - xy[:, 1]) / 2 * size).astype(np.int64)
    inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    count = np.bincount(py[inside] * size + px[inside], minlength=size * size).reshape(size, size)
    if dot > 1:
        count = scipy.ndimage.convolve(count, np.ones((dot, dot), np.int64), mode='constant')
    ink = 1 - (1 - alpha) ** count                                      # Opacity after `count` dots.
    colour = np.array([20, 45, 140], dtype=np.float64)
    img = 255 * (1 - ink[..., None]) + colour * ink[..., None]
    return PIL.Image.fromarray(img.astype(np.uint8))

# One GIF frame: points | density, with a caption.
def render_frame(xy, density, size, caption=''):
    frame = PIL.Image.new('RGB', (2 * size, size), 'white')
    frame.paste(render_points(xy, size), (0, 0))
    frame.paste(render_density(density, size), (size, 0))
    if caption:
        PIL.ImageDraw.Draw(frame).text((4, 2), caption, fill=(0, 0, 0))
    return frame

def save_gif(frames, path, duration_ms=80):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: frames[0].save(f, format='gif', save_all=True, append_images=frames[1:], duration=duration_ms, loop=0))

# ----------------------------------------------------------------------------
# Command line.

@click.command()
@click.option('--density',          help='Density name(s), comma separated, or image path(s)', metavar='LIST', default='blur_circles', show_default=True)
@click.option('--k',                help='Number of points K', metavar='INT', type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--steps',            help='Optimisation steps per density', metavar='INT', type=click.IntRange(min=1), default=5000, show_default=True)
@click.option('--batch',            help='Samples per step', metavar='INT', type=click.IntRange(min=1), default=40, show_default=True)
@click.option('--lr',               help='Learning rate  [default: adam 0.01 / sqrt(K), sgd 0.05]', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True), default=None)
@click.option('--opt',              help='Optimizer', type=click.Choice(['adam', 'sgd']), default='adam', show_default=True)
@click.option('--balance', 'method', help='Node balancing: Split-and-Prune (tv or paper test), a selection bias (nothing split), or none (the plain gradient-descent ablation)', type=click.Choice(list(BALANCE_METHODS)), default='tv', show_default=True)
@click.option('--bias-rate',        help='--balance=bias: step of the log-distance bias per step', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option('--bins',             help='Grid size of the densities and of the KL histogram', metavar='INT', type=click.IntRange(min=2), default=100, show_default=True)
@click.option('--seed',             help='Random seed', metavar='INT', type=cli.seed_range(), default=0, show_default=True)
@click.option('--carry-over/--no-carry-over', help='Keep the points (and optimizer) from one density to the next [default: only with --gif]', default=None)
@click.option('--out',              help='Save the final points (K, 2) to this .npy', metavar='NPY', type=str, default=None)
@click.option('--gif',              help='Render the optimisation to this GIF', metavar='GIF', type=str, default=None)
@click.option('--frames',           help='GIF frames per density', metavar='INT', type=click.IntRange(min=1), default=24, show_default=True)
@click.option('--size',             help='GIF panel size in pixels', metavar='INT', type=click.IntRange(min=16), default=256, show_default=True)
@click.option('--force',            help='Replace an existing --out .npy / --gif GIF', is_flag=True)
def main(density, k, steps, batch, lr, opt, method, bias_rate, bins, seed, carry_over, out, gif, frames, size, force):
    """Fit K free points to 2D densities with gradient descent and Split-and-Prune; print KL divergences.

    Prints, for each density, the KL divergence of the fitted points to the ground truth, that of K
    real samples (the paper's reference), the dead points and the speed; the last line is
    `kl=<x>` for the last density.
    """
    names = [name.strip() for name in density.split(',') if name.strip()]
    if not names:
        raise click.BadParameter('give at least one density', param_hint='--density')
    for path, ext, option in ((out, '.npy', '--out'), (gif, '.gif', '--gif')):   # Checked before the work.
        if path is not None and (os.path.isdir(path) or not path.lower().endswith(ext)):
            raise click.BadParameter(f'{path}: give a file name ending in {ext}', param_hint=option)
        if path is not None:
            magic, what = (cli.NPY_MAGIC, 'a .npy array') if ext == '.npy' else (cli.GIF_MAGIC, 'a GIF image')
            cli.check_output_file(path, force, cli.starts_with(magic), what, option=option)
    maps = [load_density(name, bins) for name in names]
    if lr is None:
        # Adam moves a point by about lr per hit, whatever the distance: keep that a fraction of the
        # spacing of K points in the square, which goes as 1 / sqrt(K). SGD moves it by 2 lr of the way.
        lr = 0.01 / math.sqrt(k) if opt == 'adam' else 0.05
    if carry_over is None:
        carry_over = gif is not None
    torch.set_num_threads(1)  # Tiny tensors: a thread pool costs more than it gives (and varies under load).
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    snapshot_every = max(steps // frames, 1) if gif else 0

    model = optimizer = None
    gif_frames, kl = [], math.nan
    for name, gt in zip(names, maps):
        if model is None or not carry_over:
            model = FreePoints(k)
            optimizer = make_optimizer(model, opt, lr)
        else:
            model.node_stats.reset()  # The statistics describe the previous density.
        with tqdm.tqdm(total=steps, desc=name, unit='step', leave=False) as progress:
            result = fit(model, optimizer, gt, steps, batch, rng, method=method, bias_rate=bias_rate,
                         snapshot_every=snapshot_every, progress=progress)
        points = model.points.detach().numpy().astype(np.float64)
        kl = kl_divergence(points, gt)
        kl_real = kl_divergence(sample_density(gt, k, rng), gt)
        dead = count_dead(points, sample_density(gt, max(100 * k, 100_000), rng))
        print(f'{name:14s} K={k} steps={steps} balance={method} kl={kl:.4f} kl_real_samples={kl_real:.4f} '
              f'dead={dead} splits={result.splits} steps_per_s={steps / result.seconds:.3g}')
        for i, xy in enumerate(result.frames):
            gif_frames.append(render_frame(xy, gt, size, f'{name}  step {(i + 1) * snapshot_every}'))
    for path, option, write in ((out, '--out', lambda: write_atomic(out, lambda f: np.save(f, model.points.detach().numpy()))),
                                (gif, '--gif', lambda: save_gif(gif_frames, gif))):
        try:
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                write()
        except OSError as err:
            raise cli.write_error(err, option, path) from None
    print(f'kl={kl:.6f}')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
