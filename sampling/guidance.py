"""Zero-shot conditional generation (ZSCG): scorers and choosers that guide a trained, unconditional DDN.

Paper §3.5 / our spec `DDN.md` §5. At every layer a DDN emits K candidates; sampling keeps a
random one, training the one nearest to the target. To generate under a condition the network never
saw in training, a *scorer* ranks the K candidates against the condition and a *chooser* keeps one.
No gradient flows: a scorer is any black box, so a classifier, CLIP or a hand-written rule can steer an
unconditional model. Usage:

    scorer = CombinedScorer([(InpaintScorer(x, mask), 1.0), (ColorScorer(x), 0.5)])
    out = net(scorer=scorer, chooser=TemperatureChooser(0.3), seeds=[0, 1, 2])

(`sampling/guide_spec.py` builds such a scorer from a spec string such as 'inpaint:1,color:0.5' and
files, for the scripts.) The two contracts (from `training/ddl.py`):
- Scorer:  `scorer(cand, info) -> dist`, cand (B, K, C, H, W) in [-1, 1], `info` a LayerInfo(index,
  num_layers, K, size); dist (B, K), lower is better.
- Chooser: `chooser(dist, info, u) -> codes (B,)`, u (B,) the per-seed uniform numbers of this layer
  (or None). Every chooser here uses u for its randomness and its tie breaks, so guided sampling is
  deterministic per seed and does not depend on the batch.

Conventions of the built-in scorers:
- Conditions are tensors in [-1, 1] at the network's full resolution, (C, H, W) or (N, C, H, W) with N
  1 (shared by the batch) or B (one per sample). A layer of size s compares at s: the condition is
  area-resized to s (once per size and device, then cached).
- Distances are means over pixels (and channels), so layers of different sizes are on a like scale;
  only the ranking within a layer matters for argmin, and `CombinedScorer` / `TemperatureChooser`
  normalise per sample anyway.
- A scorer that has nothing to say at a layer (CLIP on a 2x2 image) returns a constant row. Every
  chooser here, and the network's default `training.ddl.argmin`, maps a constant row to
  `floor(u * K)`, the very code unguided sampling gives for that seed, so such layers stay random,
  exactly as without guidance.

The CLIP scorer needs a CLIP package (`open_clip_torch` or OpenAI's `clip`); it is not a dependency
of ddn. Classifier and feature networks are any callables (modules); loading them from files is
`sampling/guide_spec.py`'s job.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.ddl import LayerInfo, argmin, resize_area, uniform_to_codes
from training.image_ops import EDGE_SOFTNESS, EDGE_THRESHOLD, edge_map, grayscale, quantize

# CLIP's input normalisation (its images are in [0, 1] before this).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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
def _match_batch(x, B, what):
    if x.shape[0] not in (1, B):
        raise ValueError(f'{what} holds {x.shape[0]} images but the batch has {B} samples (give 1 or {B})')
    return x

# Condition resized per (size, device), computed once: each layer size asks again and again.
class _ResizeCache:
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
        self._at = _ResizeCache(lambda size, device: resize_area(self.guide.to(device), size))

    def __call__(self, cand, info):
        ref = _match_batch(self._at(info.size, cand.device), cand.shape[0], 'l2 guide image')
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
        self._at = _ResizeCache(lambda size, device: resize_area(self.guide.to(device), size))

    def __call__(self, cand, info):
        size = min(info.size, self.guide_size)
        ref = _match_batch(self._at(size, cand.device), cand.shape[0], 'superres guide image')
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
        self._at = _ResizeCache(self._resized)

    def _resized(self, size, device):
        m, g = self.mask.to(device), self.guide.to(device)
        m_s = resize_area(m, size)
        g_s = resize_area(g * m, size) / m_s.clamp(min=1e-8)
        return g_s, m_s

    def __call__(self, cand, info):
        g, m = self._at(info.size, cand.device)
        B = cand.shape[0]
        g, m = _match_batch(g, B, 'inpaint guide image'), _match_batch(m, B, 'inpaint mask')
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
        self._at = _ResizeCache(lambda size, device: resize_area(self.guide.to(device), size))

    def __call__(self, cand, info):
        ref = _match_batch(self._at(info.size, cand.device), cand.shape[0], 'color guide image')
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
        self._at = _ResizeCache(lambda size, device: resize_area(self.guide.to(device), size))

    def __call__(self, cand, info):
        ref = _match_batch(self._at(info.size, cand.device), cand.shape[0], 'lowbit guide image')
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
        self._at = _ResizeCache(lambda size, device: resize_area(self.edges.to(device), size))

    def __call__(self, cand, info):
        B, K = cand.shape[:2]
        if info.size < self.min_size:
            return torch.zeros(B, K, device=cand.device)
        ref = _match_batch(self._at(info.size, cand.device), B, 'edge map')
        e = _per_candidate(lambda x: edge_map(x, self.threshold, self.softness), cand.float())
        return _mse(e, ref)

# ----------------------------------------------------------------------------
# Images of candidates in the layout a downstream network expects: resized to `resolution`
# (bilinear up, area down) and converted to `channels` (1 -> 3 by repetition, 3 -> 1 by luma).

def _adapt(x, resolution=None, channels=None):
    if resolution is not None:
        x = resize_area(x, resolution)
    if channels is not None and x.shape[1] != channels:
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels == 1 and x.shape[1] == 3:
            x = grayscale(x)
        else:
            raise ValueError(f'Cannot convert {x.shape[1]}-channel images to {channels} channels')
    return x

# Run `module` on candidates (B, K, C, H, W) folded into batches of at most `batch` images.
def _run_chunked(module, cand, batch, prepare):
    B, K = cand.shape[:2]
    flat = cand.reshape(B * K, *cand.shape[2:])
    return [module(prepare(flat[i:i + batch])) for i in range(0, flat.shape[0], batch)]

# ----------------------------------------------------------------------------
# Classifier guidance: distance = -log p(class | candidate) of a given classifier (the paper steers
# an unconditional model toward a class this way, without its gradient). The module takes images in
# [-1, 1] at its own resolution and returns logits (N, num_classes).

class ClassifierScorer:
    def __init__(self,
        classifier,                 # Callable: (N, C, R, R) in [-1, 1] -> logits (N, num_classes).
        class_idx,                  # Wanted class: int, or (B,) one per sample.
        resolution  = None,         # Input side R of the classifier; None = the candidates' own size.
        channels    = None,         # Input channels of the classifier; None = the candidates' own.
        min_size    = 1,            # Layers smaller than this return zeros.
        batch       = 1024,         # Images per classifier call.
    ):
        self.classifier = classifier
        self.class_idx = torch.as_tensor(class_idx, dtype=torch.long).reshape(-1)
        self.resolution = resolution
        self.channels = channels
        self.min_size = min_size
        self.batch = batch

    def __call__(self, cand, info):
        B, K = cand.shape[:2]
        if info.size < self.min_size:
            return torch.zeros(B, K, device=cand.device)
        outs = _run_chunked(self.classifier, cand.float(), self.batch, lambda x: _adapt(x, self.resolution, self.channels))
        logp = torch.cat(outs).float().log_softmax(1).view(B, K, -1)
        idx = _match_batch(self.class_idx.to(cand.device), B, 'class index')
        if int(idx.max()) >= logp.shape[2] or int(idx.min()) < 0:
            raise ValueError(f'Class {idx.tolist()} out of range: the classifier has {logp.shape[2]} classes')
        return -logp.gather(2, idx.view(-1, 1, 1).expand(B, K, 1))[..., 0]

# ----------------------------------------------------------------------------
# CLIP guidance (text-to-image from an unconditional model): distance = -cosine similarity between
# the CLIP embeddings of the candidates and of the prompt. Candidates are resized to CLIP's input
# size (224), gray is repeated to RGB, and CLIP's normalisation is applied. Layers smaller than
# `min_size` return zeros: a 1x1 or 4x4 image upscaled to 224 tells CLIP nothing, and keeping those
# layers random keeps the composition diverse across seeds.
# Needs `open_clip` (pip install open_clip_torch) or OpenAI's `clip`; neither is a ddn dependency.

CLIP_INSTALL_HINT = ('The clip guide needs a CLIP package, which ddn does not install: '
                     '`pip install open_clip_torch` (preferred) or `pip install git+https://github.com/openai/CLIP`.')

class ClipScorer:
    def __init__(self,
        text,                       # The prompt.
        model_name  = 'ViT-B-32',   # CLIP architecture (open_clip name; 'ViT-B/32' style for OpenAI clip).
        pretrained  = 'openai',     # open_clip weights tag (downloaded by open_clip on first use).
        device      = 'cpu',        # Where CLIP runs.
        min_size    = 8,            # Layers smaller than this return zeros (stay random).
        batch       = 256,          # Images per CLIP call.
    ):
        if not text:
            raise ValueError('The clip guide needs a text prompt')
        self.text = text
        self.device = torch.device(device)
        self.min_size = min_size
        self.batch = batch
        self.model, tokens = _load_clip(model_name, pretrained, self.device, text)
        with torch.no_grad():
            t = self.model.encode_text(tokens).float()
        self.text_features = F.normalize(t, dim=-1)[0]
        self.input_size = 224

    def _prepare(self, x):
        x = _adapt(x.to(self.device), self.input_size, 3)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return ((x.clamp(-1, 1) + 1) / 2 - mean) / std

    def __call__(self, cand, info):
        B, K = cand.shape[:2]
        if info.size < self.min_size:
            return torch.zeros(B, K, device=cand.device)
        outs = _run_chunked(self.model.encode_image, cand.float(), self.batch, self._prepare)
        feats = F.normalize(torch.cat(outs).float(), dim=-1)
        return -(feats @ self.text_features).view(B, K).to(cand.device)

# Import a CLIP package and load a model and the tokenised prompt: open_clip first, then OpenAI clip.
def _load_clip(model_name, pretrained, device, text):
    try:
        import open_clip
    except ImportError:
        open_clip = None
    if open_clip is not None:
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        tokens = open_clip.get_tokenizer(model_name)([text]).to(device)
        return model.eval(), tokens
    try:
        import clip
    except ImportError:
        raise ImportError(CLIP_INSTALL_HINT) from None
    name = model_name.replace('ViT-B-', 'ViT-B/').replace('ViT-L-', 'ViT-L/')
    model, _ = clip.load(name, device=device)
    return model.eval().float(), clip.tokenize([text]).to(device)

# ----------------------------------------------------------------------------
# Style: distance between feature statistics of the candidates and of a style image (the paper's
# "ST", perceptual-loss style transfer). Statistics: Gram matrices (Gatys et al.) or per-channel
# mean and std (AdaIN) of every feature map a feature network returns. Both sides are compared at
# the layer's size (the style image area-resized to it); below `min_size` returns zeros.

# A tiny fixed conv net with random weights: the default feature extractor. It is NOT a pretrained
# style network: random-weight conv features give a crude texture statistic (enough to test the
# plumbing and to pull colours and contrast), not VGG's perception. Pass a real feature extractor
# (e.g. a TorchScript VGG that returns a list of feature maps) for real style transfer.
class RandomFeatures(nn.Module):
    def __init__(self,
        in_channels = 3,            # Image channels.
        width       = 16,           # Channels of each conv.
        depth       = 2,            # Number of conv + ReLU stages; each one's output is a feature map.
        seed        = 0,            # Seed of the fixed random weights.
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        c = in_channels
        for _ in range(depth):
            conv = nn.Conv2d(c, width, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2 / (c * 9)))
                conv.bias.zero_()
            self.convs.append(conv)
            c = width
        self.requires_grad_(False)

    def forward(self, x):
        feats = []
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x)
        return feats

# Statistics of one feature map (N, c, h, w): Gram (N, c*c) or mean and std (N, 2c).
def _feature_stats(f, stat):
    f = f.float().flatten(2)
    if stat == 'gram':
        return (f @ f.transpose(1, 2) / f.shape[2]).flatten(1)
    return torch.cat([f.mean(2), f.std(2, unbiased=False)], 1)

class StyleScorer:
    def __init__(self,
        style,                      # (C, H, W) or (N, C, H, W) style image(s) in [-1, 1].
        features    = None,         # Module: images in [-1, 1] -> feature map or list of them; None = RandomFeatures.
        stat        = 'gram',       # 'gram' (Gram matrices) or 'meanstd' (per-channel mean and std).
        min_size    = 4,            # Layers smaller than this return zeros.
        batch       = 1024,         # Images per feature-network call.
    ):
        if stat not in ('gram', 'meanstd'):
            raise ValueError(f"stat must be 'gram' or 'meanstd', got {stat!r}")
        self.style = as_batch(style, 'style image')
        self.features = features if features is not None else RandomFeatures(self.style.shape[1])
        self.stat = stat
        self.min_size = min_size
        self.batch = batch
        self._at = _ResizeCache(self._style_stats)

    def _stats(self, x):
        feats = self.features(x)
        feats = [feats] if torch.is_tensor(feats) else list(feats)
        return [_feature_stats(f, self.stat) for f in feats]

    def _style_stats(self, size, device):
        if isinstance(self.features, nn.Module):
            self.features.to(device)
        return self._stats(resize_area(self.style.to(device), size))

    def __call__(self, cand, info):
        B, K = cand.shape[:2]
        if info.size < self.min_size:
            return torch.zeros(B, K, device=cand.device)
        ref = self._at(info.size, cand.device)
        outs = _run_chunked(self._stats, cand.float(), self.batch, lambda x: x)
        dist = torch.zeros(B, K, device=cand.device)
        for j, r in enumerate(ref):
            s = torch.cat([o[j] for o in outs]).view(B, K, -1)
            dist += (s - _match_batch(r, B, 'style image')[:, None]).square().mean(2)
        return dist

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
# Choosers: distances (B, K) + LayerInfo + per-sample uniforms u (B,) -> codes (B,).
# All of them give `floor(u * K)` on a constant row (the unguided sample's code).

# Sample from softmax(-z / T), z the per-sample z-scored distances, by inverse CDF of u: the same u
# gives the same choice whatever the batch. T -> 0 is argmin; T = 1: a candidate one standard
# deviation better is e times as likely; T -> inf is uniform sampling.
class TemperatureChooser:
    def __init__(self,
        temperature,                # T >= 0.
    ):
        if not temperature >= 0:
            raise ValueError(f'temperature must be >= 0, got {temperature}')
        self.temperature = float(temperature)

    def __call__(self, dist, info=None, u=None):
        if self.temperature == 0:
            return argmin(dist, info, u)
        B, K = dist.shape
        if u is None:
            u = torch.rand(B, device=dist.device, dtype=torch.float64)
        u = u.to(dist.device).double()
        p = torch.softmax(-normalize_distances(dist) / self.temperature, dim=1)
        cdf = p.cumsum(1)
        codes = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=K - 1)
        flat = (dist == dist[:, :1]).all(1)                                  # Exactly uniform on constant rows.
        return torch.where(flat, uniform_to_codes(u, K), codes)

# Uniform choice among the n best candidates (ties in rank broken by index), with u.
class TopKChooser:
    def __init__(self,
        n,                          # Number of best candidates to choose from, >= 1.
    ):
        if int(n) != n or n < 1:
            raise ValueError(f'top-k needs n >= 1 (an integer), got {n!r}')
        self.n = int(n)

    def __call__(self, dist, info=None, u=None):
        B, K = dist.shape
        n = min(self.n, K)
        if u is None:
            u = torch.rand(B, device=dist.device, dtype=torch.float64)
        u = u.to(dist.device).double()
        order = torch.sort(dist, dim=1, stable=True).indices
        codes = order.gather(1, uniform_to_codes(u, n)[:, None])[:, 0]
        flat = (dist == dist[:, :1]).all(1)
        return torch.where(flat, uniform_to_codes(u, K), codes)

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
