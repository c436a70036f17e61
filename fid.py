"""Evaluate images with FID, KID, sFID, Inception Score and precision/recall, the way EDM reports them.

`python fid.py ref` turns a dataset (folder or zip of images) into reference statistics: an `.npz`
with `mu` (D,) and `sigma` (D, D) in float64 like EDM's reference files, plus optional extras
(`features`, a random subset of detector features for precision/recall and KID, `num`, `detector`,
and `mu_s` / `sigma_s` of spatial features for sFID when the detector has them).
`python fid.py calc` measures a folder or zip of images against such a file; `--splits N` also gives
FID over N disjoint ranges of the images (seed ranges for generate.py's output) as mean and std.

The metrics and detectors live in `training/metrics.py` and `training/detectors.py` (generate.py and
train.py --metrics use them too); this script reads image files and prints. `--detector` takes a file,
a URL, or a standard detector's name: inception (default), dinov2 (FD-DINOv2), clip (CLIP-FID).

Under `torchrun` each rank takes a strided share of the images; per-rank sums are all-reduced and
the rows that precision/recall, KID and IS need are all-gathered once at the end; rank 0 prints and writes.

Detector files load without running code (TorchScript, or pickles of TorchScript like StyleGAN3's
Inception); any other pickle needs --trust-pickle, since unpickling it runs code named by the file.
"""

import os

import click
import numpy as np
import torch
import tqdm

from torch_utils import distributed as dist
from training import metrics as metric_lib
from training.dataset import GENERATED_IMAGE_PATTERN, GENERATED_MARKER, ImageFolderDataset
from training.metrics import REF_FEATURES, collate_images as _collate_images, select_indices as _select, to_rgb as _to_rgb
from training.metrics import DETECTOR_URL, load_detector, load_ref  # noqa: F401 (generate.py reads them here)

# ----------------------------------------------------------------------------
# Image sources: a folder or zip, a dataset, or an iterable of uint8 NCHW batches.

# This rank's uint8 RGB NCHW batches (at most `batch` images each) from a path, a dataset or an iterable of batches.
def image_batches(source, batch=64, num=None, seed=0, workers=2, progress=True):
    rank, world = dist.get_rank(), dist.get_world_size()
    what = f'"{os.fspath(source)}"' if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        source = _scan_folder(source)
    if isinstance(source, torch.utils.data.Dataset):
        # Strided shares: rank r takes images r, r + W, r + 2W, ... of the selected set.
        share = _select(len(source), num, seed, what)[rank::world]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(source, share.tolist()),
            batch_size=batch, num_workers=workers, collate_fn=_collate_images)
    elif num is not None:
        raise ValueError('num/seed choose images from a dataset; an iterable of batches is used as given '
            '(each rank passes its own share)')
    else:
        loader = source
    for images in tqdm.tqdm(loader, unit='batch', disable=(not progress or rank != 0)):
        yield from _to_rgb(images).split(batch)

# The images of a folder or zip. A generate.py --outdir (it holds generation_options.json) gives its
# samples only, not grid.png.
def _scan_folder(path):
    generated = os.path.isfile(os.path.join(os.fspath(path), GENERATED_MARKER))
    return ImageFolderDataset(os.fspath(path), name_pattern=GENERATED_IMAGE_PATTERN if generated else None)

# Detector features of this rank's images, one (B, D) tensor per batch.
def compute_features(source, detector, batch=64, device=None, num=None, seed=0, progress=True, workers=2):
    batches = image_batches(source, batch=batch, num=num, seed=seed, workers=workers, progress=progress)
    yield from metric_lib.compute_features(batches, detector, batch=batch, device=device, progress=False)

# Statistics of a dataset for a reference file: mu, sigma, num, up to `features` random real features, spatial moments.
def compute_ref(data, batch=64, detector_url=None, device=None, features=REF_FEATURES, seed=0, workers=2,
        detector=None, progress=True, trust_pickle=False):
    device = dist.device() if device is None else torch.device(device)
    if detector is None:
        detector = metric_lib.load_detector(detector_url, device, trust_pickle=trust_pickle)
    batches = image_batches(data, batch=batch, workers=workers, progress=progress)
    return metric_lib.reference_stats(batches, detector, device, features=features, seed=seed)

