"""Zero-shot conditional generation (ZSCG): scorers and choosers that guide a trained, unconditional DDN.

Paper §3.5 / our spec `DDN.md` §5. At every layer a DDN emits K candidates; sampling keeps a
random one, training the one nearest to the target. To generate under a condition the network never
saw in training, a *scorer* ranks the K candidates against the condition and a *chooser* keeps one.
No gradient flows: a scorer is any black box, so a classifier, CLIP or a hand-written rule can steer an
unconditional model. Usage:

    scorer = CombinedScorer([(InpaintScorer(x, mask), 1.0), (ColorScorer(x), 0.5)])
    out = net(scorer=scorer, chooser=choosers.TemperatureChooser(0.3), seeds=[0, 1, 2])

This file holds the contracts' helpers, the scorers that compare pixels (L2, super-resolution,
inpainting, colour, low-bit, edges), `CombinedScorer` and `final_distance`; the scorers that run a
network (classifier, CLIP, style) are in `sampling/network_scorers.py`, the choosers in
`sampling/choosers.py`. (`sampling/guide_spec.py` builds a scorer from a spec string such as
'inpaint:1,color:0.5' and files, for the scripts.) The two contracts (from `training/ddl.py`):
- Scorer:  `scorer(cand, info) -> dist`, cand (B, K, C, H, W) in [-1, 1], `info` a LayerInfo(index,
  num_layers, K, size); dist (B, K), lower is better.
- Chooser: `chooser(dist, info, u) -> codes (B,)`, u (B,) the per-seed uniform numbers of this layer
  (or None). Every chooser of choosers.py uses u for its randomness and its tie breaks, so guided sampling is
  deterministic per seed and does not depend on the batch.

Conventions of the built-in scorers:
- Conditions are tensors in [-1, 1] at the network's full resolution, (C, H, W) or (N, C, H, W) with N
  1 (shared by the batch) or B (one per sample). A layer of size s compares at s: the condition is
  area-resized to s (once per size and device, then cached).
- Distances are means over pixels (and channels), so layers of different sizes are on a like scale;
  only the ranking within a layer matters for argmin, and `CombinedScorer` / `TemperatureChooser`
  normalise per sample anyway.
- A scorer that has nothing to say at a layer (CLIP on a 2x2 image) returns a constant row. Every
  chooser of choosers.py, and the network's default `training.ddl.argmin`, maps a constant row to
  `floor(u * K)`, the very code unguided sampling gives for that seed, so such layers stay random,
  exactly as without guidance.
"""

import math

import numpy as np
import torch

from training.ddl import LayerInfo, resize_area
from training.image_ops import EDGE_SOFTNESS, EDGE_THRESHOLD, edge_map, grayscale, quantize

# ----------------------------------------------------------------------------
# Small tensor helpers shared by the scorers.

# Apply an image function to candidates (B, K, C, H, W) by folding K into the batch.
def _per_candidate(fn, cand):
    B, K = cand.shape[:2]
    out = fn(cand.reshape(B * K, *cand.shape[2:]))
    return out.reshape(B, K, *out.shape[1:])

# Per-sample z-scores of distances (B, K) over the K candidates; constant rows become zeros.
# Used to put scorers of different units on one scale (CombinedScorer) and to give a
# temperature a meaning that does not depend on the scorer (TemperatureChooser).
def normalize_distances(dist):
    dist = dist.double()
    centered = dist - dist.mean(1, keepdim=True)
    std = centered.square().mean(1, keepdim=True).sqrt()
    scale = dist.abs().amax(1, keepdim=True)
    flat = std <= 1e-12 * scale + 1e-300
    return torch.where(flat, torch.zeros_like(centered), centered / torch.where(flat, 1.0, std))

# Bring a condition to (N, C, H, W) float32 and check it; N is 1 or the batch size. `what` names it in errors.
def as_batch(x, what, channels=None):
    if not torch.is_tensor(x):
        x = torch.as_tensor(np.asarray(x))
    x = x.float()
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f'{what} must be a square image (C, H, W) or batch (N, C, H, W), got shape {tuple(x.shape)}')
    if channels is not None and x.shape[1] not in channels:
        raise ValueError(f'{what} has {x.shape[1]} channel(s); expected {" or ".join(map(str, channels))}')
    return x

# Broadcast a per-sample condition (N, ...) against a batch of B candidates.
def match_batch(x, B, what):
    if x.shape[0] not in (1, B):
        raise ValueError(f'{what} holds {x.shape[0]} images but the batch has {B} samples (give 1 or {B})')
    return x

# Condition resized per (size, device), computed once: each layer size asks again and again.
class ResizeCache:
    def __init__(self, fn):
        self.fn = fn
        self.cache = {}

    def __call__(self, size, device):
        key = (size, str(device))
        if key not in self.cache:
            self.cache[key] = self.fn(size, device)
        return self.cache[key]

