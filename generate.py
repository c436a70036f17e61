"""Generate images with a trained DDN: samples from seeds (optionally guided toward a condition),
decoded latents, or reconstructions of a dataset; optionally measure FID (and IS) of the result on
the fly. EDM's `generate.py`, for DDN.

Three modes, one output layout (`--outdir`):
- sample (default): `--seeds 0-49999` -> `{seed:06d}.png`; seed s always gives the same image,
  whatever `--batch` and the number of processes (per-seed codes, batch-invariant kernels);
- decode: `--codes latents.npz` -> the images of given latents (a file written by this script);
- reconstruct: `--reconstruct DATA` -> L2-guided encoding of dataset images (folder, zip or
  `digits`), their reconstructions `{index:06d}.png`, and MSE / PSNR against the originals.
Every mode also writes `latents.npz` (`seeds` or `indices` (N,), `codes` (N, L), `ks` (L,), sorted by
name; decoding it reproduces the images exactly), `grid.png` (the first 100 images; in reconstruct
mode originals | reconstructions) and `generation_options.json` (the options of the run, guide and
condition included). `--fid-ref` streams the generated uint8 batches straight into the detector (no
PNG is read back) and writes `metrics.json`; the last printed line is `fid=...`.

Guided sampling (zero-shot conditional generation, DDN.md §5, `training/guidance.py`): with
`--guide TYPE[:WEIGHT],...` every layer scores its K candidates against a condition and keeps the
lowest distance (argmin, exact ties broken by the seed), or `--guide-temp T` samples from
softmax(-z / T) of the per-sample z-scored distances, or `--guide-topk N` takes one of the N best
uniformly. Every random choice is drawn from the seed's own uniforms, so a guided image is as
deterministic per seed as a plain sample (whatever the batch or the number of processes). Several
guides are z-scored and weighted (`--guide inpaint:1,color:0.5`). The guide inputs (`--guide-image`,
`--guide-mask`, ...) are one condition shared by every seed: many samples of one condition; for one
condition per image, run once per condition. The classifier guide's target class is `--class`; on a
class-conditional network that same class also conditions the network. The mean guide distance of
the saved images goes to `metrics.json` (`guide_distance`).

Conditional networks (`net.condition`, DDN.md §6): class-conditional nets take `--class` (else a class
drawn from each seed); color / edge / resizeN nets take `--condition-image`, from which the condition
is computed as in training, in eval mode (color: the mean grayscale; edge: the thresholded Sobel map;
resizeN: the N x N area downsample). Guidance combines with a condition. Reconstruction derives each
image's condition from the image itself (and its dataset label). latents.npz stores the condition of
every image (`classes` (N,), or `conditions` (N or 1, C, h, w)), so decoding it reproduces the images;
`--class` / `--condition-image` replace the stored condition when decoding.

Under `torchrun --standalone --nproc_per_node=N` the work is split across ranks (strided); latents,
grid images and statistics are gathered to rank 0, which writes the shared files.

Pixel convention (EDM): the network works in [-1, 1]; images are saved as uint8 (x * 127.5 + 128)
clipped to [0, 255], and read back as x = u / 127.5 - 1. Reconstruction MSE and PSNR are measured
on the uint8 images as saved, i.e. in the [0, 255] range (PSNR = 10 log10(255^2 / MSE)).

SECURITY: `--network` reads the safe format (.safetensors) or our snapshot pickles through a restricted
unpickler that runs nothing from the file; guide classifiers and feature networks are TorchScript.
Other pickles load only with `--trust-pickle` (they run code). See training/snapshot.py.
"""

import json
import math
import os
import pickle
import re
from typing import Iterator, NamedTuple, Optional

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from dnnlib.util import format_int_list, parse_int_list  # noqa: F401 (zscg.py imports it here until the refactor)
import fid
from torch_utils import checkpoint
from torch_utils.checkpoint import write_atomic as _write_atomic
from torch_utils import distributed as dist
from training import guidance, guide_spec, snapshot
from training.conditions import parse_condition
from training.dataset import open_dataset
from training.ddl import resize_area
from training.images import image_path, make_grid, side_by_side, to_float, to_pil, to_uint8  # noqa: F401 (used by scripts until they import training.images)

# Images in the preview grid, and the smallest grid cell (smaller images are upscaled, nearest).
GRID_IMAGES = 100
GRID_MIN_CELL = 32

# Inception Score is computed over 10 splits, so it needs at least this many images.
IS_MIN_IMAGES = 10

# Most seeds one --seeds list may hold (a typo such as 0-99999999999 would otherwise fill the memory).
MAX_SEEDS = 10_000_000

# Files of an earlier run in an --outdir, removed by --force (besides the {name:06d}.png images).
OUTPUT_FILES = ('latents.npz', 'grid.png', 'generation_options.json', 'metrics.json')

# ----------------------------------------------------------------------------
# Parsing of seed lists: '1,5,9-12' -> [1, 5, 9, 10, 11, 12].

