"""Loading and saving networks without running code from the file.

Two formats hold a DDN:
- **safe** (`network-snapshot-NNNNNN.safetensors`, written beside every snapshot pickle by
  train.py, and by `convert.py`): the network's `state_dict()` as a safetensors file, whose
  metadata `ddn` is a JSON of the constructor call: `format`, `version`, `class_name` (one of
  `NETWORK_CLASSES`, our network classes) and `init_args` / `init_kwargs`. Loading it parses JSON,
  calls one of our constructors with plain values and copies tensors: nothing from the file runs.
- **pickle** (`network-snapshot-NNNNNN.pkl`, EDM's format: `pickle.load(f)['ema']`). A plain
  `pickle.load` imports and calls whatever the file names. Here pickles go through the restricted
  unpickler `torch_utils.safe_pickle`, which resolves only tensors, containers, and the classes
  that our snapshots hold: the persistence hook (checked: it builds only `NETWORK_CLASSES`),
  `training.loss.DDNLoss` and `dnnlib.util.EasyDict`. Anything else is refused before it runs,
  unless the caller passes `trust_pickle=True` (the CLIs' `--trust-pickle`), which is plain pickle.

`load_network(source)` takes a file, a URL (downloaded once into the cache) or a run folder (its
newest snapshot; the safe file when both exist) and returns the network. `file_format(data)` is the
one place that tells the formats apart; another pickle layout (the author's released networks)
plugs in through `PICKLE_FORMATS`. The checks before a network is built (`NETWORK_CLASSES`,
`ARG_LIMITS`, `build_checked`) and the pickle layouts live in training/checked_build.py; the names
used everywhere (`UnsafeFileError`, `NETWORK_CLASSES`, ...) are importable from here too.
"""

import io
import json
import os
import pickle
import re
import struct

import torch

import dnnlib
from torch_utils import checkpoint, distributed, limits, safe_pickle
from training.checked_build import (NETWORK_CLASSES, PICKLE_FORMATS, UnsafeFileError, _author_formats, build_checked,
                                    check_network_args, network_class)

# Name and version of the safe format, stored in its metadata.
SAFE_FORMAT = 'ddn-network'
SAFE_VERSION = 1
SAFE_EXT = '.safetensors'
PICKLE_EXT = '.pkl'

# File names in a run folder, '*' standing for the kimg tag (training.run_files.file_tag): the
# training states, and the snapshots in both formats. The one definition; `run_file` fills in a tag.
STATE_PATTERN = 'training-state-*.pt'
SNAPSHOT_PATTERN = 'network-snapshot-*' + PICKLE_EXT
SAFE_SNAPSHOT_PATTERN = 'network-snapshot-*' + SAFE_EXT

def run_file(pattern, tag):
    return pattern.replace('*', tag)

# First bytes of a zip archive (torch.save's format, TorchScript).
_ZIP_MAGIC = b'PK\x03\x04'

# Hint appended to every refusal of a pickle.
TRUST_HINT = ('Load a file you trust with trust_pickle=True (the file then runs as code), '
              'or convert it once to the safe format (save_network_safe, convert.py)')

class NotANetworkError(ValueError):
    """A torch.save / TorchScript archive (a training state, say) where a network file was expected."""

# ----------------------------------------------------------------------------
# Safe format: safetensors + the constructor call as JSON metadata.

def _json_value(value, what):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f'Cannot save {what} in the safe format (not JSON): {err}') from None

