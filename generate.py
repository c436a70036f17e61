"""Generate images with a trained DDN: samples from seeds, decoded latents, or reconstructions of a
dataset; optionally measure FID (and IS) of the result on the fly. EDM's `generate.py`, for DDN.

Three modes, one output layout (`--outdir`):
- sample (default): `--seeds 0-49999` -> `{seed:06d}.png`; seed s always gives the same image,
  whatever `--batch` and the number of processes (per-seed codes, batch-invariant kernels);
- decode: `--codes latents.npz` -> the images of given latents (a file written by this script);
- reconstruct: `--reconstruct DATA` -> L2-guided encoding of dataset images (folder, zip or
  `digits`), their reconstructions `{index:06d}.png`, and MSE / PSNR against the originals.
Every mode also writes `latents.npz` (`seeds` or `indices` (N,), `codes` (N, L), `ks` (L,), sorted by
name; decoding it reproduces the images exactly) and `grid.png` (the first 100 images; in reconstruct
mode originals | reconstructions). `--fid-ref` streams the generated uint8 batches straight into the
detector (no PNG is read back) and writes `metrics.json`; the last printed line is `fid=...`.

Under `torchrun --standalone --nproc_per_node=N` the work is split across ranks (strided); latents,
grid images and statistics are gathered to rank 0, which writes the shared files.

Pixel convention (EDM): the network works in [-1, 1]; images are saved as uint8 (x * 127.5 + 128)
clipped to [0, 255], and read back as x = u / 127.5 - 1. Reconstruction MSE and PSNR are measured
on the uint8 images as saved, i.e. in the [0, 255] range (PSNR = 10 log10(255^2 / MSE)).

SECURITY: network snapshots and detectors are pickles; loading one executes code. Trusted files only.
"""

import json
import math
import os
import pickle
import re
import tempfile
from typing import Iterator, NamedTuple, Optional

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
import fid
from torch_utils import checkpoint
from torch_utils import distributed as dist
from training.dataset import open_dataset

# Images in the preview grid, and the smallest grid cell (smaller images are upscaled, nearest).
GRID_IMAGES = 100
GRID_MIN_CELL = 32

# Inception Score is computed over 10 splits, so it needs at least this many images.
IS_MIN_IMAGES = 10

# ----------------------------------------------------------------------------
# Parsing of seed lists: '1,5,9-12' -> [1, 5, 9, 10, 11, 12].

def parse_int_list(text):
    """Comma-separated non-negative integers and inclusive ranges `a-b`; duplicates are dropped,
    the first occurrence keeping its place. Raises ValueError on anything else."""
    if isinstance(text, (list, tuple)):
        return list(text)
    values, seen = [], set()
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)\s*-\s*(\d+)', part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f'Empty range {part!r}: write low-high with low <= high')
            items = range(lo, hi + 1)
        elif re.fullmatch(r'\d+', part):
            items = [int(part)]
        else:
            raise ValueError(f'Cannot parse {part!r} in {text!r}: expected e.g. "1,5,9-12" (non-negative integers)')
        for v in items:
            if v not in seen:
                seen.add(v)
                values.append(v)
    return values