# Metrics of images against reference statistics; the same dict on every rank.
def calc_metrics(images_path, ref_path=None, metrics=('fid',), num=None, seed=0, batch=64, detector_url=None,
        device=None, detector=None, workers=2, progress=True, splits=1, trust_pickle=False):
    """`images_path`: folder, zip, dataset, or this rank's iterable of uint8 NCHW batches (then num must be None).
    `ref_path`: `.npz` path, URL or an already loaded dict. `splits` > 1: also FID of that many disjoint parts
    of the images (in file order), under fid_splits, fid_mean, fid_std. Otherwise as training.metrics.calc_metrics."""
    names = metric_lib.parse_metrics(metrics)
    device = dist.device() if device is None else torch.device(device)
    if splits <= 1:
        batches = image_batches(images_path, batch=batch, num=num, seed=seed, workers=workers, progress=progress)
        return metric_lib.calc_metrics(batches, ref_path, names, detector=detector, device=device,
            detector_url=detector_url, trust_pickle=trust_pickle)
    ref, ref_name = metric_lib.check_ref(ref_path, names + ['fid'])
    if detector is None:
        detector = metric_lib.load_detector(detector_url, device, trust_pickle=trust_pickle)

    # Disjoint consecutive parts of the chosen images (contiguous seed ranges when the files are seeds).
    if not isinstance(images_path, (str, os.PathLike, torch.utils.data.Dataset)):
        raise ValueError('splits need a folder, zip or dataset of images, not an iterable of batches')
    dataset = _scan_folder(images_path) if isinstance(images_path, (str, os.PathLike)) else images_path
    chosen = _select(len(dataset), num, seed, f'"{images_path}"' if isinstance(images_path, (str, os.PathLike)) else 'the dataset')
    if len(chosen) < 2 * splits:
        raise ValueError(f'--splits {splits} needs at least {2 * splits} images, got {len(chosen)}')
    parts = []
    for i, part in enumerate(np.array_split(chosen, splits)):
        dist.print0(f'Split {i + 1}/{splits}: {len(part)} images')
        batches = image_batches(torch.utils.data.Subset(dataset, part.tolist()), batch=batch, workers=workers, progress=progress)
        parts.append(metric_lib.accumulate(batches, detector, device, keep_features=bool({'pr', 'kid'} & set(names)),
            want_probs='is' in names, want_spatial='sfid' in names, ref_dim=int(np.shape(ref['mu'])[0]), ref_name=ref_name))
    results = None
    if dist.get_rank() == 0:
        results = metric_lib.evaluate(metric_lib.combine_stats(parts), ref, names, device)
        fids = [metric_lib.calculate_fid(p['mu'], p['sigma'], ref['mu'], ref['sigma']) for p in parts]
        results.update(fid_splits=fids, fid_mean=float(np.mean(fids)), fid_std=float(np.std(fids, ddof=1)), splits=splits)
    return metric_lib.broadcast_object(results)

# ----------------------------------------------------------------------------
# Command line.

# Print the metrics last, one `name=value` per line, so scripts can grep them.
def _print_metrics(results):
    for name, reason in results.get('unavailable', {}).items():
        dist.print0(f'{name} unavailable: {reason}')
    if 'fid_splits' in results:
        dist.print0(f'FID over {results["splits"]} disjoint splits: {results["fid_mean"]:g} +- {results["fid_std"]:g} '
                    f'({", ".join(f"{v:g}" for v in results["fid_splits"])})')
    for name in ('fid', 'fid_mean', 'fid_std', 'kid', 'kid_se', 'sfid', 'is', 'is_std', 'precision', 'recall'):
        if name in results:
            dist.print0(f'{name}={results[name]:g}')
    for name in results.get('unavailable', {}):
        dist.print0(f'{name}=unavailable')