# click callback around parse_int_list.
def _seeds_option(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_int_list(value, max_values=MAX_SEEDS)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e

# ----------------------------------------------------------------------------
# Loading the network (training/snapshot.py): a safe .safetensors or a snapshot pickle (path or URL,
# cached), or the newest snapshot of a run folder. Pickles load through the restricted unpickler
# unless --trust-pickle.

resolve_network = snapshot.resolve_network

def load_network(network, device, trust_pickle=False):
    """(path, network): the EMA generator of `--network` in eval mode on `device` (see training/snapshot.py)."""
    return snapshot.load_network(network, device, trust_pickle=trust_pickle)

# ----------------------------------------------------------------------------
# latents.npz

def save_latents(path, name_key, names, codes, ks, classes=None, conditions=None, network=None):
    """`names` (N,) under `name_key` ('seeds' or 'indices'), `codes` (N, L) and `ks` (L,), all int64;
    for conditional networks also `classes` (N,) int64 or `conditions` (N or 1, C, h, w) float32;
    `network`: the fingerprint of the network that made them (snapshot.fingerprint), a string."""
    arrays = {name_key: np.asarray(names, np.int64).reshape(-1),
              'codes': np.asarray(codes, np.int64).reshape(len(names), len(ks)),
              'ks': np.asarray(ks, np.int64)}
    if network is not None:
        arrays['network'] = np.asarray(network)
    if classes is not None:
        arrays['classes'] = np.asarray(classes, np.int64).reshape(-1)
    if conditions is not None:
        arrays['conditions'] = np.asarray(conditions, np.float32)
    _write_atomic(path, lambda f: np.savez(f, **arrays))

def load_latents(path, ks):
    """(name_key, names, codes) from a latents file, checked against a network with K per layer `ks`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Codes file not found: {path}')
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except Exception as e:
        raise ValueError(f'Cannot read codes file {path} (expected a latents.npz written by generate.py): {e}') from e
    if 'codes' not in data:
        raise ValueError(f'Codes file {path} has no "codes" array (keys: {sorted(data)})')
    codes = data['codes']
    L = len(ks)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f'Codes in {path} must be an (N, L) integer array, got {codes.dtype} of shape {codes.shape}')
    if codes.shape[1] != L:
        raise ValueError(f'Codes in {path} have L={codes.shape[1]} layers, but the network has L={L}')
    if 'ks' in data and list(np.asarray(data['ks']).reshape(-1)) != list(ks):
        file_ks = np.asarray(data['ks']).reshape(-1).tolist()
        bad = next((l for l in range(min(len(file_ks), L)) if file_ks[l] != ks[l]), min(len(file_ks), L))
        raise ValueError(f'Codes in {path} were made for K={file_ks[bad] if bad < len(file_ks) else "?"} at layer {bad}, '
                         f'but the network has K={ks[bad]} there: a different network')
    out_of_range = (codes < 0) | (codes >= np.asarray(ks)[None, :])
    if out_of_range.any():
        row, l = np.argwhere(out_of_range)[0]
        raise ValueError(f'Codes in {path}: row {row} has code {codes[row, l]} at layer {l}, outside [0, K={ks[l]})')
    name_key = next((key for key in ('seeds', 'indices') if key in data), 'indices')
    names = data.get(name_key, np.arange(codes.shape[0]))
    names = np.asarray(names).reshape(-1)
    if names.shape[0] != codes.shape[0]:
        raise ValueError(f'{path}: {names.shape[0]} {name_key} for {codes.shape[0]} rows of codes')
    return name_key, names.astype(np.int64), codes.astype(np.int64)

def latents_network(path):
    """The fingerprint of the network that made a latents file, or None (older files)."""
    with np.load(path, allow_pickle=False) as npz:
        return str(npz['network']) if 'network' in npz.files else None

def load_latent_conditions(path, net, num):
    """The conditions stored with `num` rows of latents for a conditional `net`: (classes (num,) or
    None, conditions (num or 1, C, h, w) or None). Raises ValueError if they do not fit the network."""
    with np.load(path, allow_pickle=False) as npz:
        classes = npz['classes'] if 'classes' in npz.files else None
        conditions = npz['conditions'] if 'conditions' in npz.files else None
    if classes is not None:
        label_dim = int(getattr(net, 'label_dim', 0) or 0)
        classes = np.asarray(classes).reshape(-1)
        if classes.shape[0] != num or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f'{path}: "classes" must hold {num} integers, got {classes.dtype} of shape {classes.shape}')
        if label_dim and (classes.min() < 0 or classes.max() >= label_dim):
            raise ValueError(f'{path}: classes outside [0, {label_dim}) of the network')
    if conditions is not None:
        cond_channels = getattr(net, 'cond_channels', None)
        if conditions.ndim != 4 or conditions.shape[0] not in (1, num) or conditions.shape[1] != cond_channels:
            raise ValueError(f'{path}: "conditions" of shape {conditions.shape} do not fit {num} rows of a network '
                             f'conditioned on {net.condition!r} ({cond_channels} channel(s))')
    return classes, conditions

# ----------------------------------------------------------------------------
# Conditions of conditional networks (DDN.md §6): class labels, or a condition image that becomes
# the network's condition exactly as in training (`net.make_condition`), in eval mode.

# The network's kind of condition: None (unconditional), 'class', 'color', 'edge' or 'resize'.
def condition_kind(net):
    spec = getattr(net, 'condition', None)
    return None if spec is None else parse_condition(spec).kind

# One-hot rows (B, label_dim) of class indices.
def one_hot(classes, label_dim, device):
    return torch.eye(label_dim, device=device)[torch.as_tensor(list(classes), dtype=torch.long, device=device)]

# Class of each seed for a class-conditional network: the given class, or one drawn from the seed.
def seed_classes(seeds, label_dim, class_idx=None):
    if class_idx is not None:
        return [class_idx] * len(seeds)
    return [int(np.random.RandomState(seed).randint(label_dim)) for seed in seeds]

def load_condition_image(net, path, device):
    """The condition (1, C', h, w) of a color / edge / resizeN network from an image file.

    The file is read with the network's channels (a grayscale file is repeated to RGB, whose mean is
    the same gray, so a color net accepts grayscale and RGB files alike) and must be square. For color
    and edge nets it is area-resized (bilinear up) to the network's resolution, the size training saw;
    a resizeN net takes any image of at least N x N (an N x N one as is). Then `net.make_condition`.
    """
    kind, size = parse_condition(net.condition)
    try:
        with PIL.Image.open(path) as image:
            image = image.convert('L' if net.img_channels == 1 else 'RGB')
    except OSError as e:
        raise OSError(f'--condition-image: cannot read {path}: {e}') from e
    array = np.asarray(image, dtype=np.uint8)
    h, w = array.shape[:2]
    if w != h:
        raise ValueError(f'--condition-image {path} is {w}x{h}; condition images must be square')
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    x = to_float(torch.from_numpy(array.copy())[None].to(device))
    if kind == 'resize':
        if w < size:
            raise ValueError(f'--condition-image {path} is {w}x{w}, smaller than the {size}x{size} '
                             f'condition of this {net.condition} network')
    elif w != net.img_resolution:
        x = resize_area(x, net.img_resolution)
    return net.make_condition(images=x)

def make_condition_fn(net, device, class_idx=None, shared=None, classes=None, conditions=None, rows_of=None):
    """names -> the condition (B, ...) of those images for a conditional `net`; None if unconditional.
    Class nets: `class_idx` for every image, else `classes[rows_of[name]]` (stored with latents), else a
    class drawn from each seed. Image nets: the `shared` condition (1, C', h, w) for every image, else
    `conditions[rows_of[name]]` (stored with latents; a single stored row applies to all)."""
    kind = condition_kind(net)
    if kind is None:
        return None

    def condition_fn(names):
        if kind == 'class':
            if class_idx is None and classes is not None:
                return one_hot([classes[rows_of[n]] for n in names], net.label_dim, device)
            return one_hot(seed_classes(names, net.label_dim, class_idx), net.label_dim, device)
        if shared is not None:
            return shared.expand(len(names), -1, -1, -1)
        rows = [rows_of[n] for n in names] if conditions.shape[0] > 1 else [0] * len(names)
        return torch.from_numpy(conditions[rows]).to(device)
    return condition_fn

# What latents.npz keeps of the condition of each image: the class of one-hot rows; an image as is.
def _classes_of(condition):
    return condition.argmax(1)

def _image_condition(condition):
    return condition.float()

# ----------------------------------------------------------------------------
# Guidance (zero-shot conditional generation): the scorer of --guide and the choice rule.

# Guide options: (CLI option, the guide types that read it).
GUIDE_OPTIONS = {
    'guide_image':      ('--guide-image',       ('l2', 'superres', 'inpaint', 'color', 'lowbit', 'edge', 'style')),
    'guide_mask':       ('--guide-mask',        ('inpaint',)),
    'guide_bits':       ('--guide-bits',        ('lowbit',)),
    'guide_classifier': ('--guide-classifier',  ('classifier',)),
    'guide_text':       ('--guide-text',        ('clip',)),
    'guide_style':      ('--guide-style',       ('style',)),
    'guide_features':   ('--guide-features',    ('style',)),
    'guide_temp':       ('--guide-temp',        tuple(guide_spec.GUIDE_TYPES)),
    'guide_topk':       ('--guide-topk',        tuple(guide_spec.GUIDE_TYPES)),
}

def make_chooser(temperature=None, topk=None):
    """The choice rule of guided layers and its description: argmin (exact ties broken by the seed's
    uniform), softmax(-z / T) sampling, or a uniform choice among the N best; all draw from the seed."""
    if temperature is not None and topk is not None:
        raise click.UsageError('--guide-temp and --guide-topk are two choice rules; give one of them')
    if topk is not None:
        return guidance.TopKChooser(topk), dict(rule='topk', topk=topk)
    if temperature is not None:
        return guidance.TemperatureChooser(temperature), dict(rule='temperature', temperature=temperature)
    return guidance.argmin, dict(rule='argmin')

def check_guide_options(opts, guide_types):
    """Usage errors for guide inputs that no guide of `--guide` reads (or given without --guide)."""
    for key, (option, readers) in GUIDE_OPTIONS.items():
        if opts.get(key) is None:
            continue
        if not guide_types:
            raise click.UsageError(f'{option} is only used with --guide')
        if not set(readers) & set(guide_types):
            raise click.UsageError(f'{option} is not read by --guide {opts.guide} (only by {", ".join(readers)})')

def build_guide(opts, net, device):
    """The CombinedScorer of `opts.guide` (None without one), its inputs loaded from their files
    and checked against the network by `guidance.parse_guides`."""
    if opts.guide is None:
        return None
    try:
        return guide_spec.parse_guides(opts.guide, img_channels=net.img_channels, img_resolution=net.img_resolution,
            image=opts.guide_image, mask=opts.guide_mask, bits=opts.guide_bits, classifier=opts.guide_classifier,
            class_idx=opts.class_idx, text=opts.guide_text, style=opts.guide_style, features=opts.guide_features,
            device=device, trust_pickle=opts.get('trust_pickle', False))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(f'--guide {opts.guide}: {e}') from e
    except ImportError as e:
        raise click.ClickException(f'--guide {opts.guide}: {e}') from e

# ----------------------------------------------------------------------------
# The three modes, each a stream of batches of this rank's share of the work.

class Batch(NamedTuple):
    names:      list                    # Seed or index of each image (its file name).
    images:     torch.Tensor            # (B, C, H, W) uint8, CPU.
    codes:      torch.Tensor            # (B, L) int64 latent, CPU.
    originals:  Optional[torch.Tensor]  # (B, C, H, W) uint8 originals (reconstruct mode), or None.
    conditions: Optional[torch.Tensor] = None   # Condition of each image (conditional nets), CPU, or None.

# This rank's strided share of a list, split into batches.
def _rank_batches(items, batch):
    share = list(items)[dist.get_rank()::dist.get_world_size()]
    return [share[i:i + batch] for i in range(0, len(share), batch)]

def _cpu(x):
    return None if x is None else x.cpu()

# Sampling: per-seed codes, so the image of a seed does not depend on the batch it is in. With a
# scorer, guided layers choose with `chooser`, which draws its randomness from the same per-seed uniforms.
@torch.no_grad()
def sample_batches(net, chunks, condition_fn=None, scorer=None, chooser=None):
    for seeds in chunks:
        condition = None if condition_fn is None else condition_fn(seeds)
        out = net(seeds=seeds, condition=condition, scorer=scorer, chooser=chooser)
        yield Batch(seeds, to_uint8(out.images).cpu(), out.codes.cpu(), None, _cpu(condition))

# Decoding: the rows of `codes` named by each chunk of names.
@torch.no_grad()
def decode_batches(net, chunks, rows_of, codes, condition_fn=None):
    device = net.init_feature.device
    for names in chunks:
        c = torch.from_numpy(codes[[rows_of[n] for n in names]]).to(device)
        condition = None if condition_fn is None else condition_fn(names)
        out = net(codes=c, condition=condition)
        yield Batch(names, to_uint8(out.images).cpu(), out.codes.cpu(), None, _cpu(condition))

# Reconstruction: L2-guided encoding of dataset images; the codes decode to the same image.
# `condition_fn(images, indices)` gives the condition of a conditional net from the images themselves.
@torch.no_grad()
def reconstruct_batches(net, chunks, dataset, condition_fn=None):
    device = net.init_feature.device
    for indices in chunks:
        originals = torch.from_numpy(np.stack([dataset[i][0] for i in indices]))
        x = to_float(originals.to(device))
        condition = None if condition_fn is None else condition_fn(x, indices)
        codes, recon = net.encode(x, condition=condition)
        yield Batch(indices, to_uint8(recon).cpu(), codes.cpu(), originals, _cpu(condition))

# ----------------------------------------------------------------------------
# Writing the images of a stream and keeping what rank 0 needs afterwards.

class Recorder:
    def __init__(self,
        outdir,                         # Output folder.
        subdirs,                        # One subfolder per 1000 names.
        grid_names,                     # Names whose images go to grid.png.
        record_conditions = None,       # Batch conditions -> what latents.npz keeps per image; None = nothing.
        scorer          = None,         # Guide scorer: measure the guide distance of the saved images.
        device          = 'cpu',        # Where the scorer runs.
    ):
        self.outdir = outdir
        self.subdirs = subdirs
        self.grid_names = set(grid_names)
        self.record_conditions = record_conditions
        self.scorer = scorer
        self.device = device
        self.names, self.codes, self.conditions = [], [], []
        self.grid = {}                                              # name -> (image, original or None)
        self.sq_err = torch.zeros([2], dtype=torch.float64)         # Sum of squared errors, number of values.
        self.guide_dist = torch.zeros([2], dtype=torch.float64)     # Sum of guide distances, number of images.

    # Save each batch's PNGs and record it; yields its uint8 images (for the FID detector).
    def consume(self, batches) -> Iterator[torch.Tensor]:
        for b in batches:
            for i, name in enumerate(b.names):
                path = image_path(self.outdir, name, self.subdirs)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                to_pil(b.images[i].numpy()).save(path)
                if name in self.grid_names:
                    self.grid[name] = (b.images[i].numpy(), None if b.originals is None else b.originals[i].numpy())
            self.names += list(b.names)
            self.codes.append(b.codes)
            if self.record_conditions is not None and b.conditions is not None:
                self.conditions.append(self.record_conditions(b.conditions))
            if b.originals is not None:
                diff = b.images.to(torch.float64) - b.originals.to(torch.float64)
                self.sq_err += torch.tensor([diff.square().sum().item(), diff.numel()], dtype=torch.float64)
            if self.scorer is not None:
                # Measured on the images as saved (uint8), like every other metric here.
                d = guidance.final_distance(self.scorer, to_float(b.images.to(self.device)))
                self.guide_dist += torch.tensor([d.double().sum().item(), d.numel()], dtype=torch.float64)
            yield b.images

    # Everything recorded on all ranks, on rank 0 (None elsewhere): names, codes and conditions sorted
    # by name, grid, errors, guide distances.
    def gather(self, L):
        codes = torch.cat(self.codes).numpy() if self.codes else np.zeros((0, L), np.int64)
        conditions = torch.cat(self.conditions).numpy() if self.conditions else None
        mine = dict(names=np.asarray(self.names, np.int64), codes=codes, conditions=conditions, grid=self.grid)
        dist.all_reduce_([self.sq_err, self.guide_dist])
        if dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            torch.distributed.gather_object(mine, parts, dst=0)
        else:
            parts = [mine]
        if dist.get_rank() != 0:
            return None
        names = np.concatenate([p['names'] for p in parts])
        codes = np.concatenate([p['codes'] for p in parts])
        order = np.argsort(names, kind='stable')
        conds = [p['conditions'] for p in parts if p['conditions'] is not None]
        conditions = np.concatenate(conds)[order] if conds else None
        grid = {k: v for p in parts for k, v in p['grid'].items()}
        return dnnlib.EasyDict(names=names[order], codes=codes[order], conditions=conditions, grid=grid,
                               sq_err=self.sq_err.tolist(), guide_dist=self.guide_dist.tolist())

# ----------------------------------------------------------------------------
# Command line.

# An --outdir must be new or empty, unless --force (then an earlier run's files are removed first,
# so no image is left that the new latents.npz does not describe, and fid.py would not count one).
def check_outdir(outdir, force):
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.UsageError(f'--outdir {outdir} exists and is not a folder')
    if os.path.isdir(outdir) and os.listdir(outdir) and not force:
        raise click.UsageError(f'--outdir {outdir} is not empty; choose a new folder, or add --force to replace '
                               'the images, latents and grid of an earlier run there')
    parent = os.path.dirname(os.path.abspath(outdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(outdir if os.path.isdir(outdir) else parent, os.W_OK):
        raise click.UsageError(f'--outdir {outdir}: no permission to write there')

# Make the folder and remove the outputs of an earlier generate.py run in it (our file names only).
def clear_outdir(outdir):
    os.makedirs(outdir, exist_ok=True)
    checkpoint.remove_stale_temps(outdir)
    for name in os.listdir(outdir):
        path = os.path.join(outdir, name)
        if name in OUTPUT_FILES or (re.fullmatch(r'\d{6}\.png', name) and os.path.isfile(path)):
            os.remove(path)
        elif re.fullmatch(r'\d{6}', name) and os.path.isdir(path):
            for sub in os.listdir(path):
                if re.fullmatch(r'\d{6}\.png', sub):
                    os.remove(os.path.join(path, sub))
            if not os.listdir(path):
                os.rmdir(path)

# The device of this process: --device, with a bare 'cuda' meaning this rank's own GPU.
def _pick_device(name):
    if name is None:
        return dist.device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.BadParameter(f'{name!r} is not a device (expected e.g. cpu, cuda, cuda:1)', param_hint='--device') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise click.ClickException(f'--device {name}: CUDA is not available on this machine')
        if device.index is None:
            device = dist.device()
    return device

# Print metrics, one `name=value` per line; `fid` comes last for scripts that read the last line.
def _print_metrics(results):
    for name, reason in results.get('unavailable', {}).items():
        dist.print0(f'{name} unavailable: {reason}')
    for name in ('guide_distance', 'mse', 'psnr', 'is', 'is_std', 'precision', 'recall', 'fid'):
        if name in results:
            dist.print0(f'{name}={results[name]:g}')

# An existing file (click checks it and names the option in its error).
_FILE = click.Path(exists=True, dir_okay=False)

@click.command(context_settings=dict(show_default=True))
@click.option('--network', 'network', help='Network snapshot (.safetensors or .pkl), URL, or run folder (its latest snapshot)', metavar='FILE|URL|DIR', required=True)
@click.option('--outdir', help='Where to save the images, latents and metrics', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Random seeds, e.g. 0-49999 or 1,5,9-12  [default: 0-63]', metavar='LIST', callback=_seeds_option, default=None)
@click.option('--subdirs', help='Create a subfolder for every 1000 seeds', is_flag=True)
@click.option('--force', help='Write into a non-empty --outdir, replacing an earlier run\'s images, latents and grid', is_flag=True)
@click.option('--class', 'class_idx', help='Class label of class-conditional networks (and target of --guide classifier)  [default: random per seed]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'batch', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
# DDN options.
@click.option('--codes', 'codes_path', help='Decode the latents of this file (a latents.npz written here)', metavar='NPZ', type=str, default=None)
@click.option('--reconstruct', 'data', help='Encode and reconstruct images of a dataset (folder, zip, or "digits")', metavar='PATH|digits', type=str, default=None)
@click.option('--max-images', help='Use only the first N images of --reconstruct / rows of --codes', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--condition-image', help='Condition image of a color/edge/resizeN-conditional network (square, any size)', metavar='PNG', type=_FILE, default=None)
# Guided sampling (zero-shot conditional generation).
@click.option('--guide', help='Guide the sampling: TYPE[:WEIGHT],... with TYPE in ' + ', '.join(guide_spec.GUIDE_TYPES), metavar='SPEC', type=str, default=None)
@click.option('--guide-image', help='Guide image, shared by all seeds: target of l2/inpaint/lowbit, low-res image of superres, grayscale of color, edge map of edge (white = edge)', metavar='PNG', type=_FILE, default=None)
@click.option('--guide-mask', help='inpaint: mask image, white = known pixel, black = to generate', metavar='PNG', type=_FILE, default=None)
@click.option('--guide-bits', help='lowbit: bits per channel of --guide-image', metavar='INT', type=click.IntRange(min=1, max=8), default=None)
@click.option('--guide-classifier', help='classifier: TorchScript or pickled classifier ([-1, 1] images -> logits); target class --class', metavar='PT|PKL', type=_FILE, default=None)
@click.option('--guide-text', help='clip: text prompt (needs `pip install open_clip_torch`)', metavar='STR', type=str, default=None)
@click.option('--guide-style', help='style: style image  [default: --guide-image]', metavar='PNG', type=_FILE, default=None)
@click.option('--guide-features', help='style: feature network, TorchScript or pickle  [default: fixed random convs]', metavar='PT|PKL', type=_FILE, default=None)
@click.option('--guide-temp', help='Guided choice: sample from softmax(-z/T) of z-scored distances  [default: argmin]', metavar='T', type=click.FloatRange(min=0), default=None)
@click.option('--guide-topk', help='Guided choice: uniform among the N best candidates  [default: argmin]', metavar='N', type=click.IntRange(min=1), default=None)
# Metrics.
@click.option('--fid-ref', 'fid_ref', help='Reference statistics: compute FID (and IS) of the generated images', metavar='NPZ|URL', type=str, default=None)
@click.option('--detector', 'detector_url', help='Detector pickle/TorchScript path or URL  [default: Inception-v3]', metavar='PATH|URL', type=str, default=None)
@click.option('--trust-pickle', help='Load pickles that are not plain ddn snapshots (--network, --guide-classifier, --guide-features, --detector): they run code', is_flag=True)
def main(**kwargs):
    """Generate images with a trained DDN, reconstruct a dataset, or decode latents; optionally compute FID.

    Examples:

    \b
    # 64 samples of the latest snapshot of a run, as PNGs + latents.npz + grid.png
    python generate.py --network=training-runs/00000-cifar10-32x32 --outdir=out --seeds=0-63

    \b
    # 50k samples on 8 GPUs, with FID against EDM's CIFAR-10 reference
    torchrun --standalone --nproc_per_node=8 generate.py --network=net.pkl --outdir=out \\
        --seeds=0-49999 --subdirs --fid-ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Reconstruct (encode + decode) 100 dataset images; decode their latents again
    python generate.py --network=net.pkl --outdir=rec --reconstruct=datasets/cifar10-32x32.zip --max-images=100
    python generate.py --network=net.pkl --outdir=dec --codes=rec/latents.npz

    \b
    # Guided sampling (zero-shot conditional generation) of an unconditional net
    python generate.py --network=net.pkl --outdir=sr --seeds=0-15 --guide=superres --guide-image=low8x8.png --guide-temp=0.3
    python generate.py --network=net.pkl --outdir=fill --guide=inpaint:1,color:0.5 --guide-image=photo.png --guide-mask=mask.png
    python generate.py --network=net.pkl --outdir=cls --guide=classifier --guide-classifier=clf.pt --class=3 --guide-topk=4

    \b
    # A color-conditional net: colourise a grayscale image, 16 ways
    python generate.py --network=color-net.pkl --outdir=col --seeds=0-15 --condition-image=gray.png
    """
    with dist.session():
        try:
            _main(dnnlib.EasyDict(kwargs))
        except (OSError, ValueError) as e:
            raise click.ClickException(str(e)) from e

def _main(opts):
    # Which mode; conflicting options are errors rather than silently ignored.
    if opts.codes_path is not None and opts.data is not None:
        raise click.UsageError('--codes and --reconstruct are different modes; give one of them')
    mode = 'decode' if opts.codes_path is not None else 'reconstruct' if opts.data is not None else 'sample'
    other = '--codes' if mode == 'decode' else '--reconstruct'
    if mode != 'sample' and opts.seeds is not None:
        raise click.UsageError(f'--seeds chooses samples; it does not apply with {other}')
    if mode == 'sample' and opts.max_images is not None:
        raise click.UsageError('--max-images applies to --reconstruct and --codes; use --seeds to choose samples')
    if opts.detector_url is not None and opts.fid_ref is None:
        raise click.UsageError('--detector is only used with --fid-ref')
    if mode != 'sample' and opts.guide is not None:
        why = 'the codes fix every choice' if mode == 'decode' else 'each image is encoded by L2 to itself'
        raise click.UsageError(f'--guide steers sampling (--seeds); it does not apply with {other} ({why})')
    guide_types = [name for name, _ in guide_spec.parse_spec(opts.guide)] if opts.guide is not None else []
    check_guide_options(opts, guide_types)
    chooser, chooser_info = make_chooser(opts.guide_temp, opts.guide_topk)
    device = _pick_device(opts.device)
    check_outdir(opts.outdir, opts.force)

    dist.print0(f'Loading network from "{opts.network}"...')
    net_path, net = load_network(opts.network, device, trust_pickle=opts.trust_pickle)
    net_id = snapshot.fingerprint(net)
    dist.print0(f'Network: {net_path} ({net.img_channels}x{net.img_resolution}x{net.img_resolution}, '
                f'L={net.num_layers}, {net.bits_per_image:.0f} bits per image, fingerprint {net_id})')

    # The network's condition: class labels (--class) or an image (--condition-image).
    kind = condition_kind(net)
    label_dim = int(getattr(net, 'label_dim', 0) or 0)
    if opts.class_idx is not None:
        if label_dim == 0 and 'classifier' not in guide_types:
            raise click.UsageError('--class: this network is unconditional (it has no label input); '
                                   'without a label input --class is only the target of --guide classifier')
        if label_dim and opts.class_idx >= label_dim:
            raise click.UsageError(f'--class {opts.class_idx}: the network has {label_dim} classes (0..{label_dim - 1})')
    if opts.condition_image is not None:
        if kind is None:
            raise click.UsageError('--condition-image: this network is unconditional (it takes no condition image); '
                                   'to steer it toward an image, use --guide (e.g. --guide=l2 --guide-image=PATH)')
        if kind == 'class':
            raise click.UsageError('--condition-image: this network is class-conditional; give --class instead')
        if mode == 'reconstruct':
            raise click.UsageError('--condition-image does not apply with --reconstruct: each image\'s condition '
                                   'is computed from the image itself')
    need_image = f'This network is conditioned on {getattr(net, "condition", None)!r}: give --condition-image PATH ' \
                 f'(the condition is computed from that image as in training)'
    shared = load_condition_image(net, opts.condition_image, device) if opts.condition_image is not None else None

    # The work of this mode: names of all images (in grid order), this rank's batches, and what
    # latents.npz keeps of the conditions (per image, or `stored` once for all).
    record = _classes_of if kind == 'class' else _image_condition if kind is not None and shared is None else None
    stored = None if shared is None else shared.cpu().numpy()
    if mode == 'sample':
        if kind not in (None, 'class') and shared is None:
            raise click.UsageError(need_image)
        names = opts.seeds if opts.seeds is not None else list(range(64))
        name_key = 'seeds'
        scorer = build_guide(opts, net, device)
        condition_fn = make_condition_fn(net, device, class_idx=opts.class_idx, shared=shared)
        batches = sample_batches(net, _rank_batches(names, opts.batch), condition_fn, scorer, chooser)
    elif mode == 'decode':
        scorer = None
        name_key, file_names, all_codes = load_latents(opts.codes_path, net.ks)
        made_by = latents_network(opts.codes_path)
        if made_by is not None and made_by != net_id:
            dist.print0(f'WARNING: {opts.codes_path} was made by another network (fingerprint {made_by}, this one is {net_id}); '
                        'the same codes decode to different images')
        classes, conditions = load_latent_conditions(opts.codes_path, net, len(file_names)) if kind else (None, None)
        if opts.max_images is not None:
            file_names, all_codes = file_names[:opts.max_images], all_codes[:opts.max_images]
            classes = None if classes is None else classes[:opts.max_images]
            conditions = conditions if conditions is None or len(conditions) == 1 else conditions[:opts.max_images]
        if kind == 'class' and opts.class_idx is None and classes is None and name_key != 'seeds':
            raise click.UsageError(f'{opts.codes_path} holds no classes for this class-conditional network: give --class')
        if kind not in (None, 'class') and shared is None:
            if conditions is None:
                raise click.UsageError(f'{need_image}; {opts.codes_path} holds no conditions')
            if len(conditions) == 1:
                record, stored = None, conditions
        names = [int(n) for n in file_names]
        if len(set(names)) != len(names):
            raise ValueError(f'{opts.codes_path}: the {name_key} are not unique, so image files would overwrite each other')
        rows_of = {n: i for i, n in enumerate(names)}
        condition_fn = make_condition_fn(net, device, opts.class_idx, shared, classes, conditions, rows_of)
        batches = decode_batches(net, _rank_batches(names, opts.batch), rows_of, all_codes, condition_fn)
    else:
        scorer = None
        use_labels = kind == 'class' and opts.class_idx is None
        try:
            dataset = open_dataset(opts.data, resolution=net.img_resolution, use_labels=use_labels)
        except (OSError, ValueError, ImportError) as e:
            hint = ' (or give --class for every image)' if use_labels else ''
            raise ValueError(f'Cannot read dataset {opts.data}: {e}{hint}') from e
        if dataset.image_shape != [net.img_channels, net.img_resolution, net.img_resolution]:
            raise ValueError(f'Dataset {opts.data} has images of shape {dataset.image_shape}, but the network makes '
                             f'{[net.img_channels, net.img_resolution, net.img_resolution]}')
        names = list(range(len(dataset) if opts.max_images is None else min(opts.max_images, len(dataset))))
        name_key = 'indices'
        condition_fn = None
        if kind is not None:
            # Each image's own condition, as in training: its label (or --class), or computed from it.
            def condition_fn(images, indices):
                labels = None
                if kind == 'class':
                    classes = [opts.class_idx if opts.class_idx is not None else int(np.argmax(dataset.get_label(i))) for i in indices]
                    if max(classes) >= label_dim:
                        raise ValueError(f'Dataset {opts.data} has label {max(classes)}, but the network has {label_dim} classes')
                    labels = one_hot(classes, label_dim, device)
                return net.make_condition(images=images, labels=labels)
        batches = reconstruct_batches(net, _rank_batches(names, opts.batch), dataset, condition_fn)
    if not names:
        raise ValueError('Nothing to generate: no seeds, codes or images selected')

    # Metrics need their detector and reference before generating, so a bad path fails in seconds, not hours.
    detector, ref, metrics = None, None, None
    if opts.fid_ref is not None:
        if len(names) < 2:
            raise ValueError('--fid-ref: FID needs at least 2 images')
        try:
            ref = fid.load_ref(opts.fid_ref)
            detector = fid.load_detector(opts.detector_url, device, trust_pickle=opts.trust_pickle)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f'--fid-ref: {e}') from e
        metrics = ['fid'] + (['is'] if len(names) >= IS_MIN_IMAGES else [])

    # The options of this run, written before the work starts (EDM's training_options.json).
    guide_info = None
    if scorer is not None:
        guide_info = dict(spec=opts.guide, guides=[dict(type=t, weight=w) for t, w in guide_spec.parse_spec(opts.guide)],
                          chooser=chooser_info, shared_by_all_seeds=True,
                          **{key[len('guide_'):]: opts[key] for key in GUIDE_OPTIONS if key not in ('guide_temp', 'guide_topk')})
        if 'classifier' in guide_types:
            guide_info['class'] = opts.class_idx
        dist.print0(f'Guide: {opts.guide} ({", ".join(f"{k}={v}" for k, v in chooser_info.items())})')
    options = dict(mode=mode, network=net_path, outdir=opts.outdir, num=len(names),
                   seeds=format_int_list(names) if mode == 'sample' else None, codes=opts.codes_path,
                   reconstruct=opts.data, max_images=opts.max_images, batch=opts.batch, subdirs=opts.subdirs,
                   world_size=dist.get_world_size(), condition=getattr(net, 'condition', None),
                   **{'class': opts.class_idx}, condition_image=opts.condition_image, guide=guide_info,
                   fid_ref=opts.fid_ref, detector=opts.detector_url or (fid.DETECTOR_URL if opts.fid_ref is not None else None))
    if dist.get_rank() == 0:
        clear_outdir(opts.outdir)
    dist.barrier()
    if dist.get_rank() == 0:
        _write_atomic(os.path.join(opts.outdir, 'generation_options.json'), lambda f: json.dump(options, f, indent=2), mode='w')

    # Generate, writing PNGs as batches come; the detector reads the same uint8 batches.
    what = {'sample': 'guided images' if scorer is not None else 'images', 'decode': 'images from latents',
            'reconstruct': 'reconstructions'}[mode]
    dist.print0(f'Generating {len(names)} {what} to "{opts.outdir}"...')
    recorder = Recorder(opts.outdir, opts.subdirs, names[:GRID_IMAGES], record_conditions=record, scorer=scorer, device=device)
    chunks = len(_rank_batches(names, opts.batch))
    stream = recorder.consume(tqdm.tqdm(batches, total=chunks, unit='batch', disable=dist.get_rank() != 0))
    results = {}
    if opts.fid_ref is not None:
        results = fid.calc_metrics(stream, ref, metrics=metrics, batch=opts.batch, device=device, detector=detector, progress=False)
    else:
        for _ in stream:
            pass
    rec = recorder.gather(net.num_layers)

    # Rank 0 writes the shared files.
    if rec is not None:
        classes = rec.conditions if kind == 'class' else None
        conditions = None if kind in (None, 'class') else stored if stored is not None else rec.conditions
        save_latents(os.path.join(opts.outdir, 'latents.npz'), name_key, rec.names, rec.codes, net.ks,
                     classes=classes, conditions=conditions, network=net_id)
        grid_names = names[:GRID_IMAGES]
        grid = make_grid([rec.grid[n][0] for n in grid_names])
        if mode == 'reconstruct':
            grid = side_by_side(make_grid([rec.grid[n][1] for n in grid_names]), grid)
            sse, count = rec.sq_err
            results['mse'] = sse / count
            results['psnr'] = 10 * math.log10(255 ** 2 / results['mse']) if results['mse'] > 0 else float('inf')
        if scorer is not None:
            total, count = rec.guide_dist
            results['guide_distance'] = total / count
        _write_atomic(os.path.join(opts.outdir, 'grid.png'), lambda f: to_pil(grid).save(f, format='png'))
        if results:
            info = dict(results, mode=mode, network=net_path, num=len(names))
            if mode == 'reconstruct':
                info.update(data=opts.data, pixel_range='uint8 [0, 255]')
            if guide_info is not None:
                info.update(guide=guide_info)
            if opts.fid_ref is not None:
                info.update(fid_ref=opts.fid_ref, detector=opts.detector_url or fid.DETECTOR_URL)
            _write_atomic(os.path.join(opts.outdir, 'metrics.json'), lambda f: json.dump(info, f, indent=2), mode='w')
        print(f'Saved {len(rec.names)} images, latents.npz and grid.png to "{opts.outdir}"')
    dist.barrier()
    _print_metrics(results)

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
