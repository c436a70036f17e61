"""Conditions for conditional DDN training (paper §4.4, our spec `DDN.md` §5-§6).

A conditional DDN sees the condition inside the network: at the first block whose input has a new
size (every scale from the start size up to the output resolution, as in the reference code) the
condition image is area-resized to that block's input and added into its middle channels (or, for
class labels, a learned per-scale embedding is added). This file turns a batch of training images
(and labels) into the condition tensor the network takes, for the condition types of the reference:

- `class`:   the one-hot label (B, label_dim);
- `color`:   a grayscale version of the image (colourisation). Training draws random channel weights
             per image so the net cannot invert one fixed mix; evaluation uses the plain channel mean;
- `edge`:    the hard Sobel edge map of `training/image_ops.py` (edges -> +1, else -1);
- `resizeN`: the image area-downsampled to N x N (super-resolution from an N x N input).
"""

import re
from typing import NamedTuple, Optional

import torch
from torch.nn import functional as F

from training.image_ops import edge_map, grayscale

# ----------------------------------------------------------------------------
# A parsed condition spec.

class ConditionSpec(NamedTuple):
    kind:   str     # 'class', 'color', 'edge' or 'resize'.
    size:   int     # N of resizeN, else 0.

# Parse 'class' | 'color' | 'edge' | 'resizeN' (N a power of two).
def parse_condition(spec: str) -> ConditionSpec:
    if spec in ('class', 'color', 'edge'):
        return ConditionSpec(spec, 0)
    m = re.fullmatch(r'resize(\d+)', spec or '')
    if m and int(m.group(1)) >= 1 and (int(m.group(1)) & (int(m.group(1)) - 1)) == 0:
        return ConditionSpec('resize', int(m.group(1)))
    raise ValueError(f'Unknown condition {spec!r}; expected class, color, edge or resizeN (N a power of two, e.g. resize8)')

# Channels of the condition image for a network with `img_channels` (0 for class labels).
def condition_channels(spec: str, img_channels: int) -> int:
    kind = parse_condition(spec).kind
    if kind == 'color' and img_channels != 3:
        raise ValueError('condition "color" (colourisation) needs an RGB dataset')
    return {'class': 0, 'color': 1, 'edge': 1, 'resize': img_channels}[kind]

# ----------------------------------------------------------------------------
# The condition tensor for a batch (what `net.make_condition` computes for its own spec). `training`
# switches the colour condition to random channel weights; `generator` makes those draws reproducible.
# The grayscale and the edge map are the ones guidance uses (`training/image_ops.py`), with two
# settings of their own: the eval-time colour condition is the channel mean, not luma (the author's
# colour-conditional networks were trained on it), and the edge input is the hard map in {-1, 1}
# (a binary condition, centred like the images it is added to).

def condition_tensor(
    spec:       str,                                # Condition spec, see parse_condition().
    images:     Optional[torch.Tensor] = None,      # (B, C, H, W) in [-1, 1].
    labels:     Optional[torch.Tensor] = None,      # (B, label_dim) one-hot labels.
    training:   bool = False,                       # Random colour weights (training) or the mean.
    generator:  Optional[torch.Generator] = None,   # RNG for the random colour weights.
) -> torch.Tensor:
    kind, size = parse_condition(spec)
    if kind == 'class':
        if labels is None or labels.ndim != 2 or labels.shape[1] == 0:
            raise ValueError('condition "class" needs one-hot labels (use a dataset with dataset.json labels and --cond)')
        return labels.float()
    if images is None:
        raise ValueError(f'condition {spec!r} is computed from images, but none were given')
    images = images.float()
    if kind == 'color':
        if images.shape[1] != 3:
            raise ValueError('condition "color" needs RGB images')
        weights = 'mean'
        if training:
            w = torch.rand(images.shape[0], 3, generator=generator, device='cpu').to(images.device) + 1e-3
            weights = w / w.sum(dim=1, keepdim=True)
        return grayscale(images, weights)
    if kind == 'edge':
        return edge_map(images, softness=0) * 2 - 1
    if images.shape[-1] < size:
        raise ValueError(f'condition resize{size} is larger than the images ({images.shape[-1]}x{images.shape[-2]})')
    return F.interpolate(images, size=(size, size), mode='area')

# ----------------------------------------------------------------------------
