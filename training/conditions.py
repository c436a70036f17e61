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

import numpy as np
import torch
from torch.nn import functional as F

from torch_utils import limits
from training.ddl import resize_area
from training.image_ops import edge_map, grayscale
from training.images import pil_to_float, square_pil

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
            raise ValueError('condition "class" needs one-hot labels (labels=: a dataset with dataset.json labels, loaded with use_labels=True)')
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
# Conditions at generation time (generate.py, sampling/generation.py): class labels, or a condition
# image that becomes the network's condition exactly as in training (`net.make_condition`), in eval mode.

# The network's kind of condition: None (unconditional), 'class', 'color', 'edge' or 'resize'.
def condition_kind(net):
    spec = getattr(net, 'condition', None)
    return None if spec is None else parse_condition(spec).kind

# One-hot rows (B, label_dim) of class indices.
def one_hot(classes, label_dim, device):
    return torch.eye(label_dim, device=device)[torch.as_tensor(list(classes), dtype=torch.long, device=device)]

# Class of each seed for a class-conditional network: the given class, or one drawn from the seed.
def seed_classes(seeds, label_dim, class_idx=None):
    if class_idx is not None:
        return [class_idx] * len(seeds)
    return [int(np.random.RandomState(seed).randint(label_dim)) for seed in seeds]

def load_condition_image(net, path, device):
    """The condition (1, C', h, w) of a color / edge / resizeN network from an image file.

    The file is read with the network's channels (a grayscale file is repeated to RGB, whose mean is
    the same gray, so a color net accepts grayscale and RGB files alike) and must be square. For color
    and edge nets it is area-resized (bilinear up) to the network's resolution, the size training saw;
    a resizeN net takes any image of at least N x N (an N x N one as is). Then `net.make_condition`.
    """
    kind, size = parse_condition(net.condition)
    try:
        with limits.open_image(path, f'Condition image {path}') as image:
            image = square_pil(image, net.img_channels, f'Condition image {path}')
    except OSError as e:
        raise OSError(f'Condition image {path}: cannot read it: {e}') from e
    w = image.size[0]
    x = pil_to_float(image).to(device)
    if kind == 'resize':
        if w < size:
            raise ValueError(f'Condition image {path} is {w}x{w}, smaller than the {size}x{size} '
                             f'condition of this {net.condition} network')
    elif w != net.img_resolution:
        x = resize_area(x, net.img_resolution)
    return net.make_condition(images=x)

def make_condition_fn(net, device, class_idx=None, shared=None, classes=None, conditions=None, rows_of=None, dataset=None):
    """(names, images=None) -> the condition (B, ...) of those images for a conditional `net`; None if
    unconditional. Class nets: `class_idx` for every image, else `classes[rows_of[name]]` (stored with
    latents), else the label of `dataset` image `name`, else a class drawn from each seed. Image nets: the
    condition computed from `images` (reconstruction: each image's own), else the `shared` condition
    (1, C', h, w) for every image, else `conditions[rows_of[name]]` (stored; a single row applies to all)."""
    kind = condition_kind(net)
    if kind is None:
        return None
    label_dim = int(getattr(net, 'label_dim', 0) or 0)

    def classes_of(names):
        if class_idx is None and classes is not None:
            return [classes[rows_of[n]] for n in names]
        if class_idx is None and dataset is not None:
            found = [int(np.argmax(dataset.get_label(n))) for n in names]
            if max(found) >= label_dim:
                raise ValueError(f'The dataset has label {max(found)}, but the network has {label_dim} classes')
            return found
        return seed_classes(names, label_dim, class_idx)

    def condition_fn(names, images=None):
        if kind == 'class':
            return one_hot(classes_of(names), label_dim, device)
        if images is not None:
            return net.make_condition(images=images)
        if shared is not None:
            return shared.expand(len(names), -1, -1, -1)
        rows = [rows_of[n] for n in names] if conditions.shape[0] > 1 else [0] * len(names)
        return torch.from_numpy(conditions[rows]).to(device)
    return condition_fn

# What latents.npz keeps of a batch's conditions for a network of condition `kind`: the class of
# one-hot rows, an image condition as is; None for unconditional nets.
def stored_condition_fn(kind):
    if kind is None:
        return None
    return (lambda condition: condition.argmax(1)) if kind == 'class' else (lambda condition: condition.float())

# ----------------------------------------------------------------------------
