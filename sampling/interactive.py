"""Zero-shot conditional generation for an interactive front end (demo.py).

Paper §3.5 / `DDN.md` §5. The web demo lets a user draw colour strokes, upload a guide image, mix
guides and look at the coarse-to-fine path of one sample. Everything that decides an image happens
here, in `sampling/guide_spec.py` and in `sampling/guidance.py` (the same guides and choosers as
`generate.py`); the page only turns widgets into these arguments. So a guided image of the demo is
the image `generate.py` writes for the same seed, guide and choice rule.

- `strokes_to_guide()`: RGBA stroke layers drawn over an empty canvas -> a guide image and a mask
  (white = known) at the network's resolution: the drawn pixels are the known region.
- `upload_to_guide()`: an uploaded picture -> a guide image, checked against the network.
- `parse_seeds()` / `build_scorer()` / `run_request()`: one request of the page (seeds text, guide
  weights, strokes, upload, choice rule) -> a GuidedResult.
- `run_guided()`: guided samples for a list of seeds, the unguided samples of the same seeds, and the
  chosen image of every layer of one of them.
- `coarse_to_fine()` / `write_gif()`: that path as frames of one size, and as an animated GIF.
- `load_page_network()`: a network named in the page (a file, run folder or URL): a URL is downloaded
  into memory with a size cap, never into the download cache, and only a network file is accepted.
"""

import io
import os
import urllib.parse
from typing import NamedTuple, Optional, Sequence

import numpy as np
import PIL.Image
import torch

from dnnlib.util import parse_int_list
from sampling import guidance
from training import snapshot
from training.ddl import argmin, resize_area
from sampling.guide_spec import guide_from_pil, make_chooser, parse_guides
from sampling.prior_sampling import PriorChooser, sample_with_prior
from training.images import to_uint8
from training.determinism import batch_invariant

# At most this many seeds per request, so a typo such as 0-99999 cannot stall the page.
MAX_SEEDS = 64

# Side of the page's drawing canvas (strokes are area-resized to the network's resolution).
CANVAS_SIZE = 256

# Guides that read the uploaded image, with their slider labels.
UPLOAD_GUIDES = {
    'superres': 'super-resolution (upload: a low-resolution image)',
    'color':    'colourisation (upload: a grayscale image; luminance L2)',
    'lowbit':   'low-bit (upload, quantised to the bits below)',
    'edge':     'edges (upload: an edge map, white = edge)',
    'l2':       'L2 to the upload',
}

# Largest network file the page loads, by default (a URL typed by a visitor is downloaded into memory).
MAX_NETWORK_BYTES = 1 << 30

# ----------------------------------------------------------------------------
# A network named in the page.

# The bytes of an http(s) URL, at most `max_bytes` (refused from its Content-Length when it says more,
# else when the body passes the cap), within `deadline` seconds. Nothing is written to disk. Raises
# ValueError / OSError.
def _download_capped(url, max_bytes, timeout=(10, 60), deadline=600):
    import time

    import requests
    start = time.monotonic()
    try:
        with requests.get(url, stream=True, timeout=timeout) as res:
            if res.status_code != 200:
                raise OSError(f'Could not download {url}: HTTP {res.status_code} {res.reason}')
            length = res.headers.get('Content-Length')
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ValueError(f'{url} is {int(length)} bytes, more than the {max_bytes} bytes a network may have here')
            buf = io.BytesIO()
            for chunk in res.iter_content(chunk_size=1 << 20):
                buf.write(chunk)
                if buf.tell() > max_bytes:
                    raise ValueError(f'{url} is more than the {max_bytes} bytes a network may have here')
                if time.monotonic() - start > deadline:
                    raise OSError(f'Could not download {url}: not complete after {deadline} s')
            return buf.getvalue()
    except requests.RequestException as e:
        raise OSError(f'Could not download {url}: {e}') from None

