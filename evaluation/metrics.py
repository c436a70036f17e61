"""Metrics of generated images: FID, KID, sFID, Inception Score and precision/recall, as EDM reports them.

The library behind `fid.py` (a command line on top), `generate.py --fid-ref` and `train.py --metrics`.
Images arrive as a folder or zip of image files, a dataset, or this rank's iterable of uint8 NCHW
batches (generated samples streamed straight from a network, `image_batches`); a detector (`evaluation.detectors`) turns them into
features; running sums give mu / sigma; the rows that KID, precision/recall and IS need are kept.

Under `torchrun` each rank feeds its own share; per-rank sums are all-reduced and the kept rows
all-gathered once at the end; rank 0 computes the metrics and every rank receives the same numbers.

- FID: Frechet distance of Gaussians fitted to the features (Heusel et al. 2017); with the DINOv2 or
  CLIP detector the same formula gives FD-DINOv2 / CLIP-FID.
- KID: unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018), averaged over disjoint
  blocks of real and generated features; its standard error is the std of the blocks / sqrt(blocks).
- sFID: FID of spatial features (Nash et al. 2021), when the detector has `spatial_features()`.
- IS (Salimans et al. 2016) and improved precision/recall (Kynkaanniemi et al. 2019).
"""

import hashlib
import inspect
import io
import json
import math
import os
import re
import time

import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils.checkpoint import append_line, write_atomic, write_json
from training.conditions import condition_kind, make_condition_fn
from training.dataset import GENERATED_IMAGE_PATTERN, GENERATED_MARKER, ImageFolderDataset
from evaluation.detectors import DETECTOR_URL, NAMED as NAMED_DETECTORS, detector_name, load_detector  # noqa: F401 (part of this API)
from sampling.generation import generate_batches

# Metric names of `calc_metrics`.
METRICS = ('fid', 'kid', 'sfid', 'is', 'pr')

# Random real features kept in a reference file, enough for stable precision/recall and KID.
REF_FEATURES = 10000

# Order of printed metrics (print_metrics).
PRINT_ORDER = ('fid', 'fid_mean', 'fid_std', 'kid', 'kid_se', 'sfid', 'is', 'is_std', 'precision', 'recall')

# Inception Score splits (as in the paper): IS needs at least this many images.
IS_SPLITS = 10

# KID: features per block (as StyleGAN's KID) and the most blocks used.
KID_SUBSET_SIZE = 1000
KID_MAX_SUBSETS = 100

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
def inception_score(probs, splits=IS_SPLITS):
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

# Unbiased MMD^2 of two equally sized blocks with the kernel k(x, y) = (x.y / D + 1)^3.
def _mmd2_unbiased(x, y):
    m, d = x.shape
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    # The diagonals k(x_i, x_i) are left out: they make the plain estimate biased.
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())

# Kernel Inception Distance (Binkowski et al. 2018): mean of unbiased MMD^2 over disjoint random blocks,
# and its standard error (blocks are independent, so std / sqrt(blocks)).
def kernel_inception_distance(real_features, gen_features, subset_size=KID_SUBSET_SIZE, max_subsets=KID_MAX_SUBSETS, seed=0):
    real = np.asarray(torch.as_tensor(real_features).cpu(), dtype=np.float64)
    gen = np.asarray(torch.as_tensor(gen_features).cpu(), dtype=np.float64)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f'KID needs (N, D) features of equal D, got {real.shape} and {gen.shape}')
    n = min(len(real), len(gen))
    if n < 4:
        raise ValueError(f'KID needs at least 4 real and 4 generated features, got {len(real)} and {len(gen)}')
    # At least two blocks, so that the standard error exists.
    m = min(subset_size, n // 2)
    blocks = min(n // m, max_subsets)
    rng = np.random.RandomState(seed)
    real, gen = real[rng.permutation(len(real))], gen[rng.permutation(len(gen))]
    values = np.array([_mmd2_unbiased(real[i * m:(i + 1) * m], gen[i * m:(i + 1) * m]) for i in range(blocks)])
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(blocks)), int(blocks), int(m)

# ----------------------------------------------------------------------------
# Calling a detector.

# Raised when a detector cannot give class probabilities: IS is then reported unavailable, never approximated.
class ProbabilitiesUnavailable(Exception):
    pass

# (N, D) features of uint8 RGB NCHW images: the detector's return_features=True output.
def detector_features(detector, images, device):
    with torch.no_grad():
        features = detector(images.to(device), return_features=True)
    if not torch.is_tensor(features) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f'The detector should return (N, D) features for {images.shape[0]} images, got {shape}')
    return features

