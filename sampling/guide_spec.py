"""Guides by name: the spec grammar 'inpaint:1,color:0.5', guide files, and the scorer of a spec.

`sampling/guidance.py`, `network_scorers.py` and `choosers.py` hold the scorers and choosers; this file
builds them from names and files, for `generate.py` (whose options cli.py maps onto `parse_guides`'
keyword arguments), `demo.py` and `zscg.py`:

- `parse_spec(spec)`: 'inpaint:1,color:0.5' -> [('inpaint', 1.0), ('color', 0.5)]; `GUIDE_TYPES` lists the
  types and the `parse_guides` arguments each needs.
- `parse_guides(spec, ...)`: the CombinedScorer of a spec, its inputs (files or tensors) checked
  against the network; errors name the argument that is missing (`MissingGuideInput`) or wrong.
- `load_guide_image` / `guide_from_pil` / `load_mask` / `load_module`: guide inputs from files.
- `make_chooser`: the choice rule of guided layers (argmin, temperature or top-k).

Classifier and feature networks are code: a TorchScript archive runs the code it carries (its
`__setstate__` methods inside `torch.jit.load`, `forward` at every call) and a pickle runs code named
by the file, so both load only with `trust_pickle=True`."""

import math
import os
import pickle
import zipfile
from typing import Optional

import numpy as np
import PIL.Image
import torch
from torch import nn

from sampling import choosers, guidance, network_scorers
from torch_utils import limits
from training.ddl import argmin
from training.images import channels_of, pil_to_float, square_pil
from training.snapshot import UnsafeFileError
from torch_utils.script_archive import is_script_archive

# ----------------------------------------------------------------------------
# Guide inputs from files.

def load_guide_image(path, channels=None, resolution=None, allow_resize=False):
    """A guide image file as a (1, C, H, W) float32 tensor in [-1, 1] (x = u8 / 127.5 - 1).

    `channels` 1 or 3 converts the file (RGB -> L by PIL's Rec.601 luma; L -> RGB by repetition);
    None keeps 1 channel for grayscale files and 3 otherwise (alpha dropped). With `resolution`, a
    file of another size is an error, unless `allow_resize=True` (then it is resized, box filter down,
    bicubic up). Images must be square.
    """
    with limits.open_image(path, f'Guide image {path}') as image:
        return guide_from_pil(image, channels=channels, resolution=resolution, allow_resize=allow_resize, source=f'Guide image {path}')

def guide_from_pil(image, channels=None, resolution=None, allow_resize=False, source='Guide image'):
    """`load_guide_image` of an open PIL image (an upload, a drawing): the same conversion, so a
    picture gives the same guide whether it arrives as a file or from a page. `source` names it in errors."""
    if channels is None:
        channels = channels_of(image.mode)
    image = square_pil(image, channels, source)
    w, h = image.size
    if resolution is not None and w != resolution:
        if not allow_resize:
            raise ValueError(f'{source} is {w}x{h}, but {resolution}x{resolution} is needed')
        image = image.resize((resolution, resolution), PIL.Image.Resampling.BOX if w > resolution else PIL.Image.Resampling.BICUBIC)
    return pil_to_float(image)

def load_mask(path, resolution=None):
    """An inpainting mask file as a (1, 1, H, W) float32 tensor in [0, 1]: white (255) = known pixel,
    black = to generate, gray = partly known (weighted). Must be `resolution` x `resolution` if given."""
    with limits.open_image(path, f'Guide mask {path}') as image:
        image = image.convert('L')
        w, h = image.size
        if w != h or (resolution is not None and w != resolution):
            need = f'{resolution}x{resolution}' if resolution is not None else 'a square image'
            raise ValueError(f'Guide mask {path} is {w}x{h}, but {need} is needed')
        array = np.array(image, dtype=np.float32) / 255
    return torch.from_numpy(array)[None, None]

