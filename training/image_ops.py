"""Image operations shared by conditional training and zero-shot guidance: grayscale, edge map, quantisation.

One definition of each, used both where a condition is computed for a conditional network
(`training/conditions.py`) and where candidates are compared with a guide (`sampling/guidance.py`,
`zscg.py`). Images are (N, C, H, W) tensors in [-1, 1]; C is 1 or 3.
"""

import torch
from torch.nn import functional as F

# Rec.601 luma weights (R, G, B): what PIL's convert('L') gives, so a photo loaded as a grayscale
# file and the grayscale of the same RGB tensor agree.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Sobel gradient magnitude (a step from -1 to 1 gives 1) above which a pixel is an edge.
EDGE_THRESHOLD = 0.25

# Width of the soft edge threshold of `edge_map` (0 = hard).
EDGE_SOFTNESS = 0.05

# ----------------------------------------------------------------------------
# Grayscale (N, 1, H, W) of (N, C, H, W) images; one channel passes through unchanged.
# weights: 'luma' (Rec.601, the default), 'mean' (the plain channel mean: the eval-time input of the
# `color` condition, kept because the author's colour-conditional networks were trained on it), or a
# (N, 3) tensor of per-image channel weights summing to 1 (the random mixes of colour training).

def grayscale(images, weights='luma'):
    channels = images.shape[-3]
    if channels == 1:
        return images
    if channels != 3:
        raise ValueError(f'grayscale expects 1 or 3 channels, got {channels}')
    if torch.is_tensor(weights):
        return (images * weights[:, :, None, None].to(images.dtype)).sum(dim=-3, keepdim=True)
    if weights == 'mean':
        return images.mean(dim=-3, keepdim=True)
    if weights != 'luma':
        raise ValueError(f"grayscale weights must be 'luma', 'mean' or a (N, 3) tensor, got {weights!r}")
    w = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * w).sum(dim=-3, keepdim=True)

# ----------------------------------------------------------------------------
# Sobel edge map (N, 1, H, W) in [0, 1] (1 = edge) of the images' luma, with replicate padding.
# The gradient is normalised so that a step from -1 to 1 has magnitude 1 (only its magnitude is used,
# so the kernel's sign does not matter). softness 0 gives the hard map {0, 1}; softness > 0 gives
# sigmoid((|grad| - threshold) / softness). Guidance uses the soft map (the default): candidates near
# the threshold are ranked instead of tied. A conditional network's `edge` input is the hard map
# mapped to {-1, 1} (`training/conditions.py`), centred like the images it is added to.

def edge_map(images, threshold=EDGE_THRESHOLD, softness=EDGE_SOFTNESS):
    gray = grayscale(images)
    kx = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], dtype=gray.dtype, device=gray.device) / 8
    kernels = torch.stack([kx, kx.t()])[:, None]                            # (2, 1, 3, 3): d/dx, d/dy.
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode='replicate'), kernels)
    magnitude = grad.square().sum(dim=1, keepdim=True).sqrt()
    if softness > 0:
        return torch.sigmoid((magnitude - threshold) / softness)
    return (magnitude > threshold).to(gray.dtype)

# ----------------------------------------------------------------------------
# Quantise images in [-1, 1] to `bits` bits per channel and map back to [-1, 1] (the bin values).

def quantize(images, bits):
    levels = 2 ** int(bits) - 1
    return torch.round((images.clamp(-1, 1) + 1) * (levels / 2)) * (2 / levels) - 1