# Mean squared error between candidates (B, K, C, H, W) and a reference (N, C, H, W), N in {1, B}.
def _mse(cand, ref):
    return (cand - ref[:, None]).square().mean((2, 3, 4))

# ----------------------------------------------------------------------------
# L2: the candidate nearest to a guide image (reconstruction, the paper's encoder, "l2").

class L2Scorer:
    def __init__(self,
        guide,                      # (C, H, W) or (N, C, H, W) guide image(s) in [-1, 1], full resolution.
    ):
        self.guide = as_batch(guide, 'l2 guide image')
        self._at = ResizeCache(lambda size, device: resize_area(self.guide.to(device), size))

    def __call__(self, cand, info):
        ref = match_batch(self._at(info.size, cand.device), cand.shape[0], 'l2 guide image')
        return _mse(cand.float(), ref)

# ----------------------------------------------------------------------------
# Super-resolution: the candidate whose downsampled version matches a low-resolution guide
# (the paper's "SR"). A layer finer than the guide is area-downsampled to the guide's size; a layer
# coarser than the guide compares with the guide area-downsampled to the layer.

class SuperResScorer:
    def __init__(self,
        guide,                      # (C, r, r) or (N, C, r, r) low-resolution guide in [-1, 1].
    ):
        self.guide = as_batch(guide, 'superres guide image')
        self.guide_size = self.guide.shape[-1]
        self._at = ResizeCache(lambda size, device: resize_area(self.guide.to(device), size))

    def __call__(self, cand, info):
        size = min(info.size, self.guide_size)
        ref = match_batch(self._at(size, cand.device), cand.shape[0], 'superres guide image')
        if info.size > size:
            cand = _per_candidate(lambda x: resize_area(x, size), cand)
        return _mse(cand.float(), ref)

# ----------------------------------------------------------------------------
# Inpainting: L2 on the known pixels only. At a layer of size s the mask is area-resized (each
# coarse pixel weighted by the fraction of it that is known) and the guide is the average of the
# known pixels it covers, so unknown pixels never leak into the condition. A layer that sees no
# known pixel at all returns zeros (random choice).

class InpaintScorer:
    def __init__(self,
        guide,                      # (C, H, W) or (N, C, H, W) image in [-1, 1]; unknown pixels are ignored.
        mask,                       # (H, W), (1, H, W) or (N, 1, H, W) in [0, 1]; 1 = known pixel.
    ):
        self.guide = as_batch(guide, 'inpaint guide image')
        self.mask = as_batch(mask, 'inpaint mask', channels=(1,)).clamp(0, 1)
        if self.mask.shape[-1] != self.guide.shape[-1]:
            raise ValueError(f'inpaint mask is {self.mask.shape[-1]}x{self.mask.shape[-1]} but the guide image is '
                             f'{self.guide.shape[-1]}x{self.guide.shape[-1]}')
        self._at = ResizeCache(self._resized)

    def _resized(self, size, device):
        m, g = self.mask.to(device), self.guide.to(device)
        m_s = resize_area(m, size)
        g_s = resize_area(g * m, size) / m_s.clamp(min=1e-8)
        return g_s, m_s

    def __call__(self, cand, info):
        g, m = self._at(info.size, cand.device)
        B = cand.shape[0]
        g, m = match_batch(g, B, 'inpaint guide image'), match_batch(m, B, 'inpaint mask')
        err = (cand.float() - g[:, None]).square().mean(2)                   # (B, K, H, W) over channels.
        known = m.sum((1, 2, 3))                                             # (N,)
        return (err * m).sum((2, 3)) / known.clamp(min=1e-8)[:, None]

# ----------------------------------------------------------------------------
# Colorization: L2 between the candidates' luma (Rec.601 `grayscale`; identity for one channel) and a
# grayscale guide. An RGB guide is reduced to its luma first.

class ColorScorer:
    def __init__(self,
        guide,                      # (1 or 3, H, W) or (N, 1 or 3, H, W) in [-1, 1].
    ):
        self.guide = grayscale(as_batch(guide, 'color guide image', channels=(1, 3)))
        self._at = ResizeCache(lambda size, device: resize_area(self.guide.to(device), size))

    def __call__(self, cand, info):
        ref = match_batch(self._at(info.size, cand.device), cand.shape[0], 'color guide image')
        return _mse(_per_candidate(grayscale, cand.float()), ref)

# ----------------------------------------------------------------------------
# Low-bit guide: the guide is quantised to `bits` bits per channel (2^bits levels), and candidates
# are compared with that dequantised guide by L2. Why not quantise the candidates too: a quantised
# distance is piecewise constant (many exact ties, no preference between a candidate just inside a
# bin and one in its middle), and at coarse layers the area-resized guide is no quantised image
# anyway. The L2 to the bin values prefers candidates whose every pixel rounds to the guide's value
# and degrades gracefully; `quantize_candidates=True` gives the strict form for those who want it.

