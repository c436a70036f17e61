"""Evaluate images with FID, Inception Score and precision/recall, the way EDM reports them.

`python fid.py ref` turns a dataset (folder or zip of images) into reference statistics: an `.npz`
with `mu` (D,) and `sigma` (D, D) in float64 like EDM's reference files, plus optional extras
(`features`, a random subset of detector features for precision/recall, `num`, `detector`).
`python fid.py calc` measures a folder or zip of images against such a file.

generate.py imports the same functions and streams in-memory uint8 NCHW batches into
`calc_metrics` / `compute_features` instead of writing images first.

Under `torchrun` each rank takes a strided share of the images; per-rank sums are all-reduced and
the rows that precision/recall and IS need are all-gathered once at the end; rank 0 prints and writes.

Detectors are pickles or TorchScript files. Unpickling executes code: load only trusted files.
"""

import inspect
import io
import json
import os
import pickle
import tempfile

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib.util
from torch_utils import distributed as dist
from training.dataset import GENERATED_IMAGE_PATTERN, GENERATED_MARKER, ImageFolderDataset

# StyleGAN3's Inception-v3 (a PyTorch translation of TensorFlow's inception-2015-12-05), as in EDM.
DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

# Metric names accepted by `--metrics`: Frechet distance, Inception Score, precision/recall.
METRICS = ('fid', 'is', 'pr')

# Random real features kept in a reference file, enough for a stable precision/recall estimate.
REF_FEATURES = 10000

# ----------------------------------------------------------------------------
# Metrics on features and probabilities (plain functions, no detector needed).

# Mean and covariance of (N, D) features, in float64 with the unbiased (N - 1) normalization EDM uses.
def compute_stats(features):
    features = np.asarray(torch.as_tensor(features).cpu(), dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f'compute_stats needs (N, D) features with N >= 2, got shape {features.shape}')
    return features.mean(axis=0), np.cov(features, rowvar=False)

# Frechet distance between two Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
def calculate_fid(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'FID needs matching statistics, got mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}')
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    # A singular product (fewer samples than dimensions) can make sqrtm diverge; a tiny ridge is the usual remedy.
    if not np.isfinite(covmean).all():
        ridge = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    # Round-off leaves a negligible imaginary part on a real-valued root; the trace uses the real part.
    return float(diff @ diff + np.trace(sigma1 + sigma2 - 2 * np.real(covmean)))

# Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) per split; mean and std over splits.
def inception_score(probs, splits=10):
    probs = np.asarray(torch.as_tensor(probs).cpu(), dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < splits:
        raise ValueError(f'inception_score needs (N, classes) probabilities with N >= splits={splits}, got shape {probs.shape}')
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 counts as 0: take logs only where the probability is positive.
        log_part = np.log(np.where(part > 0, part, 1))
        log_marginal = np.log(np.where(marginal > 0, marginal, 1))
        kl = (part * (log_part - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))

# Distance from each row of `points` to its k-th nearest neighbour in the same set (the row itself excluded).
def _knn_radii(points, k, batch):
    if points.shape[0] <= k:
        raise ValueError(f'precision/recall with k={k} needs more than {k} samples per set, got {points.shape[0]}')
    # The point itself is its own nearest neighbour at distance 0, hence the (k + 1)-th smallest.
    return torch.cat([torch.cdist(rows, points).kthvalue(k + 1, dim=1).values for rows in points.split(batch)])

# Whether each query lies inside the union of balls (points[j], radii[j]), i.e. on that set's manifold.
def _inside_manifold(queries, points, radii, batch):
    return torch.cat([(torch.cdist(rows, points) <= radii[None, :]).any(dim=1) for rows in queries.split(batch)])

# Improved precision and recall (Kynkaanniemi et al. 2019): precision is the share of generated samples inside the real manifold, recall the share of real samples inside the generated one.
def precision_recall(real_features, gen_features, k=3, batch=1000, device=None):
    device = torch.device('cpu') if device is None else torch.device(device)
    real = torch.as_tensor(real_features).to(device=device, dtype=torch.float32)
    gen = torch.as_tensor(gen_features).to(device=device, dtype=torch.float32)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f'precision/recall needs (N, D) features of equal D, got {tuple(real.shape)} and {tuple(gen.shape)}')
    precision = _inside_manifold(gen, real, _knn_radii(real, k, batch), batch).double().mean()
    recall = _inside_manifold(real, gen, _knn_radii(gen, k, batch), batch).double().mean()
    return float(precision), float(recall)