def load_page_network(name, device='cpu', max_bytes=MAX_NETWORK_BYTES):
    """(path, network) of a network named in the page, like `--network` (a file, a run folder or a
    URL) but bounded: at most `max_bytes`, an http(s) URL downloaded into memory only (not into the
    download cache, so a file that is no network leaves nothing behind), and only network files: the
    safe format or our snapshot pickle, loaded without running code. Raises OSError / ValueError."""
    name = (name or '').strip()
    scheme = urllib.parse.urlparse(name).scheme if '://' in name else ''
    if scheme in ('http', 'https'):
        path, data = name, _download_capped(name, max_bytes)
    elif scheme:
        raise ValueError(f'{name}: only http(s) URLs, files and run folders name a network here')
    else:
        path = snapshot.resolve_network(name)
        if os.path.getsize(path) > max_bytes:
            raise ValueError(f'{path} is {os.path.getsize(path)} bytes, more than the {max_bytes} bytes a network may have here')
        with open(path, 'rb') as f:
            data = f.read()
    fmt = snapshot.file_format(data)
    if fmt in ('zip', 'pickle', 'unknown'):
        raise ValueError(f'{path} is not a network file (a network-snapshot-*.safetensors, or a network-snapshot-*.pkl '
                         'written by train.py)')
    net = snapshot.network_from_bytes(data, path, trust_pickle=False)
    return path, net.eval().requires_grad_(False).to(device)

# ----------------------------------------------------------------------------
# Widgets -> guide tensors.

def strokes_to_guide(layers: Sequence[np.ndarray], channels: int, resolution: int, min_cover: float = 0.5):
    """Guide image (1, C, R, R) in [-1, 1] and mask (1, 1, R, R) in {0, 1} from drawn stroke layers.

    layers:    HxWx4 uint8 RGBA arrays (the editor's layers, transparent where nothing is drawn),
               composited in order; the canvas must be square.
    min_cover: a pixel of the network's grid is known when at least this fraction of its area is
               covered by strokes.
    The guide is the strokes' colour averaged over the covered part of each pixel (not blended with
    the empty canvas), rounded to uint8 and converted as a guide file is (`guide_spec.guide_from_pil`):
    saving it and the mask as PNGs and passing them to `generate.py --guide inpaint` gives the same
    images. Raises ValueError when nothing (or too little) is drawn.
    """
    layers = [np.asarray(layer) for layer in layers if layer is not None]
    if not layers:
        raise ValueError('Nothing is drawn: draw some strokes on the canvas first')
    h, w = layers[0].shape[:2]
    if h != w:
        raise ValueError(f'The canvas is {w}x{h}; it must be square')
    rgb = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)
    for layer in layers:
        if layer.ndim != 3 or layer.shape[:2] != (h, w) or layer.shape[2] not in (3, 4):
            raise ValueError(f'Stroke layers must be HxWx4 RGBA images of one size, got {layer.shape}')
        a = layer[..., 3].astype(np.float32) / 255 if layer.shape[2] == 4 else np.ones((h, w), np.float32)
        rgb = rgb * (1 - a[..., None]) + layer[..., :3].astype(np.float32) * a[..., None]
        alpha = alpha + a * (1 - alpha)
    if alpha.max() <= 0:
        raise ValueError('Nothing is drawn: draw some strokes on the canvas first')
    premult = resize_area(torch.from_numpy(rgb * alpha[..., None]).permute(2, 0, 1)[None], resolution)
    cover = resize_area(torch.from_numpy(alpha)[None, None], resolution)
    mask = (cover >= min_cover).float()
    if mask.sum() == 0:
        raise ValueError(f'The strokes are too thin to cover any pixel of the {resolution}x{resolution} '
                         'image: draw thicker strokes')
    colour = (premult / cover.clamp(min=1e-6)).round().clamp(0, 255).to(torch.uint8)
    picture = PIL.Image.fromarray(colour[0].permute(1, 2, 0).numpy(), 'RGB')
    return guide_from_pil(picture, channels=channels), mask