def safe_bytes(net, extra_metadata=None):
    """The safe-format file of a persistent network (DDNGenerator / DDNRecurrent), as bytes."""
    from safetensors.torch import save
    cls = type(net)
    class_name = f'{cls.__module__}.{cls.__qualname__}'
    if class_name not in NETWORK_CLASSES or 'init_kwargs' not in net.__dict__:
        raise ValueError(f'Only our network classes ({", ".join(NETWORK_CLASSES)}) can be saved in the safe format, '
                         f'got {class_name}')
    meta = dict(format=SAFE_FORMAT, version=SAFE_VERSION, class_name=class_name,
                init_args=_json_value(list(net.init_args), 'init_args'),
                init_kwargs=_json_value(dict(net.init_kwargs), 'init_kwargs'))
    metadata = {'ddn': json.dumps(meta)}
    for key, value in (extra_metadata or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    tensors = {name: value.detach().cpu().contiguous() for name, value in net.state_dict().items()}
    return save(tensors, metadata=metadata)

def save_network_safe(net, path, extra_metadata=None):
    """Write `net` in the safe format to `path` (atomically: a temporary name, then a rename)."""
    checkpoint.save_atomic(safe_bytes(net, extra_metadata), path, mode='bytes')

def save_network_pickle(net, path, **extra):
    """Write `net` as our snapshot pickle `dict(ema=net, **extra)` (atomically)."""
    checkpoint.save_atomic(dict(ema=net.cpu(), **extra), path, mode='pickle')

# The JSON header of a safetensors file (a dict), or None if `data` is not one. Raises ValueError
# naming `source` for a header that is one but cannot be parsed (nested too deeply, not UTF-8).
def _safetensors_header(data, source='<network>'):
    if len(data) < 10:
        return None
    (size,) = struct.unpack('<Q', bytes(data[:8]))
    if size > len(data) - 8 or bytes(data[8:9]) != b'{':
        return None
    try:
        header = limits.loads_json(bytes(data[8:8 + size]), f'{source}: the safetensors header')
    except ValueError as err:
        if 'nested too deeply' in str(err):
            raise
        return None
    return header if isinstance(header, dict) else None

# The metadata of a safetensors file (its JSON header's "__metadata__"), or None if `data` is not one.
def safetensors_metadata(data, source='<network>'):
    header = _safetensors_header(data, source)
    if header is None:
        return None
    metadata = header.get('__metadata__') or {}
    return metadata if isinstance(metadata, dict) else {}

def load_safe(data, source='<network>'):
    """A network from the bytes of a safe-format file. Raises ValueError naming `source`."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    header = _safetensors_header(data, source)
    if header is None:
        raise ValueError(f'{source} is not a safetensors file')
    metadata = header.get('__metadata__') or {}
    try:
        meta = limits.loads_json(metadata['ddn'], f'{source}: the "ddn" metadata')
    except (KeyError, TypeError, ValueError) as err:
        if 'nested too deeply' in str(err):
            raise
        raise ValueError(f'{source} is a safetensors file without ddn metadata (a "ddn" JSON with the network\'s '
                         'constructor arguments); write one with convert.py or train.py') from None
    if not isinstance(meta, dict) or meta.get('format') != SAFE_FORMAT:
        raise ValueError(f'{source}: the "ddn" metadata is not a {SAFE_FORMAT} description')
    if meta.get('version') != SAFE_VERSION:
        raise ValueError(f'{source}: {SAFE_FORMAT} version {meta.get("version")!r}; this code reads version {SAFE_VERSION}')
    cls = network_class(meta.get('class_name'), source)
    args, kwargs = meta.get('init_args', []), meta.get('init_kwargs', {})
    check_network_args(meta['class_name'], args, kwargs, source)
    shapes = {}
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get('shape'), list):
            raise ValueError(f'{source}: malformed safetensors header entry {name!r:.80}')
        shapes[name] = entry['shape']
    try:
        state = load(bytes(data))
    except SafetensorError as err:
        raise ValueError(f'{source}: a damaged or truncated safetensors file ({err})') from None
    net = build_checked(cls, args, kwargs, shapes, source)
    try:
        net.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f'{source}: the weights do not fit {meta["class_name"]}({kwargs}): {err}') from None
    return net


# ----------------------------------------------------------------------------
# The one dispatch point: what a network file is, from its bytes.

def file_format(data, source='<network>'):
    """'safetensors', 'zip' (torch.save / TorchScript), a PICKLE_FORMATS entry (a pickle we can
    read safely), 'pickle' (any other pickle) or 'unknown'. Calls nothing from the file."""
    head = bytes(data[:4])
    if safetensors_metadata(data, source) is not None:
        return 'safetensors'
    if head == _ZIP_MAGIC:
        return 'zip'
    if head[:1] == b'\x80':
        try:
            found = safe_pickle.globals_of(data)
        except Exception:       # Truncated or not a pickle after all.
            return 'unknown'
        for fmt in [*_author_formats(), *PICKLE_FORMATS]:
            if fmt.detect(data, found):
                return fmt
        return 'pickle'
    return 'unknown'

def network_from_bytes(data, source, trust_pickle=False):
    """The network held by the bytes of a network file (any format). Raises UnsafeFileError if
    loading would run code and `trust_pickle` is False, ValueError for anything else wrong."""
    fmt = file_format(data, source)
    if fmt == 'safetensors':
        net = load_safe(data, source)
        check_finite(net, source)
        return net
    if fmt == 'zip':
        raise NotANetworkError(f'{source} is a torch.save/TorchScript archive, not a network snapshot '
                         '(a training-state-*.pt resumes a run; a network is a run folder '
                         'or a network-snapshot-*.safetensors/.pkl)')
    if fmt == 'unknown':
        raise ValueError(f'{source} is not a network file (expected a .safetensors written by train.py/convert.py, '
                         'or a network-snapshot-*.pkl); is it truncated?')
    try:
        if trust_pickle:
            obj = pickle.loads(data)
        elif fmt == 'pickle':
            raise UnsafeFileError(f'{source} is a pickle that is not a ddn snapshot: loading it would run code from the file. '
                                  + TRUST_HINT)
        else:
            obj = fmt.load(data, source)
    except safe_pickle.UnsafePickleError as err:
        raise UnsafeFileError(f'{err}. {TRUST_HINT}') from None
    except UnsafeFileError as err:
        raise UnsafeFileError(f'{err}' if TRUST_HINT in str(err) else f'{err}. {TRUST_HINT}') from None
    except Exception as err:
        raise ValueError(f'Could not load network {source}: {type(err).__name__}: {err}') from err
    net = obj['ema'] if isinstance(obj, dict) and 'ema' in obj else obj
    if not (isinstance(net, torch.nn.Module) and hasattr(net, 'ks') and hasattr(net, 'encode')):
        what = f'a dict with keys {sorted(map(str, obj))}' if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f'{source} holds {what}, not a DDN snapshot (a dict whose "ema" is a DDNGenerator)')
    check_finite(net, source)
    return net

def check_finite(net, source='<network>'):
    """Raise ValueError naming `source` if a parameter of `net` holds NaN or infinity (a diverged
    run's snapshot would otherwise sample black or noise images with no error)."""
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                bad = int((~torch.isfinite(param)).sum())
                raise ValueError(f'{source}: parameter {name} holds {bad} non-finite values (NaN or infinity) of {param.numel()}; '
                                 'the training that wrote it diverged: use an earlier snapshot')

# ----------------------------------------------------------------------------
# --network FILE | URL | RUNDIR.

def resolve_network(source):
    """The file or URL that `--network` names: a run folder gives its newest snapshot (the largest
    kimg tag; the safe file when both formats have it). Raises FileNotFoundError with the reason."""
    source = os.fspath(source)
    if dnnlib.util.is_url(source):
        return source
    if os.path.isdir(source):
        path = checkpoint.latest(source, (SAFE_SNAPSHOT_PATTERN, SNAPSHOT_PATTERN))
        if path is None:
            raise FileNotFoundError(f'No network-snapshot-*.safetensors or .pkl in run folder {source}')
        return path
    if not os.path.isfile(source):
        raise FileNotFoundError(f'Network not found: {source} (expected a network-snapshot-*.safetensors/.pkl, '
                                'a URL or a run folder)')
    return source

def read_bytes(path):
    """The bytes of a file or URL (cached). With several processes rank 0 downloads first."""
    remote = dnnlib.util.is_url(path)
    leader = distributed.get_rank() == 0
    if remote and not leader:
        distributed.barrier()
    data, error = None, None
    try:
        with dnnlib.util.open_url(path, verbose=leader) as f:
            data = f.read()
    except Exception as err:
        error = err
    if remote and leader:
        distributed.barrier()  # Reached even on failure, so the other ranks do not hang.
    if error is not None:
        raise OSError(f'Could not read network {path}: {error}') from error
    return data

def load_network(source, device='cpu', trust_pickle=False):
    """(path, network) of a network file, URL or run folder, in eval mode without gradients, on
    `device`. Nothing from the file runs unless `trust_pickle`. Raises FileNotFoundError / OSError
    (missing, unreadable), UnsafeFileError (would run code) or ValueError (not a network)."""
    path = resolve_network(source)
    net = network_from_bytes(read_bytes(path), path, trust_pickle=trust_pickle)
    return path, net.eval().requires_grad_(False).to(device)

# A short fingerprint of a network's weights and buffers (sha256 of names, dtypes, shapes and
# bytes), recorded with latents so that decoding them with another network can warn.
@torch.no_grad()
def fingerprint(net):
    import hashlib
    digest = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f'{name}:{value.dtype}:{tuple(value.shape)};'.encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]

# ----------------------------------------------------------------------------
# Training states: state dicts and plain values, loaded with torch.load(weights_only=True).

def load_state(path):
    """A training state (`torch.save` of state dicts, tensors and plain values), with torch's
    restricted unpickler: a file that names anything else is refused. Raises FileNotFoundError,
    UnsafeFileError or ValueError, each naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Training state not found: {path}')
    with open(path, 'rb') as f:
        data = f.read()
    if not data.startswith(_ZIP_MAGIC):
        raise ValueError(f'{path} is not a ddn training state (training-state-*.pt, a torch.save archive); '
                         'a network snapshot is not a training state (a run starts from one by transfer)')
    try:
        return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(err))
        what = f'the global {found.group(1)}' if found else 'code'
        raise UnsafeFileError(f'{path}: refusing to load: the file names {what}, which a training state never holds '
                              '(a state has only tensors, state dicts and plain values)') from None
    except Exception as err:
        raise ValueError(f'Could not load training state {path}: {type(err).__name__}: {err} (truncated or corrupt?)') from None