# ----------------------------------------------------------------------------
# Detector loading and evaluation.

# Raised when a detector cannot give class probabilities: IS is then reported unavailable, never approximated.
class ProbabilitiesUnavailable(Exception):
    pass

# Bytes of a URL fetched once into dnnlib's cache; rank 0 downloads first so the other ranks read its copy.
def _download(url, cache_dir=None):
    leader = dist.get_rank() == 0
    if not leader:
        dist.barrier()
    data, error = None, None
    try:
        with dnnlib.util.open_url(url, cache_dir=cache_dir, cache=True, num_attempts=3, verbose=leader) as f:
            data = f.read()
    except OSError as e:
        error = e
    # The leader reaches the barrier even when it failed, so that the others wake up and fail with it instead of hanging.
    if leader:
        dist.barrier()
    if error is not None:
        raise OSError(f'{error}\nOr pass --detector PATH (detector_url=PATH in Python) naming a local copy of the detector.') from error
    return data

# A detector from pickle bytes, a TorchScript archive, or a torch.save'd module.
def _deserialize_detector(data, source, device):
    try:
        # Zip archives are TorchScript (torch.jit.save) or torch.save files; everything else is a plain pickle.
        if data[:4] == b'PK\x03\x04':
            try:
                return torch.jit.load(io.BytesIO(data), map_location=device)
            except RuntimeError:
                return torch.load(io.BytesIO(data), map_location=device, weights_only=False)
        return pickle.loads(data)
    except (pickle.UnpicklingError, RuntimeError, ImportError, AttributeError, EOFError) as e:
        raise ValueError(f'Cannot load the detector {source} (expected a pickle or TorchScript file): {e}') from e

# Feature detector (default: StyleGAN3's Inception-v3 pickle), in eval mode on `device`.
def load_detector(url_or_path=None, device=None, cache_dir=None):
    source = url_or_path or DETECTOR_URL
    device = dist.device() if device is None else torch.device(device)
    if dnnlib.util.is_url(source):
        data = _download(source, cache_dir=cache_dir)
    elif os.path.isfile(source):
        with open(source, 'rb') as f:
            data = f.read()
    else:
        raise FileNotFoundError(f'Detector file not found: {source}')
    detector = _deserialize_detector(data, source, device)
    if not isinstance(detector, torch.nn.Module):
        raise TypeError(f'The detector {source} holds a {type(detector).__name__}, not a torch module')
    # Gradients are never needed: extraction runs under torch.no_grad().
    return detector.eval().to(device)

# (N, D) features of uint8 RGB NCHW images: the detector's return_features=True output.
def detector_features(detector, images, device):
    with torch.no_grad():
        features = detector(images.to(device), return_features=True)
    if not torch.is_tensor(features) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f'The detector should return (N, D) features for {images.shape[0]} images, got {shape}')
    return features

# Argument names of the detector's forward, for Python modules and TorchScript alike.
def _forward_arguments(detector):
    schema = getattr(detector.forward, 'schema', None)
    if schema is not None:
        return {argument.name for argument in schema.arguments}
    return set(inspect.signature(detector.forward).parameters)