def load_module(path, device='cpu', trust_pickle=False):
    """A classifier or feature network from a TorchScript file, or a pickle (of the module, or of a
    dict holding it under 'classifier' / 'features' / 'net'). Both run code from the file, so both
    need `trust_pickle`; without it UnsafeFileError is raised before the file is opened as code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Module file not found: {path}')
    if zipfile.is_zipfile(path):  # TorchScript archives are zip files; pickles are not.
        with open(path, 'rb') as f:
            if not is_script_archive(f.read()):
                raise ValueError(f'{path} is a zip archive but not a TorchScript module '
                                 '(save one with torch.jit.script(module).save(path))')
        if not trust_pickle:
            raise UnsafeFileError(f'{path} is a TorchScript archive: loading and calling it runs the code it carries '
                                  '(it may read or write any file); load it with trust_pickle=True only if you trust it')
        try:
            return torch.jit.load(path, map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(f'{path} is a zip archive but not a TorchScript module '
                             f'(save one with torch.jit.script(module).save(path)): {str(e).splitlines()[0]}') from None
    if not trust_pickle:
        raise UnsafeFileError(f'{path} is a pickled module: loading it would run code from the file; '
                              'load it with trust_pickle=True only if you trust it')
    with open(path, 'rb') as f:
        obj = pickle.load(f)
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ('classifier', 'features', 'net') if k in obj), obj)
    if not callable(obj):
        raise ValueError(f'{path} holds {type(obj).__name__}, not a callable module')
    return obj.eval().to(device) if isinstance(obj, nn.Module) else obj

# ----------------------------------------------------------------------------
# The spec grammar.

# Guide type -> (what it is, the parse_guides arguments it needs).
GUIDE_TYPES = {
    'l2':           ('L2 to the guide image',                                   ('image',)),
    'superres':     ('L2 after downsampling to a low-resolution guide image',   ('image',)),
    'inpaint':      ('L2 on the known pixels (mask) of the guide image',        ('image', 'mask')),
    'color':        ('L2 of the luminance to a grayscale guide image',          ('image',)),
    'lowbit':       ('L2 to the guide image quantised to some bits',            ('image', 'bits')),
    'edge':         ('Sobel edges vs an edge map guide image (white = edge)',   ('image',)),
    'classifier':   ('-log p(class_idx) of a classifier',                       ('classifier', 'class_idx')),
    'clip':         ('CLIP similarity to a text',                               ('text',)),
    'style':        ('feature statistics of a style image',                     ('style',)),
}

class MissingGuideInput(ValueError):
    """A guide of the spec lacks an input: `guide` (its type) and `inputs` (the parse_guides arguments missing)."""
    def __init__(self, guide, inputs):
        self.guide, self.inputs = guide, tuple(inputs)
        super().__init__(f'Guide {guide!r} ({GUIDE_TYPES[guide][0]}) needs {" and ".join(self.inputs)}')

def parse_spec(spec):
    """'inpaint:1,color:0.5' -> [('inpaint', 1.0), ('color', 0.5)]; TYPE alone has weight 1."""
    if not spec or not str(spec).strip():
        raise ValueError(f'Empty guide spec; expected TYPE[:WEIGHT],... with TYPE in {", ".join(GUIDE_TYPES)}')
    items = []
    for part in str(spec).split(','):
        name, _, weight = part.strip().partition(':')
        name = name.strip().lower()
        if name not in GUIDE_TYPES:
            raise ValueError(f'Unknown guide type {name!r} in {spec!r}; known: {", ".join(GUIDE_TYPES)}')
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f'Bad weight {weight!r} for guide {name!r} in {spec!r}: expected a number') from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f'Weight of guide {name!r} must be finite and >= 0, got {weight!r}')
        items.append((name, w))
    return items

# A guide image of the right shape for a network of `res` x `res` images with `ch` channels: a file
# is converted to `channels[0]` channels, a tensor must already have one of `channels`. `low_res`
# (superres) accepts a size that divides `res`.
def _guide_image(value, what, channels, ch, res, low_res=False):
    if isinstance(value, (str, os.PathLike)):
        x = load_guide_image(value, channels=channels[0])
    else:
        x = guidance.as_batch(value, what)
    if x.shape[1] not in channels:
        raise ValueError(f'{what} has {x.shape[1]} channel(s), but the network makes {ch}-channel images '
                         f'(expected {" or ".join(map(str, channels))})')
    r = x.shape[-1]
    if low_res:
        if r > res or res % r:
            raise ValueError(f'{what} is {r}x{r}; superres needs a resolution that divides the network\'s {res}x{res}')
    elif r != res:
        raise ValueError(f'{what} is {r}x{r}, but the network makes {res}x{res} images')
    return x

# A module given as a path (loaded by `load_module`) or as a callable (used as it is).
def _module(value, device, trust_pickle):
    return load_module(value, device, trust_pickle) if isinstance(value, (str, os.PathLike)) else value

# The scorer of one guide type; `given` holds parse_guides' inputs.
def _scorer(name, given, ch, res, device, trust_pickle, classifier_resolution):
    image = given['image']
    if name == 'l2':
        return guidance.L2Scorer(_guide_image(image, 'l2 guide image', (ch,), ch, res))
    if name == 'superres':
        return guidance.SuperResScorer(_guide_image(image, 'superres guide image', (ch,), ch, res, low_res=True))
    if name == 'inpaint':
        mask = given['mask']
        m = load_mask(mask) if isinstance(mask, (str, os.PathLike)) else guidance.as_batch(mask, 'inpaint mask', channels=(1,))
        if m.shape[-1] != res:
            raise ValueError(f'Guide mask is {m.shape[-1]}x{m.shape[-1]}, but the network makes {res}x{res} images')
        return guidance.InpaintScorer(_guide_image(image, 'inpaint guide image', (ch,), ch, res), m)
    if name == 'color':
        return guidance.ColorScorer(_guide_image(image, 'color guide image', (1, ch), ch, res))
    if name == 'lowbit':
        return guidance.LowBitScorer(_guide_image(image, 'lowbit guide image', (ch,), ch, res), given['bits'])
    if name == 'edge':
        return guidance.EdgeScorer(_guide_image(image, 'edge map', (1,), ch, res))
    if name == 'classifier':
        module = _module(given['classifier'], device, trust_pickle)
        r = classifier_resolution or getattr(module, 'img_resolution', None) or res
        return network_scorers.ClassifierScorer(module, given['class_idx'], resolution=r)
    if name == 'clip':
        return network_scorers.ClipScorer(given['text'], device=device)
    # style: statistics do not depend on the image size, so any square size is accepted.
    style = given['style']
    x = load_guide_image(style, channels=ch) if isinstance(style, (str, os.PathLike)) else guidance.as_batch(style, 'style image')
    if x.shape[1] != ch:
        raise ValueError(f'style image has {x.shape[1]} channel(s), but the network makes {ch}-channel images')
    return network_scorers.StyleScorer(x, _module(given['features'], device, trust_pickle))

def parse_guides(
    spec:           str,                    # 'TYPE[:WEIGHT],...', e.g. 'inpaint:1,color:0.5'.
    *,
    img_channels:   int,                    # Channels of the network's images (1 or 3).
    img_resolution: int,                    # Resolution of the network's images.
    image           = None,                 # --guide-image: path or tensor (C, H, W) / (N, C, H, W) in [-1, 1].
    mask            = None,                 # --guide-mask: path (white = known) or tensor in [0, 1].
    bits:           Optional[int] = None,   # --guide-bits: bits of the lowbit guide.
    classifier      = None,                 # --guide-classifier: path (TorchScript / pickle) or callable.
    class_idx       = None,                 # --class: wanted class (int or (N,) tensor).
    classifier_resolution: Optional[int] = None,    # Classifier input size; None = its `img_resolution`, else the network's.
    text:           Optional[str] = None,   # --guide-text: CLIP prompt.
    style           = None,                 # --guide-style: path or tensor; None = `image`.
    features        = None,                 # --guide-features: feature network for style (path or module).
    device          = 'cpu',                # Where classifier / CLIP / feature networks run.
    trust_pickle    = False,                # Let classifier / features be pickles (they run code when loaded).
) -> guidance.CombinedScorer:
    """Build the scorer of a guide spec, checking every input it needs and its shape against the
    network. Paths are loaded with `load_guide_image` / `load_mask` / `load_module`. Raises ValueError
    (unknown type, MissingGuideInput naming the missing argument, shape mismatch) or ImportError (clip
    without a CLIP package)."""
    items = parse_spec(spec)
    given = dict(image=image, mask=mask, bits=bits, classifier=classifier, class_idx=class_idx, text=text,
                 style=style if style is not None else image, features=features)
    for name, _ in items:
        missing = [arg for arg in GUIDE_TYPES[name][1] if given[arg] is None]
        if missing:
            raise MissingGuideInput(name, missing)
    scorers = [(_scorer(name, given, img_channels, img_resolution, device, trust_pickle, classifier_resolution), weight)
               for name, weight in items]
    return guidance.CombinedScorer(scorers)

def make_chooser(temperature=None, topk=None):
    """The choice rule of guided layers and its description: argmin (exact ties broken by the seed's
    uniform), softmax(-z / T) sampling, or a uniform choice among the N best; all draw from the seed.
    Raises ValueError for both rules at once, or for a bad temperature or top-k."""
    if temperature is not None and topk is not None:
        raise ValueError('a temperature and a top-k are two choice rules; give one of them')
    if topk is not None:
        return choosers.TopKChooser(topk), dict(rule='topk', topk=topk)
    if temperature is not None:
        return choosers.TemperatureChooser(temperature), dict(rule='temperature', temperature=temperature)
    return argmin, dict(rule='argmin')