class LowBitScorer:
    def __init__(self,
        guide,                      # (C, H, W) or (N, C, H, W) in [-1, 1], full precision or already quantised.
        bits,                       # Bits per channel of the condition, >= 1.
        quantize_candidates = False,    # Also quantise the candidates (strict, tie-prone form).
    ):
        if int(bits) != bits or bits < 1:
            raise ValueError(f'lowbit needs bits >= 1 (an integer), got {bits!r}')
        self.bits = int(bits)
        self.quantize_candidates = quantize_candidates
        self.guide = quantize(as_batch(guide, 'lowbit guide image'), self.bits)
        self._at = ResizeCache(lambda size, device: resize_area(self.guide.to(device), size))

    def __call__(self, cand, info):
        ref = match_batch(self._at(info.size, cand.device), cand.shape[0], 'lowbit guide image')
        cand = cand.float()
        if self.quantize_candidates:
            cand = quantize(cand, self.bits)
        return _mse(cand, ref)

# ----------------------------------------------------------------------------
# Edges: L2 between the soft Sobel edge map of the candidates (`image_ops.edge_map`) and a given edge map.
# The edge map is an image in [-1, 1] with white (1) = edge, as loaded from a PNG; `edge_map(x) * 2 - 1`
# makes one from a photo. A layer of size s compares the candidates' own edges at s with the edge map
# area-resized to s (edge density). Below `min_size` edges mean little: zeros (random choice).

class EdgeScorer:
    def __init__(self,
        edges,                          # (1, H, W) or (N, 1, H, W) edge map in [-1, 1], 1 = edge.
        threshold   = EDGE_THRESHOLD,   # Gradient magnitude (step -1 -> 1 = 1) that counts as an edge.
        softness    = EDGE_SOFTNESS,    # Width of the soft threshold; 0 = hard threshold.
        min_size    = 4,                # Layers smaller than this return zeros.
    ):
        self.edges = (as_batch(edges, 'edge map', channels=(1,)).clamp(-1, 1) + 1) / 2
        self.threshold = threshold
        self.softness = softness
        self.min_size = min_size
        self._at = ResizeCache(lambda size, device: resize_area(self.edges.to(device), size))

    def __call__(self, cand, info):
        B, K = cand.shape[:2]
        if info.size < self.min_size:
            return torch.zeros(B, K, device=cand.device)
        ref = match_batch(self._at(info.size, cand.device), B, 'edge map')
        e = _per_candidate(lambda x: edge_map(x, self.threshold, self.softness), cand.float())
        return _mse(e, ref)


# ----------------------------------------------------------------------------
# Several guides at once, weighted. Each scorer's distances are z-scored per sample over the K
# candidates before weighting: scorers speak in different units (an MSE of 0.01 vs a log-probability
# of 3), and within one layer the spread of one scorer can be 100x another's, so raw sums would let
# one guide drown the rest whatever the weights. After z-scoring, weight w means "one standard
# deviation of this guide's disagreement among the candidates is worth w". (Min-max scaling was the
# alternative; it lets one outlier candidate squash the others' differences to nothing.) A scorer
# with a constant row (nothing to say at this layer) contributes zeros.

class CombinedScorer:
    def __init__(self,
        scorers,                    # [(scorer, weight), ...]; a bare scorer means weight 1.
    ):
        pairs = []
        for item in scorers:
            scorer, weight = item if isinstance(item, (tuple, list)) else (item, 1.0)
            if not callable(scorer):
                raise TypeError(f'CombinedScorer: {scorer!r} is not callable')
            weight = float(weight)
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f'CombinedScorer: weights must be finite and >= 0, got {weight}')
            pairs.append((scorer, weight))
        if not pairs or not any(w > 0 for _, w in pairs):
            raise ValueError('CombinedScorer needs at least one scorer with a positive weight')
        self.scorers = pairs

    def __call__(self, cand, info):
        total = None
        for scorer, weight in self.scorers:
            if weight == 0:
                continue
            d = normalize_distances(scorer(cand, info)) * weight
            total = d if total is None else total + d
        return total.float()

# ----------------------------------------------------------------------------
# Evaluate a scorer on finished images (B, C, H, W): its distance at full resolution, (B,).
# The yardstick of the tests and of the scripts: how well a result satisfies its condition. A
# CombinedScorer cannot z-score a single candidate: it gives the weighted sum of raw distances.

@torch.no_grad()
def final_distance(scorer, images):
    if isinstance(scorer, CombinedScorer):
        return sum(w * final_distance(s, images) for s, w in scorer.scorers)
    info = LayerInfo(0, 1, 1, images.shape[-1])
    return scorer(images[:, None], info)[:, 0].float()