# (N, classes) class probabilities p(y|x) from the detector's return_features=False output, or ProbabilitiesUnavailable.
def detector_probabilities(detector, images, device):
    # StyleGAN3 and EDM compute IS with no_output_bias=True, as the original TensorFlow code did; detectors
    # without that switch are called plainly.
    kwargs = {'no_output_bias': True} if 'no_output_bias' in _forward_arguments(detector) else {}
    try:
        with torch.no_grad():
            probs = detector(images.to(device), return_features=False, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, ValueError) as e:
        raise ProbabilitiesUnavailable(f'the detector failed when asked for class probabilities (return_features=False): {e}') from e
    if not torch.is_tensor(probs) or probs.ndim != 2 or probs.shape[0] != images.shape[0]:
        raise ProbabilitiesUnavailable('the detector does not return (N, classes) probabilities for return_features=False')
    probs = probs.to(torch.float64)
    # Logits or features are not probabilities; turning them into some would fake the score.
    if probs.min() < -1e-6 or not torch.allclose(probs.sum(dim=1), torch.ones_like(probs[:, 0]), atol=1e-3):
        raise ProbabilitiesUnavailable('the detector output for return_features=False is not a probability distribution '
            '(non-negative rows summing to 1)')
    return probs

# ----------------------------------------------------------------------------
# Image sources: a folder or zip, a dataset, or an iterable of uint8 NCHW batches.

# Stack dataset items (uint8 CHW array, label) into one uint8 NCHW tensor, dropping the labels.
def _collate_images(items):
    return torch.from_numpy(np.stack([np.asarray(image) for image, _label in items]))

# Check a batch is uint8 NCHW and give the detector 3 channels (grayscale is repeated).
def _to_rgb(images):
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f'Expected uint8 NCHW image batches, got {images.dtype} of shape {tuple(images.shape)}')
    if images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise ValueError(f'Expected 1 or 3 image channels, got {images.shape[1]}')
    return images

# Indices of the images to use: all, or `num` chosen at random with `seed`, so every rank agrees on the set.
def _select(total, num, seed, what):
    if num is None:
        return np.arange(total)
    if num > total:
        raise ValueError(f'Asked for {num} images but {what} has only {total}; pass a --num of at most {total}')
    return np.sort(np.random.RandomState(seed).choice(total, size=num, replace=False))

# This rank's uint8 RGB NCHW batches (at most `batch` images each) from a path, a dataset or an iterable of batches.
def image_batches(source, batch=64, num=None, seed=0, workers=2, progress=True):
    rank, world = dist.get_rank(), dist.get_world_size()
    what = f'"{os.fspath(source)}"' if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        # A generate.py --outdir (it holds generation_options.json): its samples only, not grid.png.
        generated = os.path.isfile(os.path.join(os.fspath(source), GENERATED_MARKER))
        source = ImageFolderDataset(os.fspath(source), name_pattern=GENERATED_IMAGE_PATTERN if generated else None)
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

# Detector features of this rank's images, one (B, D) tensor per batch.
def compute_features(source, detector, batch=64, device=None, num=None, seed=0, progress=True, workers=2):
    device = dist.device() if device is None else torch.device(device)
    for images in image_batches(source, batch=batch, num=num, seed=seed, workers=workers, progress=progress):
        yield detector_features(detector, images, device)

# ----------------------------------------------------------------------------
# Cross-rank communication, once per evaluation (single-process runs return their input unchanged).

# In-place reduction over ranks: SUM, or MAX for agreeing on shapes and flags.
def _all_reduce(x, op='SUM'):
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(x, op=getattr(torch.distributed.ReduceOp, op))
    return x