def upload_to_guide(picture, channels: int, resolution: int, low_res: bool = False, resize: bool = False):
    """An uploaded picture (PIL image or HxW[xC] uint8 array) as a (1, C, h, w) tensor in [-1, 1],
    converted as `generate.py --guide-image` converts a file.

    low_res: the guide may be smaller than the network's images (superres): its size must divide the
             network's resolution. Otherwise it must be resolution x resolution.
    resize:  resize a picture of another size to the network's resolution instead of refusing it.
    Raises ValueError naming the expected size.
    """
    if picture is None:
        raise ValueError('No image uploaded')
    image = picture if isinstance(picture, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(picture))
    w, h = image.size
    fits = w == h and ((w <= resolution and resolution % w == 0) if low_res else w == resolution)
    if not fits and not resize:
        want = f'a square size that divides {resolution}' if low_res else f'{resolution}x{resolution}'
        raise ValueError(f'The upload is {w}x{h}, but this network needs {want} (or tick "resize the upload")')
    if w != h:
        image = image.resize((resolution, resolution), PIL.Image.Resampling.BOX)
    return guide_from_pil(image, channels=channels, resolution=None if fits else resolution,
                                   allow_resize=True, source='The upload')

# ----------------------------------------------------------------------------
# One request of the page -> library calls. Every failure of the user's input is a ValueError with a
# message for the page.

def parse_seeds(text):
    """'0-7' -> [0, ..., 7], at most MAX_SEEDS seeds (checked before a range is expanded)."""
    text = str(text or '').strip()
    if not text:
        raise ValueError('No seeds given: write e.g. 0-7 or 1,5,9')
    return parse_int_list(text, max_values=MAX_SEEDS)

def _editor_layers(editor):
    """The stroke layers of an ImageEditor value (a dict with 'layers'), or [] if nothing is drawn."""
    if not editor:
        return []
    layers = editor.get('layers') or []
    return [np.asarray(layer) for layer in layers if layer is not None and np.asarray(layer).size]

def build_scorer(net, weights, strokes=None, upload=None, bits=None, text=None, resize=False, device='cpu'):
    """The CombinedScorer of the weighted guides (None if every weight is 0), each guide built by
    `guide_spec.parse_guides` as generate.py builds it. weights: {guide: weight}; 'inpaint' reads the
    strokes, the UPLOAD_GUIDES the upload, 'clip' the text."""
    ch, res = net.img_channels, net.img_resolution
    parts = []
    for name, weight in weights.items():
        if not weight:
            continue
        kwargs = {}
        if name == 'inpaint':
            image, mask = strokes_to_guide(_editor_layers(strokes), ch, res)
            kwargs = dict(image=image, mask=mask)
        elif name in UPLOAD_GUIDES:
            if upload is None:
                raise ValueError(f'The {name} guide needs an uploaded image')
            # As generate.py reads --guide-image: colour and edge guides as grayscale files.
            channels = 1 if name in ('color', 'edge') else ch
            image = upload_to_guide(upload, channels, res, low_res=name == 'superres', resize=resize)
            kwargs = dict(image=image, bits=int(bits) if bits else None)
        elif name == 'clip':
            if not (text or '').strip():
                raise ValueError('The CLIP guide needs a text prompt')
            kwargs = dict(text=text.strip())
        else:
            raise ValueError(f'Unknown guide {name!r}')
        parts.extend(parse_guides(f'{name}:{weight}', img_channels=ch, img_resolution=res, device=device, **kwargs).scorers)
    return guidance.CombinedScorer(parts) if parts else None