@click.group()
def cli():
    """Calculate FID, KID, sFID, Inception Score and precision/recall for a set of images.

    Examples:

    \b
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    \b
    # FID of 50000 generated images (one or more GPUs)
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz

    \b
    # FID, KID, Inception Score and precision/recall of 10000 images
    python fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz --num=10000 --metrics=fid,kid,is,pr

    \b
    # FID over 5 disjoint seed ranges of 10000 images each: mean +- std
    python fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz --num=50000 --splits=5

    \b
    # FD-DINOv2 (a reference made with the same detector)
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-dinov2.npz --detector=dinov2
    python fid.py calc --images=out --ref=fid-refs/cifar10-dinov2.npz --detector=dinov2

    Under torchrun write `-n 10000` instead of `--num 10000` (or put `--` before fid.py): torchrun's
    own argument parser reads `--num` as an abbreviation of its `--numa-binding` and stops.
    """

# Options both subcommands share.
def _common_options(fn):
    fn = click.option('--trust-pickle', help='Allow a detector pickle that runs code when loaded (trusted files only)', is_flag=True)(fn)
    fn = click.option('--workers', help='Data loader worker processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)(fn)
    fn = click.option('--detector', 'detector_url', help='Detector: inception, dinov2, clip, or a TorchScript/pickle path or URL  [default: inception]', metavar='NAME|PATH|URL', type=str, default=None)(fn)
    fn = click.option('--batch', help='Maximum batch size per rank', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)(fn)
    return fn

@cli.command()
@click.option('--images', 'images_path', help='Images to evaluate', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (needed for fid, kid, sfid, pr)', metavar='NPZ|URL', type=str)
@click.option('--num', '-n', help='Number of images to use (-n under torchrun)', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for choosing the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--metrics', help='Comma-separated metrics: fid, kid, sfid, is, pr', metavar='LIST', type=str, default='fid', show_default=True)
@click.option('--splits', help='Also FID of this many disjoint parts of the images (mean +- std)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--out', help='Also write the results to this JSON file', metavar='JSON', type=str)
@_common_options
def calc(images_path, ref_path, num, seed, metrics, splits, out, batch, detector_url, workers, trust_pickle):
    """Calculate metrics for a folder or zip of images."""
    with dist.session():
        try:
            dist.print0(f'Evaluating {metrics} on {num} images from "{images_path}"...')
            results = calc_metrics(images_path, ref_path, metrics=metrics, num=num, seed=seed, batch=batch,
                detector_url=detector_url, workers=workers, splits=splits, trust_pickle=trust_pickle)
        except (ValueError, OSError, ImportError) as e:
            raise click.ClickException(str(e)) from e
        if dist.get_rank() == 0 and out:
            metric_lib.write_json(out, dict(results, images=images_path, ref=ref_path, seed=seed, detector=metric_lib.detector_name(detector_url)))
        _print_metrics(results)

@cli.command()
@click.option('--data', 'data_path', help='Dataset folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--features', help='Real features stored for precision/recall and KID (0: none)', metavar='INT', type=click.IntRange(min=0), default=REF_FEATURES, show_default=True)
@_common_options
def ref(data_path, dest_path, features, batch, detector_url, workers, trust_pickle):
    """Calculate reference statistics of a dataset."""
    with dist.session():
        try:
            dist.print0(f'Calculating reference statistics of "{data_path}"...')
            stats = compute_ref(data_path, batch=batch, detector_url=detector_url, features=features, workers=workers,
                trust_pickle=trust_pickle)
        except (ValueError, OSError, ImportError) as e:
            raise click.ClickException(str(e)) from e
        if dist.get_rank() == 0:
            metric_lib.save_ref(dest_path, stats['mu'], stats['sigma'], features=stats.get('features'), num=stats['num'],
                detector=metric_lib.detector_name(detector_url), mu_s=stats.get('mu_s'), sigma_s=stats.get('sigma_s'))
        dist.barrier()
        dist.print0(f'Saved statistics of {stats["num"]} images to "{dest_path}"')

if __name__ == '__main__':
    cli()