# click callback around parse_int_list.
def _seeds_option(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_int_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e

# ----------------------------------------------------------------------------
# Loading the network: a snapshot pickle (path or URL, cached) or the latest snapshot of a run folder.

def resolve_network(network):
    """Path or URL of the snapshot that `--network` names: a run folder gives its newest
    `network-snapshot-*.pkl`. Raises FileNotFoundError with the reason."""
    if dnnlib.util.is_url(network):
        return network
    if os.path.isdir(network):
        path = checkpoint.latest(network, 'network-snapshot-*.pkl')
        if path is None:
            raise FileNotFoundError(f'No network-snapshot-*.pkl in run folder {network}')
        return path
    if not os.path.isfile(network):
        raise FileNotFoundError(f'Network not found: {network} (expected a network-snapshot-*.pkl, a URL or a run folder)')
    return network

def load_network(network, device):
    """The EMA generator of a snapshot (`pickle.load(f)['ema']`), in eval mode on `device`.
    With several processes rank 0 fetches a URL first, so the others read its cached copy."""
    path = resolve_network(network)
    leader = dist.get_rank() == 0
    remote = dnnlib.util.is_url(path)
    if remote and not leader:
        dist.barrier()
    data, error = None, None
    try:
        with dnnlib.util.open_url(path, verbose=leader) as f:
            data = pickle.load(f)
    except Exception as e:  # Anything can come out of an unpickler; name the file whatever it is.
        error = e
    if remote and leader:
        dist.barrier()  # Reached even on failure, so the other ranks do not hang.
    if error is not None:
        raise OSError(f'Could not load network {path}: {type(error).__name__}: {error}') from error
    net = data['ema'] if isinstance(data, dict) and 'ema' in data else data
    if not (isinstance(net, torch.nn.Module) and hasattr(net, 'ks') and hasattr(net, 'encode')):
        what = f'a dict with keys {sorted(data)}' if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{path} holds {what}, not a DDN snapshot (a dict whose "ema" is a DDNGenerator)')
    return path, net.eval().requires_grad_(False).to(device)

# ----------------------------------------------------------------------------
# Pixels: [-1, 1] floats <-> uint8, and image files.

def to_uint8(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

def to_float(images):
    return images.to(torch.float32) / 127.5 - 1

# A PIL image of one uint8 CHW array: 'L' for one channel, 'RGB' for three.
def to_pil(image):
    image = np.asarray(image)
    return PIL.Image.fromarray(image[0], 'L') if image.shape[0] == 1 else PIL.Image.fromarray(image.transpose(1, 2, 0), 'RGB')

# File of image `name`: outdir/{name:06d}.png, or outdir/{thousands:06d}/{name:06d}.png with subdirs.
def image_path(outdir, name, subdirs=False):
    if subdirs:
        return os.path.join(outdir, f'{name - name % 1000:06d}', f'{name:06d}.png')
    return os.path.join(outdir, f'{name:06d}.png')

# Tile uint8 NCHW images into one (C, H', W') grid, row by row, nearest-upscaled to GRID_MIN_CELL.
def make_grid(images, cols=None):
    images = np.asarray(images)
    n, c, h, w = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.zeros((c, rows * h, cols * w), dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    scale = max(1, GRID_MIN_CELL // min(h, w))
    return grid.repeat(scale, axis=1).repeat(scale, axis=2)

# Two grids side by side with a white gap: originals | reconstructions.
def side_by_side(left, right):
    gap = np.full((left.shape[0], left.shape[1], max(2, left.shape[2] // 64)), 255, dtype=np.uint8)
    return np.concatenate([left, gap, right], axis=2)

# ----------------------------------------------------------------------------
# Atomic writes (temporary file in the same folder + rename): a reader never sees half a file.

def _write_atomic(path, write, mode='wb'):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(mode, dir=folder, prefix='.tmp-', delete=False) as f:
        try:
            write(f)
        except BaseException:
            f.close()
            os.remove(f.name)
            raise
    os.replace(f.name, path)

def save_latents(path, name_key, names, codes, ks):
    """`names` (N,) under `name_key` ('seeds' or 'indices'), `codes` (N, L) and `ks` (L,), all int64."""
    arrays = {name_key: np.asarray(names, np.int64).reshape(-1),
              'codes': np.asarray(codes, np.int64).reshape(len(names), len(ks)),
              'ks': np.asarray(ks, np.int64)}
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

# ----------------------------------------------------------------------------
# The three modes, each a stream of batches of this rank's share of the work.

class Batch(NamedTuple):
    names:      list                    # Seed or index of each image (its file name).
    images:     torch.Tensor            # (B, C, H, W) uint8, CPU.
    codes:      torch.Tensor            # (B, L) int64 latent, CPU.
    originals:  Optional[torch.Tensor]  # (B, C, H, W) uint8 originals (reconstruct mode), or None.

# This rank's strided share of a list, split into batches.
def _rank_batches(items, batch):
    share = list(items)[dist.get_rank()::dist.get_world_size()]
    return [share[i:i + batch] for i in range(0, len(share), batch)]

# Sampling: per-seed codes, so the image of a seed does not depend on the batch it is in.
@torch.no_grad()
def sample_batches(net, chunks, label_fn=None):
    for seeds in chunks:
        kwargs = {} if label_fn is None else {'condition': label_fn(seeds)}
        out = net(seeds=seeds, **kwargs)
        yield Batch(seeds, to_uint8(out.images).cpu(), out.codes.cpu(), None)

# Decoding: the rows of `codes` named by each chunk of names.
@torch.no_grad()
def decode_batches(net, chunks, rows_of, codes):
    device = net.init_feature.device
    for names in chunks:
        c = torch.from_numpy(codes[[rows_of[n] for n in names]]).to(device)
        out = net(codes=c)
        yield Batch(names, to_uint8(out.images).cpu(), out.codes.cpu(), None)

# Reconstruction: L2-guided encoding of dataset images; the codes decode to the same image.
@torch.no_grad()
def reconstruct_batches(net, chunks, dataset):
    device = net.init_feature.device
    for indices in chunks:
        originals = torch.from_numpy(np.stack([dataset[i][0] for i in indices]))
        codes, recon = net.encode(to_float(originals.to(device)))
        yield Batch(indices, to_uint8(recon).cpu(), codes.cpu(), originals)

# ----------------------------------------------------------------------------
# Writing the images of a stream and keeping what rank 0 needs afterwards.

class Recorder:
    def __init__(self, outdir, subdirs, grid_names):
        self.outdir = outdir
        self.subdirs = subdirs
        self.grid_names = set(grid_names)
        self.names, self.codes = [], []
        self.grid = {}                                              # name -> (image, original or None)
        self.sq_err = torch.zeros([2], dtype=torch.float64)         # Sum of squared errors, number of values.

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
            if b.originals is not None:
                diff = b.images.to(torch.float64) - b.originals.to(torch.float64)
                self.sq_err += torch.tensor([diff.square().sum().item(), diff.numel()], dtype=torch.float64)
            yield b.images

    # Everything recorded on all ranks, on rank 0 (None elsewhere): names, codes sorted by name, grid, errors.
    def gather(self, L):
        codes = torch.cat(self.codes).numpy() if self.codes else np.zeros((0, L), np.int64)
        mine = dict(names=np.asarray(self.names, np.int64), codes=codes, grid=self.grid)
        dist.all_reduce_([self.sq_err])
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
        grid = {k: v for p in parts for k, v in p['grid'].items()}
        return dnnlib.EasyDict(names=names[order], codes=codes[order], grid=grid, sq_err=self.sq_err.tolist())

# ----------------------------------------------------------------------------
# Command line.

# The device of this process: --device, with a bare 'cuda' meaning this rank's own GPU.
def _pick_device(name):
    if name is None:
        return dist.device()
    device = torch.device(name)
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
    for name in ('mse', 'psnr', 'is', 'is_std', 'precision', 'recall', 'fid'):
        if name in results:
            dist.print0(f'{name}={results[name]:g}')

@click.command(context_settings=dict(show_default=True))
@click.option('--network', 'network', help='Network snapshot pickle, URL, or run folder (its latest snapshot)', metavar='PKL|URL|DIR', required=True)
@click.option('--outdir', help='Where to save the images, latents and metrics', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Random seeds, e.g. 0-49999 or 1,5,9-12  [default: 0-63]', metavar='LIST', callback=_seeds_option, default=None)
@click.option('--subdirs', help='Create a subfolder for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label (class-conditional networks)  [default: random per seed]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'batch', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
# DDN options.
@click.option('--codes', 'codes_path', help='Decode the latents of this file (a latents.npz written here)', metavar='NPZ', type=str, default=None)
@click.option('--reconstruct', 'data', help='Encode and reconstruct images of a dataset (folder, zip, or "digits")', metavar='PATH|digits', type=str, default=None)
@click.option('--max-images', help='Use only the first N images of --reconstruct / rows of --codes', metavar='INT', type=click.IntRange(min=1), default=None)
# Metrics.
@click.option('--fid-ref', 'fid_ref', help='Reference statistics: compute FID (and IS) of the generated images', metavar='NPZ|URL', type=str, default=None)
@click.option('--detector', 'detector_url', help='Detector pickle/TorchScript path or URL  [default: Inception-v3]', metavar='PATH|URL', type=str, default=None)
def main(network, outdir, seeds, subdirs, class_idx, batch, device, codes_path, data, max_images, fid_ref, detector_url):
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
    """
    dist.init()
    try:
        _main(network, outdir, seeds, subdirs, class_idx, batch, device, codes_path, data, max_images, fid_ref, detector_url)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        dist.shutdown()

def _main(network, outdir, seeds, subdirs, class_idx, batch, device, codes_path, data, max_images, fid_ref, detector_url):
    # Which mode; conflicting options are errors rather than silently ignored.
    if codes_path is not None and data is not None:
        raise click.UsageError('--codes and --reconstruct are different modes; give one of them')
    mode = 'decode' if codes_path is not None else 'reconstruct' if data is not None else 'sample'
    if mode != 'sample' and seeds is not None:
        raise click.UsageError(f'--seeds chooses samples; it does not apply with --{"codes" if mode == "decode" else "reconstruct"}')
    if mode == 'sample' and max_images is not None:
        raise click.UsageError('--max-images applies to --reconstruct and --codes; use --seeds to choose samples')
    if detector_url is not None and fid_ref is None:
        raise click.UsageError('--detector is only used with --fid-ref')
    device = _pick_device(device)

    dist.print0(f'Loading network from "{network}"...')
    net_path, net = load_network(network, device)
    dist.print0(f'Network: {net_path} ({net.img_channels}x{net.img_resolution}x{net.img_resolution}, '
                f'L={net.num_layers}, {net.bits_per_image:.0f} bits per image)')

    # Class labels (only class-conditional networks take them).
    label_dim = int(getattr(net, 'label_dim', 0) or 0)
    if class_idx is not None and label_dim == 0:
        raise click.UsageError('--class: this network is unconditional (it has no label input)')
    if class_idx is not None and class_idx >= label_dim:
        raise click.UsageError(f'--class {class_idx}: the network has {label_dim} classes (0..{label_dim - 1})')
    if label_dim > 0 and mode != 'sample':
        raise click.UsageError(f'--{"codes" if mode == "decode" else "reconstruct"} is not supported for class-conditional networks yet')
    label_fn = None
    if label_dim > 0:
        # One class per seed (the given one, or drawn from the seed), as a one-hot row.
        def label_fn(seeds):
            classes = [class_idx if class_idx is not None else int(np.random.RandomState(s).randint(label_dim)) for s in seeds]
            return torch.eye(label_dim, device=device)[classes]

    # The work of this mode: names of all images (in grid order) and this rank's batches.
    if mode == 'sample':
        names = seeds if seeds is not None else list(range(64))
        name_key = 'seeds'
        batches = sample_batches(net, _rank_batches(names, batch), label_fn)
    elif mode == 'decode':
        name_key, file_names, all_codes = load_latents(codes_path, net.ks)
        if max_images is not None:
            file_names, all_codes = file_names[:max_images], all_codes[:max_images]
        names = [int(n) for n in file_names]
        if len(set(names)) != len(names):
            raise ValueError(f'{codes_path}: the {name_key} are not unique, so image files would overwrite each other')
        rows_of = {n: i for i, n in enumerate(names)}
        batches = decode_batches(net, _rank_batches(names, batch), rows_of, all_codes)
    else:
        try:
            dataset = open_dataset(data, resolution=net.img_resolution)
        except (OSError, ValueError, ImportError) as e:
            raise ValueError(f'Cannot read dataset {data}: {e}') from e
        if dataset.image_shape != [net.img_channels, net.img_resolution, net.img_resolution]:
            raise ValueError(f'Dataset {data} has images of shape {dataset.image_shape}, but the network makes '
                             f'{[net.img_channels, net.img_resolution, net.img_resolution]}')
        names = list(range(len(dataset) if max_images is None else min(max_images, len(dataset))))
        name_key = 'indices'
        batches = reconstruct_batches(net, _rank_batches(names, batch), dataset)
    if not names:
        raise ValueError('Nothing to generate: no seeds, codes or images selected')

    # Metrics need their detector and reference before generating, so a bad path fails in seconds, not hours.
    detector, ref, metrics = None, None, None
    if fid_ref is not None:
        if len(names) < 2:
            raise ValueError('--fid-ref: FID needs at least 2 images')
        try:
            ref = fid.load_ref(fid_ref)
            detector = fid.load_detector(detector_url, device)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f'--fid-ref: {e}') from e
        metrics = ['fid'] + (['is'] if len(names) >= IS_MIN_IMAGES else [])

    # Generate, writing PNGs as batches come; the detector reads the same uint8 batches.
    what = {'sample': 'images', 'decode': 'images from latents', 'reconstruct': 'reconstructions'}[mode]
    dist.print0(f'Generating {len(names)} {what} to "{outdir}"...')
    os.makedirs(outdir, exist_ok=True)
    recorder = Recorder(outdir, subdirs, names[:GRID_IMAGES])
    chunks = len(_rank_batches(names, batch))
    stream = recorder.consume(tqdm.tqdm(batches, total=chunks, unit='batch', disable=dist.get_rank() != 0))
    results = {}
    if fid_ref is not None:
        results = fid.calc_metrics(stream, ref, metrics=metrics, batch=batch, device=device, detector=detector, progress=False)
    else:
        for _ in stream:
            pass
    rec = recorder.gather(net.num_layers)

    # Rank 0 writes the shared files.
    if rec is not None:
        save_latents(os.path.join(outdir, 'latents.npz'), name_key, rec.names, rec.codes, net.ks)
        grid_names = names[:GRID_IMAGES]
        grid = make_grid([rec.grid[n][0] for n in grid_names])
        if mode == 'reconstruct':
            grid = side_by_side(make_grid([rec.grid[n][1] for n in grid_names]), grid)
            sse, count = rec.sq_err
            results['mse'] = sse / count
            results['psnr'] = 10 * math.log10(255 ** 2 / results['mse']) if results['mse'] > 0 else float('inf')
        to_pil(grid).save(os.path.join(outdir, 'grid.png'))
        if results:
            info = dict(results, mode=mode, network=net_path, num=len(names))
            if mode == 'reconstruct':
                info.update(data=data, pixel_range='uint8 [0, 255]')
            if fid_ref is not None:
                info.update(fid_ref=fid_ref, detector=detector_url or fid.DETECTOR_URL)
            _write_atomic(os.path.join(outdir, 'metrics.json'), lambda f: json.dump(info, f, indent=2), mode='w')
        print(f'Saved {len(rec.names)} images, latents.npz and grid.png to "{outdir}"')
    dist.barrier()
    _print_metrics(results)

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
