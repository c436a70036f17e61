"""Metrics of generated images: FID, KID, sFID, Inception Score and precision/recall, as EDM reports them.

The library behind `fid.py` (a command line on top), `generate.py --fid-ref` and `train.py --metrics`
(evaluation/snapshot_metrics.py). Images arrive from any source of `image_sources.image_batches`; a
detector (`evaluation.detectors`) turns them into features; running sums give mu / sigma; the rows
that KID, precision/recall and IS need are kept; `feature_metrics` computes the numbers.

Under `torchrun` each rank feeds its own share; per-rank sums are all-reduced and the kept rows
all-gathered once at the end; rank 0 computes the metrics and every rank receives the same numbers.
sFID is the FID of spatial features (Nash et al. 2021), when the detector has `spatial_features()`.
"""

import io
import os

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils.checkpoint import write_atomic
from evaluation.detectors import (ProbabilitiesUnavailable, detector_features, detector_probabilities, detector_spatial,
                                  has_spatial, load_detector)
from evaluation.feature_metrics import calculate_fid, inception_score, kernel_inception_distance, precision_recall
from evaluation.image_sources import image_batches, scan_folder, select_indices, to_rgb

# Metric names of `calc_metrics`.
METRICS = ('fid', 'kid', 'sfid', 'is', 'pr')

# Random real features kept in a reference file, enough for stable precision/recall and KID.
REF_FEATURES = 10000

# Order of printed metrics (print_metrics).
PRINT_ORDER = ('fid', 'fid_mean', 'fid_std', 'kid', 'kid_se', 'sfid', 'is', 'is_std', 'precision', 'recall')

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
        raise ValueError('FID, KID, sFID and precision/recall need reference statistics (ref)')
    ref, name = (ref_path, 'the given reference') if isinstance(ref_path, dict) else (load_ref(ref_path), ref_path)
    for metric in ('pr', 'kid'):
        if metric in metrics and 'features' not in ref:
            raise ValueError(f'{name} holds no features for {metric}; recreate it keeping N > 0 features')
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
        raise ValueError(f'splits={splits} needs at least {2 * splits} images, got {len(chosen)}')
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
