"""The metrics on features and class probabilities, as plain functions (no detector, no images):
the Frechet distance (FID, sFID, FD-DINOv2), the Inception Score, improved precision/recall and KID.

- FID: Frechet distance of Gaussians fitted to the features (Heusel et al. 2017); with the DINOv2 or
  CLIP detector the same formula gives FD-DINOv2 / CLIP-FID.
- KID: unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018), averaged over disjoint
  blocks of real and generated features; its standard error is the std of the blocks / sqrt(blocks).
- IS (Salimans et al. 2016) and improved precision/recall (Kynkaanniemi et al. 2019).
"""

import math

import numpy as np
import torch

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
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))

# tr sqrt(S1 S2) of two covariance matrices (symmetric, positive semi-definite). S1 S2 is similar to
# the symmetric A S2 A with A = S1^(1/2), whose eigenvalues are real and >= 0, so the trace is the
# sum of their square roots: two symmetric eigen-decompositions, about 6x faster than
# scipy.linalg.sqrtm(S1 @ S2) at 2048 x 2048 and free of its complex round-off (the same value to
# ~1e-10 relative; tests/test_fid.py checks it against closed forms and sqrtm). Eigenvalues below
# zero are round-off of a singular matrix (fewer samples than dimensions) and count as zero.
def trace_sqrt_product(sigma1, sigma2):
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())

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
