"""Scorers that run a network on the candidates (paper §3.5): a classifier (-log p(class)), CLIP
(text prompts) and feature statistics of a style image. The contracts and the conventions (conditions
in [-1, 1], distances lower is better, a constant row where a scorer has nothing to say) are those of
`sampling/guidance.py`, where the pixel-space scorers and their combination live.

The CLIP scorer needs a CLIP package (`open_clip_torch` or OpenAI's `clip`); it is not a dependency
of ddn. Classifier and feature networks are any callables (modules); loading them from files is
`sampling/guide_spec.py`'s job.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from training.ddl import resize_area
from training.image_ops import grayscale
from sampling.guidance import ResizeCache, as_batch, match_batch

# CLIP's input normalisation (its images are in [0, 1] before this).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        idx = match_batch(self.class_idx.to(cand.device), B, 'class index')
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
        self._at = ResizeCache(self._style_stats)

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
            dist += (s - match_batch(r, B, 'style image')[:, None]).square().mean(2)
        return dist

# ----------------------------------------------------------------------------