# (N, Ds) spatial features for sFID, from the detector's `spatial_features` method.
def detector_spatial(detector, images, device):
    with torch.no_grad():
        spatial = detector.spatial_features(images.to(device))
    return spatial.flatten(1)

# Whether the detector offers spatial features (sFID).
def has_spatial(detector):
    return hasattr(detector, 'spatial_features')

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
        raise ValueError(f'Asked for {num} images but {what} has only {total}; pass a --num of at most {total}')
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
# Statistics over all ranks (torch_utils.distributed: one reduction or gather per evaluation).

# Running sum and outer product of feature rows, in float64 on the device.
class _Moments:
    def __init__(self):
        self.total, self.outer = None, None

    def add(self, f):
        f64 = f.to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.total += f64.sum(dim=0)
        self.outer += f64.T @ f64

    # mu and sigma over all ranks, for `num` images and features of dimension `dim`.
    def reduce(self, num, dim, device):
        if self.total is None:
            self.total = torch.zeros(dim, dtype=torch.float64, device=device)
            self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        dist.all_reduce_([self.total, self.outer])
        mu = self.total / num
        sigma = (self.outer - num * torch.outer(mu, mu)) / (num - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

# Run the detector over batches, keeping running sums for mu/sigma and, when asked, the rows PR, KID and IS need
# and the moments of spatial features (sFID). The same dict on every rank.
def accumulate(batches, detector, device, keep_features=False, want_probs=False, want_spatial=False, ref_dim=None, ref_name=None):
    count, moments, spatial = 0, _Moments(), _Moments()
    features, probs, probs_error = [], [], None
    want_spatial = want_spatial and has_spatial(detector)
    dim = spatial_dim = 0
    for images in batches:
        images = to_rgb(images)
        f = detector_features(detector, images, device)
        if ref_dim is not None and f.shape[1] != ref_dim:
            raise ValueError(f'Reference statistics {ref_name} have dimension {ref_dim}, but the detector gives '
                f'{f.shape[1]}-dimensional features; use the detector the reference was made with')
        count += f.shape[0]
        dim = f.shape[1]
        moments.add(f)
        if want_spatial:
            s = detector_spatial(detector, images, device)
            spatial_dim = s.shape[1]
            spatial.add(s)
        if keep_features:
            features.append(f.to(torch.float32))
        if want_probs and probs_error is None:
            try:
                probs.append(detector_probabilities(detector, images, device))
            except ProbabilitiesUnavailable as e:
                probs_error, probs = str(e), []

    # A rank may have seen no images (fewer images than ranks): agree on the shapes, and on whether any rank
    # failed to give probabilities, with one max-reduction; the image count is a sum.
    local_classes = max((p.shape[1] for p in probs), default=0)
    agreed = torch.tensor([dim, local_classes, int(probs_error is not None), spatial_dim], device=device)
    dim, classes, probs_failed, spatial_dim = (int(v) for v in dist.all_reduce_([agreed], op='max')[0])
    num = int(dist.all_reduce_([torch.tensor([count], device=device)])[0])
    if num < 2:
        raise ValueError(f'Statistics need at least 2 images, got {num}')
    mu, sigma = moments.reduce(num, dim, device)
    stats = {'num': num, 'mu': mu, 'sigma': sigma}
    if want_spatial:
        stats['mu_s'], stats['sigma_s'] = spatial.reduce(num, spatial_dim, device)
    if keep_features:
        local = torch.cat(features) if features else torch.zeros(0, dim, dtype=torch.float32, device=device)
        stats['features'] = dist.all_gather_rows(local).cpu().numpy()
    if want_probs:
        # IS needs probabilities for every image: one failing rank makes it unavailable everywhere.
        if probs_failed:
            stats['probs_error'] = probs_error or 'the detector could not give class probabilities on another rank'
        else:
            local = torch.cat(probs) if probs else torch.zeros(0, classes, dtype=torch.float64, device=device)
            stats['probs'] = dist.all_gather_rows(local).cpu().numpy()
    return stats

# ----------------------------------------------------------------------------
# Reference statistics files.

# Write reference statistics atomically: `mu`/`sigma` as in EDM's files, extras only when given.
def save_ref(path, mu, sigma, features=None, num=None, detector=None, mu_s=None, sigma_s=None):
    arrays = {'mu': np.asarray(mu, np.float64), 'sigma': np.asarray(sigma, np.float64)}
    if features is not None:
        arrays['features'] = np.asarray(features, np.float32)
    if num is not None:
        arrays['num'] = np.int64(num)
    if detector is not None:
        arrays['detector'] = np.str_(detector)
    if mu_s is not None:
        arrays['mu_s'], arrays['sigma_s'] = np.asarray(mu_s, np.float64), np.asarray(sigma_s, np.float64)
    write_atomic(path, lambda f: np.savez(f, **arrays))

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

# Statistics for a reference file from this rank's batches: mu, sigma, num, up to `features` random real
# features, and the spatial moments when the detector has them.
def reference_stats(batches, detector, device, features=REF_FEATURES, seed=0):
    stats = accumulate(batches, detector, device, keep_features=features > 0, want_spatial=True)
    if features > 0:
        kept = select_indices(stats['num'], min(features, stats['num']), seed, 'the dataset')
        stats['features'] = stats['features'][kept]
    return stats

# ----------------------------------------------------------------------------
# Metrics of images against reference statistics.

# A list of metric names from "fid,is,pr" or a sequence, checked against METRICS.
def parse_metrics(metrics):
    names = metrics.split(',') if isinstance(metrics, str) else list(metrics)
    names = [name.strip().lower() for name in names if name.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        raise ValueError(f'Unknown or missing metrics {unknown}; choose from {", ".join(METRICS)}')
    return names

# The reference as a dict, checked for what the metrics need; (ref, name for messages).
def check_ref(ref_path, metrics):
    if not {'fid', 'pr', 'kid', 'sfid'} & set(metrics):
        return None, None
    if ref_path is None:
        raise ValueError('FID, KID, sFID and precision/recall need reference statistics (--ref)')
    ref, name = (ref_path, 'the given reference') if isinstance(ref_path, dict) else (load_ref(ref_path), ref_path)
    for metric in ('pr', 'kid'):
        if metric in metrics and 'features' not in ref:
            raise ValueError(f'{name} holds no features for {metric}; recreate it with "python fid.py ref --features N" (N > 0)')
    return ref, name

# The requested metrics of accumulated statistics (computed here, on the calling rank).
def evaluate(stats, ref, metrics, device='cpu'):
    results = {'num': stats['num']}
    unavailable = {}
    if 'fid' in metrics:
        results['fid'] = calculate_fid(stats['mu'], stats['sigma'], ref['mu'], ref['sigma'])
    if 'kid' in metrics:
        results['kid'], results['kid_se'], results['kid_subsets'], results['kid_subset_size'] = \
            kernel_inception_distance(ref['features'], stats['features'])
    if 'sfid' in metrics:
        if 'mu_s' not in stats:
            unavailable['sfid'] = 'the detector has no spatial features (a spatial_features() method)'
        elif 'mu_s' not in ref:
            unavailable['sfid'] = 'the reference statistics hold no spatial statistics (mu_s, sigma_s)'
        else:
            results['sfid'] = calculate_fid(stats['mu_s'], stats['sigma_s'], ref['mu_s'], ref['sigma_s'])
    if 'is' in metrics:
        if 'probs' in stats:
            results['is'], results['is_std'] = inception_score(stats['probs'])
        else:
            unavailable['is'] = stats['probs_error']
    if 'pr' in metrics:
        results['precision'], results['recall'] = precision_recall(ref['features'], stats['features'], device=device)
    if unavailable:
        results['unavailable'] = unavailable
    return results

# Metrics of images against reference statistics; the same dict on every rank.
def calc_metrics(images, ref_path=None, metrics=('fid',), detector=None, device=None, detector_url=None, trust_pickle=False,
        num=None, seed=0, batch=64, workers=2, progress=False, splits=1):
    """`images`: folder, zip, dataset, or this rank's iterable of uint8 NCHW batches (then `num` must be None).
    `ref_path`: `.npz` path, URL or an already loaded dict. `detector`: an already loaded detector, else one
    is loaded from `detector_url`. Returns floats under fid, kid, kid_se, sfid, is, is_std, precision, recall,
    plus num, and an `unavailable` dict naming metrics that could not be computed and why. `splits` > 1:
    also FID of that many disjoint parts of the images (in file order), under fid_splits, fid_mean, fid_std."""
    metrics = parse_metrics(metrics)
    device = dist.device() if device is None else torch.device(device)
    ref, ref_name = check_ref(ref_path, metrics if splits <= 1 else metrics + ['fid'])
    if detector is None:
        detector = load_detector(detector_url, device, trust_pickle=trust_pickle)
    ref_dim = None if ref is None else int(np.shape(ref['mu'])[0])
    want = dict(keep_features=bool({'pr', 'kid'} & set(metrics)), want_probs='is' in metrics,
                want_spatial='sfid' in metrics, ref_dim=ref_dim, ref_name=ref_name)
    if splits <= 1:
        batches = image_batches(images, batch=batch, num=num, seed=seed, workers=workers, progress=progress)
        stats = accumulate(batches, detector, device, **want)
        # Rank 0 computes (sqrtm and k-NN are heavy), then every rank receives the same results.
        results = evaluate(stats, ref, metrics, device) if dist.get_rank() == 0 else None
        return dist.broadcast_object(results)

    # Disjoint consecutive parts of the chosen images (contiguous seed ranges when the files are seeds).
    if not isinstance(images, (str, os.PathLike, torch.utils.data.Dataset)):
        raise ValueError('splits need a folder, zip or dataset of images, not an iterable of batches')
    named = isinstance(images, (str, os.PathLike))
    dataset = scan_folder(images) if named else images
    chosen = select_indices(len(dataset), num, seed, f'"{images}"' if named else 'the dataset')
    if len(chosen) < 2 * splits:
        raise ValueError(f'--splits {splits} needs at least {2 * splits} images, got {len(chosen)}')
    parts = []
    for i, part in enumerate(np.array_split(chosen, splits)):
        dist.print0(f'Split {i + 1}/{splits}: {len(part)} images')
        batches = image_batches(torch.utils.data.Subset(dataset, part.tolist()), batch=batch, workers=workers, progress=progress)
        parts.append(accumulate(batches, detector, device, **want))
    results = None
    if dist.get_rank() == 0:
        results = evaluate(combine_stats(parts), ref, metrics, device)
        fids = [calculate_fid(p['mu'], p['sigma'], ref['mu'], ref['sigma']) for p in parts]
        results.update(fid_splits=fids, fid_mean=float(np.mean(fids)), fid_std=float(np.std(fids, ddof=1)), splits=splits)
    return dist.broadcast_object(results)

# ----------------------------------------------------------------------------
# Metrics during training (train.py --metrics): each snapshot's samples against the training data.

# One training-time metric: its name, the kind of calc_metrics it runs, and how many samples.
def parse_training_metrics(spec):
    """'fid50k,kid10k,pr10k,fid200' -> [(name, kind, num)]; kinds fid, kid, pr; k = thousands."""
    names = spec.split(',') if isinstance(spec, str) else list(spec or [])
    out = []
    for name in (n.strip().lower() for n in names if n.strip()):
        m = re.fullmatch(r'(fid|kid|pr)(\d+)(k?)', name)
        if m is None:
            raise ValueError(f'Unknown metric {name!r}: expected fid, kid or pr followed by a sample count, '
                             'e.g. fid50k, fid10k, kid10k, pr10k, fid500')
        num = int(m.group(2)) * (1000 if m.group(3) else 1)
        if num < 2:
            raise ValueError(f'Metric {name!r}: needs at least 2 samples')
        if name not in [n for n, _, _ in out]:
            out.append((name, m.group(1), num))
    return out

# Identity of a file (path, size, modification time) or of a name/URL, for cache keys.
def _file_identity(path):
    if path and os.path.isfile(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, int(st.st_mtime)]
    return path

# Reference statistics of the training data with this detector, computed once and cached (keyed by dataset and detector).
def training_reference(dataset_kwargs, detector, detector_url=None, device=None, batch=64, cache_dir=None):
    kwargs = dict(dataset_kwargs, xflip=False, use_labels=False)    # The data as it is, without augmentation.
    dataset = dnnlib.util.construct_class_by_name(**kwargs)
    key = json.dumps(dict(dataset=kwargs, data=_file_identity(kwargs.get('path')), num=len(dataset),
                          shape=list(dataset.image_shape), detector=_file_identity(detector_name(detector_url))),
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]
    cache_dir = cache_dir or dnnlib.util.make_cache_dir_path('fid-refs')
    path = os.path.join(cache_dir, f'{dataset.name}-{digest}.npz')
    # Every rank agrees on whether the file is there (rank 0 may be writing it right now otherwise).
    found = torch.tensor([int(os.path.isfile(path))], device=device)
    dist.all_reduce_([found], op='min')
    if int(found):
        dist.print0(f'Reference statistics: {path} (cached)')
        return path, load_ref(path)
    dist.print0(f'Computing reference statistics of {len(dataset)} training images into {path}...')
    stats = reference_stats(image_batches(dataset, batch=batch, workers=0, progress=False), detector, device)
    if dist.get_rank() == 0:
        save_ref(path, stats['mu'], stats['sigma'], features=stats['features'], num=stats['num'],
                 detector=detector_name(detector_url), mu_s=stats.get('mu_s'), sigma_s=stats.get('sigma_s'))
    dist.barrier()
    return path, {key: stats[key] for key in ('mu', 'sigma', 'features', 'mu_s', 'sigma_s') if key in stats}

# Lower is better for these; precision/recall are two numbers, so no single "best".
_BEST_OF = {'fid': 'fid', 'kid': 'kid'}

class SnapshotMetrics:
    """Evaluates each training snapshot: samples of seeds 0..N-1 streamed into the detector on all ranks,
    one line per snapshot in `metric-<name>.jsonl`, the best snapshot so far in `metric-<name>-best.json`."""

    def __init__(self,
        metrics,                    # 'fid50k,kid10k' or a list of names (parse_training_metrics).
        run_dir,                    # Run folder (rank 0 writes there).
        dataset_kwargs,             # The training set: its reference statistics are computed from it.
        detector_url    = None,     # Detector name, path or URL; None = Inception-v3.
        trust_pickle    = False,    # Allow a detector pickle that runs code when loaded.
        batch           = 64,       # Samples per batch and rank.
        device          = None,     # Where to generate and detect.
        cache_dir       = None,     # Reference statistics cache; None = <ddn cache>/fid-refs.
    ):
        self.metrics = parse_training_metrics(metrics)
        self.run_dir, self.batch = run_dir, batch
        self.device = dist.device() if device is None else torch.device(device)
        self.detector_url = detector_url
        self.detector = load_detector(detector_url, self.device, trust_pickle=trust_pickle)
        self.ref_path, self.ref = training_reference(dataset_kwargs, self.detector, detector_url, self.device, batch, cache_dir)
        self.best = {}
        for name, _kind, _num in self.metrics:  # A resumed run continues the record of its folder.
            best_path = os.path.join(run_dir, f'metric-{name}-best.json')
            if os.path.isfile(best_path):
                with open(best_path) as f:
                    self.best[name] = json.load(f)

    # Evaluate `net` (the snapshot `snapshot` at `kimg`); returns {name: results}, the same on every rank.
    def __call__(self, net, snapshot, kimg):
        out = {}
        by_num = {}
        for name, kind, num in self.metrics:    # Metrics over the same samples share one generation.
            by_num.setdefault(num, []).append((name, kind))
        rank, world = dist.get_rank(), dist.get_world_size()
        for num, group in by_num.items():
            start = time.time()
            kinds = sorted({kind for _, kind in group})
            batches = generator_batches(net, range(num)[rank::world], batch=self.batch)
            results = calc_metrics(batches, self.ref, kinds, detector=self.detector, device=self.device)
            seconds = time.time() - start
            for name, kind in group:
                out[name] = results
                self._record(name, kind, results, snapshot, kimg, seconds)
        return out

    def _record(self, name, kind, results, snapshot, kimg, seconds):
        keys = {'fid': ['fid'], 'kid': ['kid', 'kid_se'], 'pr': ['precision', 'recall']}[kind]
        values = {key: results[key] for key in keys}
        line = dict(metric=name, snapshot=snapshot, kimg=kimg, num=results['num'], results=values,
                    total_time=seconds, detector=detector_name(self.detector_url), ref=self.ref_path, timestamp=time.time())
        text = f'{name} {snapshot}: ' + '  '.join(f'{k} {v:.6g}' for k, v in values.items()) + f'  ({seconds:.1f} s)'
        if kind in _BEST_OF:
            line['value'] = value = values[_BEST_OF[kind]]
            best = self.best.get(name)
            if best is None or value < best['value']:
                best = self.best[name] = dict(metric=name, snapshot=snapshot, kimg=kimg, value=value)
                if dist.get_rank() == 0:
                    write_json(os.path.join(self.run_dir, f'metric-{name}-best.json'), best)
            text += f'  best {best["value"]:.6g} at {best["snapshot"]}'
        if dist.get_rank() == 0:
            append_line(os.path.join(self.run_dir, f'metric-{name}.jsonl'), json.dumps(line))
        dist.print0(text)

# ----------------------------------------------------------------------------

# The statistics of several disjoint image sets as one (moments added, kept rows concatenated in order).
def combine_stats(parts):
    num = sum(p['num'] for p in parts)
    out = {'num': num}
    for mu_key, sigma_key in (('mu', 'sigma'), ('mu_s', 'sigma_s')):
        if mu_key not in parts[0]:
            continue
        total = sum(p['num'] * p[mu_key] for p in parts)
        outer = sum((p['num'] - 1) * p[sigma_key] + p['num'] * np.outer(p[mu_key], p[mu_key]) for p in parts)
        mu = total / num
        out[mu_key], out[sigma_key] = mu, (outer - num * np.outer(mu, mu)) / (num - 1)
    for key in ('features', 'probs'):
        if all(key in p for p in parts):
            out[key] = np.concatenate([p[key] for p in parts])
    errors = [p['probs_error'] for p in parts if 'probs_error' in p]
    if errors:
        out.pop('probs', None)
        out['probs_error'] = errors[0]
    return out

# ----------------------------------------------------------------------------
# Printing results (fid.py, generate.py).

# Print the metrics of `results` (rank 0), one `name=value` per line in the order of `order`, so
# scripts can grep them (generate.py puts `fid` last, for scripts that read the last line). A metric
# that could not be computed prints its reason first and `name=unavailable` in its place; FID over
# disjoint splits (fid.py --splits) also prints a summary line.
def print_metrics(results, order=PRINT_ORDER):
    unavailable = results.get('unavailable', {})
    for name, reason in unavailable.items():
        dist.print0(f'{name} unavailable: {reason}')
    if 'fid_splits' in results:
        dist.print0(f'FID over {results["splits"]} disjoint splits: {results["fid_mean"]:g} +- {results["fid_std"]:g} '
                    f'({", ".join(f"{v:g}" for v in results["fid_splits"])})')
    for name in order:
        if name in results:
            dist.print0(f'{name}={results[name]:g}')
        elif name in unavailable:
            dist.print0(f'{name}=unavailable')
