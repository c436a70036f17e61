"""Prior files: the safe format of networks (training/snapshot.py) for priors over the codes (training/prior.py).

`save_prior` / `load_prior` write and read a safetensors file whose metadata `ddn` is the JSON
constructor call (`format` = 'ddn-prior', `class_name` one of `PRIOR_CLASSES`); loading calls one of
our constructors with plain values and copies tensors, nothing from the file runs. The prior of a
network file `X.safetensors` or `X.pkl` sits beside it as `X.prior.safetensors` (`prior_path`):
`network-snapshot-000480.prior.safetensors` in a run folder (not matched by the snapshot patterns,
which match whole names).
"""

import json
import os
from typing import Optional, Sequence

import dnnlib
from torch_utils import checkpoint
from training.snapshot import UnsafeFileError, safetensors_metadata

# Name and version of the prior file format, stored in its metadata.
PRIOR_FORMAT = 'ddn-prior'
PRIOR_VERSION = 1
PRIOR_SUFFIX = '.prior.safetensors'

# The classes a prior file may name.
PRIOR_CLASSES = ('training.prior.FrequencyPrior', 'training.prior.TransformerPrior', 'training.prior.MixturePrior')


def prior_class(class_name, source='<prior>'):
    if class_name not in PRIOR_CLASSES:
        raise UnsafeFileError(f'{source}: refusing prior class {class_name!r}; a prior file may only name {", ".join(PRIOR_CLASSES)}')
    return dnnlib.util.get_obj_by_name(class_name)

# The safe file of a prior, as bytes; `extra_metadata` (JSON values) is stored beside the description.
def prior_bytes(prior, extra_metadata=None):
    from safetensors.torch import save
    cls = type(prior)
    class_name = f'{cls.__module__}.{cls.__qualname__}'
    if class_name not in PRIOR_CLASSES or 'init_kwargs' not in prior.__dict__:
        raise ValueError(f'Only our prior classes ({", ".join(PRIOR_CLASSES)}) can be saved, got {class_name}')
    meta = dict(format=PRIOR_FORMAT, version=PRIOR_VERSION, class_name=class_name,
                init_args=json.loads(json.dumps(list(prior.init_args))), init_kwargs=json.loads(json.dumps(dict(prior.init_kwargs))))
    metadata = {'ddn': json.dumps(meta)}
    for key, value in (extra_metadata or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return save({k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}, metadata=metadata)

def save_prior(prior, path, extra_metadata=None):
    """Write `prior` to `path` (safetensors + JSON description), atomically."""
    checkpoint.save_atomic(prior_bytes(prior, extra_metadata), path, mode='bytes')

def prior_from_bytes(data, source='<prior>'):
    """A prior from the bytes of a prior file, in eval mode. Raises ValueError naming `source`."""
    from safetensors.torch import load
    metadata = safetensors_metadata(data)
    if metadata is None:
        raise ValueError(f'{source} is not a safetensors file (expected a prior written by train_prior.py or by train.py)')
    try:
        meta = json.loads(metadata['ddn'])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f'{source} is a safetensors file without ddn metadata') from None
    if not isinstance(meta, dict) or meta.get('format') != PRIOR_FORMAT:
        found = meta.get('format') if isinstance(meta, dict) else None
        raise ValueError(f'{source} is not a prior file (its ddn metadata has format {found!r}, expected {PRIOR_FORMAT!r})')
    if meta.get('version') != PRIOR_VERSION:
        raise ValueError(f'{source}: {PRIOR_FORMAT} version {meta.get("version")!r}; this code reads version {PRIOR_VERSION}')
    cls = prior_class(meta.get('class_name'), source)
    args, kwargs = meta.get('init_args', []), meta.get('init_kwargs', {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(f'{source}: init_args must be a list and init_kwargs an object')
    try:
        prior = cls(*args, **kwargs)
        prior.load_state_dict(load(bytes(data)), strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f'{source}: the weights do not fit {meta["class_name"]}({args}, {kwargs}): {err}') from None
    return prior.eval().requires_grad_(False)

def prior_metadata(data):
    """The extra metadata of a prior file's bytes (JSON values decoded where they parse)."""
    out = {}
    for key, value in (safetensors_metadata(data) or {}).items():
        if key == 'ddn':
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out

def load_prior(path, device='cpu'):
    """The prior in file `path`, in eval mode without gradients, on `device`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Prior not found: {path}')
    with open(path, 'rb') as f:
        data = f.read()
    return prior_from_bytes(data, path).to(device)

# Where the prior of a network file lives: X.safetensors / X.pkl -> X.prior.safetensors.
def prior_path(network_path):
    network_path = os.fspath(network_path)
    for ext in ('.safetensors', '.pkl'):
        if network_path.endswith(ext) and not network_path.endswith(PRIOR_SUFFIX):
            return network_path[:-len(ext)] + PRIOR_SUFFIX
    return network_path + PRIOR_SUFFIX

# The prior file of a network file, or None if it has none.
def find_prior(network_path) -> Optional[str]:
    path = prior_path(network_path)
    return path if os.path.isfile(path) else None

# A prior whose ks must match a network's (a clear message otherwise).
def check_prior_fits(prior, ks: Sequence[int], source='<prior>'):
    if list(prior.ks) != [int(k) for k in ks]:
        raise ValueError(f'{source}: the prior is for {len(prior.ks)} layers of K={sorted(set(prior.ks))}, '
                         f'the network has {len(ks)} layers of K={sorted(set(int(k) for k in ks))}')
    return prior
