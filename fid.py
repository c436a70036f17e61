"""Evaluate images with FID, KID, sFID, Inception Score and precision/recall, the way EDM reports them.

`python fid.py ref` turns a dataset (folder or zip of images) into reference statistics: an `.npz`
with `mu` (D,) and `sigma` (D, D) in float64 like EDM's reference files, plus optional extras
(`features`, a random subset of detector features for precision/recall and KID, `num`, `detector`,
and `mu_s` / `sigma_s` of spatial features for sFID when the detector has them).
`python fid.py calc` measures a folder or zip of images against such a file; `--splits N` also gives
FID over N disjoint ranges of the images (seed ranges for generate.py's output) as mean and std.

The metrics live in `evaluation/` (metrics.py, feature_metrics.py, image_sources.py, detectors.py)
(generate.py and train.py --metrics use them too); this script is their command line. `--detector` takes a file,
a URL, or a standard detector's name: inception (default), dinov2 (FD-DINOv2), clip (CLIP-FID).

Under `torchrun` each rank takes a strided share of the images; per-rank sums are all-reduced and
the rows that precision/recall, KID and IS need are all-gathered once at the end; rank 0 prints and writes.

Detector files load without running code (TorchScript, or pickles of TorchScript like StyleGAN3's
Inception); any other pickle or TorchScript archive needs --trust-code (alias --trust-pickle), since it runs code.
"""

import json
import pickle
import zipfile

import click

import cli as cli_helpers
from cli import seed_range
from torch_utils import checkpoint
from torch_utils import distributed as dist
from evaluation import detectors, image_sources
from evaluation import metrics as metric_lib
from evaluation.metrics import REF_FEATURES

# ----------------------------------------------------------------------------
# Command line.

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

# Whether `path` is a file this script writes, which --force may replace: reference statistics
# (an .npz holding mu and sigma), and the results JSON of calc --out.
def is_reference_file(path):
    try:
        with zipfile.ZipFile(path) as z:
            return {'mu.npy', 'sigma.npy'} <= set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False

def is_results_file(path):
    try:
        with open(path, encoding='utf-8') as f:
            results = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(results, dict) and {'images', 'ref', 'detector'} <= set(results)
# What loading a detector or reading images may raise for a bad file: a one-line error, not a traceback
# (a TorchScript archive that fails to load raises RuntimeError; a damaged pickle UnpicklingError or EOFError).
DETECTOR_ERRORS = (ValueError, OSError, ImportError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)

# Options both subcommands share.
def _common_options(fn):
    fn = click.option('--trust-code', '--trust-pickle', 'trust_pickle', help='Allow a --detector file that runs code (a TorchScript archive other than the Inception, a pickle); trusted files only', is_flag=True)(fn)
    fn = click.option('--workers', help='Data loader worker processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)(fn)
    fn = click.option('--detector', 'detector_url', help='Detector: inception, dinov2, clip, or a TorchScript/pickle path or URL  [default: inception]', metavar='NAME|PATH|URL', type=str, default=None)(fn)
    fn = click.option('--batch', help='Maximum batch size per rank', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)(fn)
    return fn

@cli.command()
@click.option('--images', 'images_path', help='Images to evaluate', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (needed for fid, kid, sfid, pr)', metavar='NPZ|URL', type=str)
@click.option('--num', '-n', help='Number of images to use (-n under torchrun)', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for choosing the images', metavar='INT', type=seed_range(), default=0, show_default=True)
@click.option('--metrics', help='Comma-separated metrics: fid, kid, sfid, is, pr', metavar='LIST', type=str, default='fid', show_default=True)
@click.option('--splits', help='Also FID of this many disjoint parts of the images (mean +- std)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--out', help='Also write the results to this JSON file', metavar='JSON', type=str)
@click.option('--force', help='Replace an existing --out (only a results file of fid.py calc)', is_flag=True)
@_common_options
def calc(images_path, ref_path, num, seed, metrics, splits, out, force, batch, detector_url, workers, trust_pickle):
    """Calculate metrics for a folder or zip of images."""
    if out:
        cli_helpers.check_output_file(out, force, is_results_file, 'a results file of fid.py calc')
    with dist.session():
        try:
            dist.print0(f'Evaluating {metrics} on {num} images from "{images_path}"...')
            results = metric_lib.calc_metrics(images_path, ref_path, metrics=metrics, num=num, seed=seed, batch=batch,
                detector_url=detector_url, workers=workers, splits=splits, trust_pickle=trust_pickle, progress=True)
        except DETECTOR_ERRORS as e:
            raise cli_helpers.click_error(e) from e
        if dist.get_rank() == 0 and out:
            try:
                checkpoint.write_json(out, dict(results, images=images_path, ref=ref_path, seed=seed, detector=detectors.detector_name(detector_url)))
            except OSError as e:
                raise cli_helpers.write_error(e, '--out', out) from None
        metric_lib.print_metrics(results)

@cli.command()
@click.option('--data', 'data_path', help='Dataset folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--features', help='Real features stored for precision/recall and KID (0: none)', metavar='INT', type=click.IntRange(min=0), default=REF_FEATURES, show_default=True)
@click.option('--force', help='Replace an existing --dest (only reference statistics: an .npz with mu and sigma)', is_flag=True)
@_common_options
def ref(data_path, dest_path, features, force, batch, detector_url, workers, trust_pickle):
    """Calculate reference statistics of a dataset."""
    cli_helpers.check_output_file(dest_path, force, is_reference_file, 'reference statistics (an .npz with mu and sigma)', option='--dest')
    with dist.session():
        try:
            dist.print0(f'Calculating reference statistics of "{data_path}"...')
            detector = detectors.load_detector(detector_url, dist.device(), trust_pickle=trust_pickle)
            batches = image_sources.image_batches(data_path, batch=batch, workers=workers)
            stats = metric_lib.reference_stats(batches, detector, dist.device(), features=features)
        except DETECTOR_ERRORS as e:
            raise cli_helpers.click_error(e) from e
        if dist.get_rank() == 0:
            try:
                metric_lib.save_ref(dest_path, stats['mu'], stats['sigma'], features=stats.get('features'), num=stats['num'],
                    detector=detectors.detector_name(detector_url), mu_s=stats.get('mu_s'), sigma_s=stats.get('sigma_s'))
            except OSError as e:
                raise cli_helpers.write_error(e, '--dest', dest_path) from None
        dist.barrier()
        dist.print0(f'Saved statistics of {stats["num"]} images to "{dest_path}"')

if __name__ == '__main__':
    cli()