# Every rank's rows, interleaved (row i of rank r lands at i * W + r) so a strided split comes back in its original order.
def _all_gather_rows(x):
    world = dist.get_world_size()
    if world == 1:
        return x
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = torch.cat(counts).cpu()
    # all_gather needs equal shapes: pad every share to the largest one, then drop the padding rows.
    padded = x.new_zeros((int(counts.max()),) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    valid = (torch.arange(padded.shape[0])[:, None] < counts[None, :]).flatten()
    return torch.stack(parts, dim=1).flatten(0, 1)[valid.to(x.device)]

# Run the detector over batches, keeping running sums for mu/sigma and, when asked, the rows PR and IS need.
def _accumulate(batches, detector, device, keep_features=False, want_probs=False, ref_dim=None, ref_name=None):
    count, total, outer = 0, None, None
    features, probs, probs_error = [], [], None
    for images in batches:
        f = detector_features(detector, images, device)
        if ref_dim is not None and f.shape[1] != ref_dim:
            raise ValueError(f'Reference statistics {ref_name} have dimension {ref_dim}, but the detector gives '
                f'{f.shape[1]}-dimensional features; use the detector the reference was made with')
        f64 = f.to(torch.float64)
        if total is None:
            total = torch.zeros(f.shape[1], dtype=torch.float64, device=device)
            outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=device)
        count += f.shape[0]
        total += f64.sum(dim=0)
        outer += f64.T @ f64
        if keep_features:
            features.append(f.to(torch.float32))
        if want_probs and probs_error is None:
            try:
                probs.append(detector_probabilities(detector, images, device))
            except ProbabilitiesUnavailable as e:
                probs_error, probs = str(e), []

    # A rank may have seen no images (fewer images than ranks): agree on the shapes, and on whether any rank
    # failed to give probabilities, with one max-reduction; the image count is a sum.
    local_dim = 0 if total is None else total.shape[0]
    local_classes = max((p.shape[1] for p in probs), default=0)
    agreed = _all_reduce(torch.tensor([local_dim, local_classes, int(probs_error is not None)], device=device), 'MAX')
    dim, classes, probs_failed = (int(v) for v in agreed)
    num = int(_all_reduce(torch.tensor([count], device=device)))
    if num < 2:
        raise ValueError(f'Statistics need at least 2 images, got {num}')
    if total is None:
        total = torch.zeros(dim, dtype=torch.float64, device=device)
        outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    _all_reduce(total)
    _all_reduce(outer)
    mu = total / num
    sigma = (outer - num * torch.outer(mu, mu)) / (num - 1)
    stats = {'num': num, 'mu': mu.cpu().numpy(), 'sigma': sigma.cpu().numpy()}
    if keep_features:
        local = torch.cat(features) if features else torch.zeros(0, dim, dtype=torch.float32, device=device)
        stats['features'] = _all_gather_rows(local).cpu().numpy()
    if want_probs:
        # IS needs probabilities for every image: one failing rank makes it unavailable everywhere.
        if probs_failed:
            stats['probs_error'] = probs_error or 'the detector could not give class probabilities on another rank'
        else:
            local = torch.cat(probs) if probs else torch.zeros(0, classes, dtype=torch.float64, device=device)
            stats['probs'] = _all_gather_rows(local).cpu().numpy()
    return stats

# ----------------------------------------------------------------------------
# Reference statistics files.

# Write reference statistics atomically: `mu`/`sigma` as in EDM's files, extras only when given.
def save_ref(path, mu, sigma, features=None, num=None, detector=None):
    arrays = {'mu': np.asarray(mu, np.float64), 'sigma': np.asarray(sigma, np.float64)}
    if features is not None:
        arrays['features'] = np.asarray(features, np.float32)
    if num is not None:
        arrays['num'] = np.int64(num)
    if detector is not None:
        arrays['detector'] = np.str_(detector)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A temporary file in the same folder plus rename: readers never see a half-written file.
    with tempfile.NamedTemporaryFile(dir=folder, suffix='.npz.tmp', delete=False) as f:
        np.savez(f, **arrays)
    os.replace(f.name, path)