def run_request(net, weights, seeds_text, temperature=0.0, topk=0, path_seed=None, strokes=None, upload=None,
                bits=None, text=None, resize=False, device='cpu', prior=None):
    """Everything one click of "Generate" computes: (GuidedResult, whether any guide was on)."""
    seeds = parse_seeds(seeds_text)
    chooser, _ = make_chooser(temperature=temperature or None, topk=int(topk) if topk else None)
    scorer = build_scorer(net, weights, strokes=strokes, upload=upload, bits=bits, text=text, resize=resize, device=device)
    if path_seed in (None, ''):
        path_seed = seeds[0]
    result = run_guided(net, scorer, seeds, chooser=chooser, path_seed=int(path_seed), prior=prior)
    return result, scorer is not None

# ----------------------------------------------------------------------------
# Guided and unguided samples of the same seeds, and one sample's coarse-to-fine path.

class GuidedResult(NamedTuple):
    seeds:      list            # The seeds, in order.
    guided:     torch.Tensor    # (N, C, H, W) guided images in [-1, 1].
    unguided:   torch.Tensor    # (N, C, H, W) unguided images of the same seeds.
    codes:      torch.Tensor    # (N, L) codes of the guided images.
    path:       list            # The chosen image (1, C, h, w) of every layer of `path_seed`, coarse to fine.
    path_seed:  int             # The seed whose path is shown.

@torch.no_grad()
def run_guided(net, scorer, seeds: Sequence[int], chooser=argmin, path_seed: Optional[int] = None,
               condition_fn=None, prior=None) -> GuidedResult:
    """Sample `seeds` with `scorer` (a guidance scorer, e.g. from `guide_spec.parse_guides`; None for
    unguided only) and without it, through `prior` (a training.prior_rule.PriorRule) when given. Images
    depend only on the seed, not on the batch, so each one is the image generate.py writes for that
    seed with the same guide, chooser and prior."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError('No seeds given')
    path_seed = seeds[0] if path_seed is None else int(path_seed)
    if path_seed not in seeds:
        raise ValueError(f'The seed to trace ({path_seed}) is not among the seeds {seeds}')
    condition = None if condition_fn is None else condition_fn(seeds)
    with batch_invariant():
        if prior is None:
            plain = net(seeds=seeds, condition=condition)
            out = net(seeds=seeds, condition=condition, scorer=scorer, chooser=chooser, return_layers=True)
        else:
            plain = sample_with_prior(net, seeds, prior, condition=condition)
            out = net(codes=plain.codes, condition=condition, return_layers=True) if scorer is None else \
                net(seeds=seeds, condition=condition, scorer=scorer, chooser=PriorChooser(prior, chooser), return_layers=True)
    i = seeds.index(path_seed)
    path = [layer[i:i + 1].float().cpu() for layer in out.layer_images]
    return GuidedResult(seeds, out.images.float().cpu(), plain.images.float().cpu(), out.codes.cpu(), path, path_seed)

def coarse_to_fine(path: Sequence[torch.Tensor], size: int) -> list:
    """The layers' chosen images (1, C, h, w) in [-1, 1] as uint8 HxWxC frames of size x size,
    nearest-upscaled so each coarse pixel stays a visible square."""
    frames = []
    for x in path:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode='nearest')
        u8 = to_uint8(x[0]).permute(1, 2, 0).numpy()
        frames.append(np.repeat(u8, 3, axis=2) if u8.shape[2] == 1 else u8)
    return frames

def write_gif(frames: Sequence[np.ndarray], path=None, ms_per_frame: int = 300, hold_last_ms: int = 1200) -> bytes:
    """An animated GIF of `frames` (HxWx3 uint8), looping, the last frame held longer. Returns the
    bytes; also writes them to `path` when given."""
    if not frames:
        raise ValueError('No frames to write')
    images = [PIL.Image.fromarray(f) for f in frames]
    durations = [ms_per_frame] * (len(images) - 1) + [hold_last_ms]
    buf = io.BytesIO()
    images[0].save(buf, format='GIF', save_all=True, append_images=images[1:], duration=durations, loop=0)
    data = buf.getvalue()
    if path is not None:
        with open(path, 'wb') as f:
            f.write(data)
    return data