# Reference statistics from a local `.npz` or a URL (EDM publishes its references as URLs): a dict of arrays.
def load_ref(path):
    if dnnlib.util.is_url(path):
        with dnnlib.util.open_url(path, cache=True, verbose=dist.get_rank() == 0) as f:
            data = io.BytesIO(f.read())
    elif os.path.isfile(path):
        data = path
    else:
        raise FileNotFoundError(f'Reference statistics not found: {path}')
    with np.load(data, allow_pickle=False) as npz:
        ref = {key: npz[key] for key in npz.files}
    if 'mu' not in ref or 'sigma' not in ref:
        raise ValueError(f'{path} is not a reference statistics file: it needs keys mu and sigma, has {sorted(ref)}')
    return ref

# ----------------------------------------------------------------------------
# High-level entry points used by the CLI and generate.py.

# A list of metric names from "fid,is,pr" or a sequence, checked against METRICS.
def _parse_metrics(metrics):
    names = metrics.split(',') if isinstance(metrics, str) else list(metrics)
    names = [name.strip().lower() for name in names if name.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        raise ValueError(f'Unknown or missing metrics {unknown}; choose from {", ".join(METRICS)}')
    return names

# Statistics of a dataset for a reference file: mu, sigma, num, and up to `features` random real features.
def compute_ref(data, batch=64, detector_url=None, device=None, features=REF_FEATURES, seed=0, workers=2,
        detector=None, progress=True):
    device = dist.device() if device is None else torch.device(device)
    if detector is None:
        detector = load_detector(detector_url, device)
    batches = image_batches(data, batch=batch, workers=workers, progress=progress)
    stats = _accumulate(batches, detector, device, keep_features=features > 0)
    if features > 0:
        kept = _select(stats['num'], min(features, stats['num']), seed, 'the dataset')
        stats['features'] = stats['features'][kept]
    return stats

# Metrics of images against reference statistics; the same dict on every rank.
def calc_metrics(images_path, ref_path=None, metrics=('fid',), num=None, seed=0, batch=64, detector_url=None,
        device=None, detector=None, workers=2, progress=True):
    """`images_path`: folder, zip, dataset, or this rank's iterable of uint8 NCHW batches (then num must be None).
    `ref_path`: `.npz` path, URL or an already loaded dict. `detector`: an already loaded detector, else one is
    loaded from `detector_url`. Returns floats under fid, is, is_std, precision, recall, plus num, and an
    `unavailable` dict naming metrics that could not be computed and why."""
    metrics = _parse_metrics(metrics)
    device = dist.device() if device is None else torch.device(device)
    ref, ref_name = None, None
    if 'fid' in metrics or 'pr' in metrics:
        if ref_path is None:
            raise ValueError('FID and precision/recall need reference statistics (--ref)')
        ref, ref_name = (ref_path, 'the given reference') if isinstance(ref_path, dict) else (load_ref(ref_path), ref_path)
        if 'pr' in metrics and 'features' not in ref:
            raise ValueError(f'{ref_name} holds no features for precision/recall; '
                'recreate it with "python fid.py ref --features N" (N > 0)')
    if detector is None:
        detector = load_detector(detector_url, device)
    batches = image_batches(images_path, batch=batch, num=num, seed=seed, workers=workers, progress=progress)
    stats = _accumulate(batches, detector, device, keep_features='pr' in metrics, want_probs='is' in metrics,
        ref_dim=None if ref is None else int(np.shape(ref['mu'])[0]), ref_name=ref_name)

    # Rank 0 computes (sqrtm and k-NN are heavy), then every rank receives the same results.
    results = {'num': stats['num']}
    if dist.get_rank() == 0:
        if 'fid' in metrics:
            results['fid'] = calculate_fid(stats['mu'], stats['sigma'], ref['mu'], ref['sigma'])
        if 'is' in metrics:
            if 'probs' in stats:
                results['is'], results['is_std'] = inception_score(stats['probs'])
            else:
                results.setdefault('unavailable', {})['is'] = stats['probs_error']
        if 'pr' in metrics:
            results['precision'], results['recall'] = precision_recall(ref['features'], stats['features'], device=device)
    if dist.get_world_size() > 1:
        box = [results]
        torch.distributed.broadcast_object_list(box, src=0)
        results = box[0]
    return results

# ----------------------------------------------------------------------------
# Command line.

# Write JSON atomically (temporary file in the same folder, then rename).
def _write_json(path, obj):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=folder, suffix='.json.tmp', delete=False) as f:
        json.dump(obj, f, indent=2)
    os.replace(f.name, path)

# Print the metrics last, one `name=value` per line, so scripts can grep them.
def _print_metrics(results):
    for name, reason in results.get('unavailable', {}).items():
        dist.print0(f'{name} unavailable: {reason}')
    for name in ('fid', 'is', 'is_std', 'precision', 'recall'):
        if name in results:
            dist.print0(f'{name}={results[name]:g}')
    for name in results.get('unavailable', {}):
        dist.print0(f'{name}=unavailable')

@click.group()
def cli():
    """Calculate FID, Inception Score and precision/recall for a set of images.

    Examples:

    \b
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    \b
    # FID of 50000 generated images (one or more GPUs)
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz

    \b
    # FID, Inception Score and precision/recall of 10000 images
    python fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz --num=10000 --metrics=fid,is,pr

    Under torchrun write `-n 10000` instead of `--num 10000` (or put `--` before fid.py): torchrun's
    own argument parser reads `--num` as an abbreviation of its `--numa-binding` and stops.
    """

# Options both subcommands share.
def _common_options(fn):
    fn = click.option('--workers', help='Data loader worker processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)(fn)
    fn = click.option('--detector', 'detector_url', help='Detector pickle/TorchScript path or URL  [default: Inception-v3]', metavar='PATH|URL', type=str, default=None)(fn)
    fn = click.option('--batch', help='Maximum batch size per rank', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)(fn)
    return fn

@cli.command()
@click.option('--images', 'images_path', help='Images to evaluate', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (needed for fid, pr)', metavar='NPZ|URL', type=str)
@click.option('--num', '-n', help='Number of images to use (-n under torchrun)', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for choosing the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--metrics', help='Comma-separated metrics: fid, is, pr', metavar='LIST', type=str, default='fid', show_default=True)
@click.option('--out', help='Also write the results to this JSON file', metavar='JSON', type=str)
@_common_options
def calc(images_path, ref_path, num, seed, metrics, out, batch, detector_url, workers):
    """Calculate metrics for a folder or zip of images."""
    with dist.session():
        try:
            dist.print0(f'Evaluating {metrics} on {num} images from "{images_path}"...')
            results = calc_metrics(images_path, ref_path, metrics=metrics, num=num, seed=seed, batch=batch,
                detector_url=detector_url, workers=workers)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        if dist.get_rank() == 0 and out:
            _write_json(out, dict(results, images=images_path, ref=ref_path, seed=seed, detector=detector_url or DETECTOR_URL))
        _print_metrics(results)

@cli.command()
@click.option('--data', 'data_path', help='Dataset folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--features', help='Real features stored for precision/recall (0: none)', metavar='INT', type=click.IntRange(min=0), default=REF_FEATURES, show_default=True)
@_common_options
def ref(data_path, dest_path, features, batch, detector_url, workers):
    """Calculate reference statistics of a dataset."""
    with dist.session():
        try:
            dist.print0(f'Calculating reference statistics of "{data_path}"...')
            stats = compute_ref(data_path, batch=batch, detector_url=detector_url, features=features, workers=workers)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        if dist.get_rank() == 0:
            save_ref(dest_path, stats['mu'], stats['sigma'], features=stats.get('features'), num=stats['num'],
                detector=detector_url or DETECTOR_URL)
        dist.barrier()
        dist.print0(f'Saved statistics of {stats["num"]} images to "{dest_path}"')

if __name__ == '__main__':
    cli()
