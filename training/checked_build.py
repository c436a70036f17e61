"""Building the network a file names, checked first, and the pickle layouts read without running code.

A network file names a class and its constructor arguments; before anything is built:
- `network_class`: the class must be one of `NETWORK_CLASSES` (our network classes), else
  `UnsafeFileError`;
- `check_network_args`: the arguments must be plain JSON values within `ARG_LIMITS` (a small file must
  not make us build a network of gigabytes);
- `build_checked`: the network is built first on the meta device and its state dict compared with the
  file's tensor shapes; only then is it built for real.

Pickles (training/snapshot.py's `file_format`) are read by the restricted unpickler
`torch_utils.safe_pickle` in one of the layouts of `PICKLE_FORMATS` (our snapshots, whose persistence
hook goes through these checks) or of `_author_formats()` (the author's released networks,
training/author.py).
"""

import importlib
import inspect
from typing import Callable, NamedTuple

import torch

import dnnlib
from torch_utils import persistence, safe_pickle

# The classes a network file may name (the safe format's class_name, a pickle's persistent class).
NETWORK_CLASSES = ('training.networks.DDNGenerator', 'training.networks.DDNRecurrent')

class UnsafeFileError(ValueError):
    """A file would need to run code to load, and the caller did not allow it."""

# ----------------------------------------------------------------------------
# The allowlisted network classes, imported on first use.

def network_class(class_name, source='<network>'):
    if class_name not in NETWORK_CLASSES:
        raise UnsafeFileError(f'{source}: refusing network class {class_name!r}; a network file may only name '
                              f'{", ".join(NETWORK_CLASSES)}')
    return dnnlib.util.get_obj_by_name(class_name)

# ----------------------------------------------------------------------------
# Checked construction: argument bounds, then shapes on the meta device.

# Sane bounds on the constructor arguments a network file names, checked before anything is built:
# a 200 KB file must not make us build a network of gigabytes, or loop for minutes building modules.
ARG_LIMITS = dict(
    img_resolution  = 4096,     # Side of the output images.
    img_channels    = 4,
    start_size      = 4096,
    max_blockn      = 256,      # Blocks per scale (the paper's largest setting is 32).
    max_outputk     = 65536,    # K per DDL.
    max_channels    = 16384,
    min_channels    = 16384,
    label_dim       = 1 << 20,
    num_iters       = 65536,    # DDNRecurrent: the shared layer's repeats (no modules per repeat).
    outputk         = 65536,
    channels        = 16384,
    levels          = 16,
)

def check_network_args(class_name, args, kwargs, source='<network>'):
    """Raise ValueError unless a network file's constructor call is plain JSON values within ARG_LIMITS
    (finite numbers, no argument above its bound)."""
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(f'{source}: init_args must be a list and init_kwargs an object')
    def check(key, value, depth=0):
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (list, tuple, dict)) and depth < 2 and len(value) <= 4096:
            for item in (value.values() if isinstance(value, dict) else value):
                check(key, item, depth + 1)
            return
        if not isinstance(value, (int, float)):
            raise ValueError(f'{source}: constructor argument {key}={value!r:.60} is not a number, string, bool or short list')
        if value != value or value in (float('inf'), float('-inf')):
            raise ValueError(f'{source}: constructor argument {key}={value} is not finite')
        if key in ARG_LIMITS and not -ARG_LIMITS[key] <= value <= ARG_LIMITS[key]:
            raise ValueError(f'{source}: constructor argument {key}={value} is beyond the limit of {ARG_LIMITS[key]}; '
                             'not a network this code builds')
    for key, value in [*((f'init_args[{i}]', v) for i, v in enumerate(args)), *kwargs.items()]:
        check(key, value)

def build_checked(cls, args, kwargs, shapes, source='<network>', materialise=True):
    """`cls(*args, **kwargs)`, built first on the meta device (no memory) and compared with the file's tensor
    `shapes` ({name: shape}); only a network whose state dict has exactly those names and shapes is
    then built for real (with `materialise=False`, only checked; returns None). Raises ValueError naming `source`."""
    class_name = f'{cls.__module__}.{cls.__qualname__}'
    try:
        named = inspect.signature(cls).bind(*args, **kwargs).arguments
    except TypeError as err:
        raise ValueError(f'{source}: arguments that {class_name} does not take: {err}') from None
    check_network_args(class_name, [], dict(named.pop('kwargs', {}), **named), source)
    try:
        with torch.device('meta'):
            probe = cls(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f'{source}: cannot build {class_name}({kwargs}): {err}') from None
    expected = {name: tuple(value.shape) for name, value in probe.state_dict().items()}
    del probe
    found = {name: tuple(shape) for name, shape in shapes.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
        parts = [f'{len(missing)} missing (e.g. {missing[0]})' if missing else '',
                 f'{len(extra)} unexpected (e.g. {extra[0]})' if extra else '',
                 f'{len(wrong)} of another shape (e.g. {wrong[0]}: {found[wrong[0]]} in the file, {expected[wrong[0]]} '
                 'for the arguments)' if wrong else '']
        raise ValueError(f'{source}: the tensors do not fit {class_name}({kwargs}): ' + ', '.join(p for p in parts if p))
    return cls(*args, **kwargs) if materialise else None

# ----------------------------------------------------------------------------
# Pickles: our snapshot layout under the restricted unpickler.

# The persistence hook as the restricted unpickler sees it: builds only allowlisted classes.
def _checked_reconstruct(source):
    def reconstruct(meta):
        if not isinstance(meta, dict):
            raise UnsafeFileError(f'{source}: malformed persistent object ({type(meta).__name__})')
        if 'module_src' in meta:    # EDM's persistence carries the class's source code, to be exec'd.
            raise UnsafeFileError(f'{source}: an EDM-style pickle that carries source code to run (class {meta.get("class_name")!r}), '
                                  'not a ddn snapshot')
        cls = network_class(f'{meta.get("module_name")}.{meta.get("class_name")}', source)  # Refuses anything else.
        state = meta.get('state_dict')
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f'{source}: malformed persistent object (its state_dict is not a dict of tensors)')
        args, kwargs = meta.get('init_args'), meta.get('init_kwargs')
        check_network_args(meta['class_name'], list(args) if isinstance(args, tuple) else args, kwargs, source)
        build_checked(cls, args, kwargs, {k: v.shape for k, v in state.items()}, source, materialise=False)
        return persistence._reconstruct_persistent_obj(meta)
    return reconstruct

def _ddn_allowed(source):
    from training.loss import DDNLoss
    return {
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): _checked_reconstruct(source),
        ('training.loss', 'DDNLoss'): DDNLoss,
        ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    }

def _is_ddn_pickle(data, globals_found):
    return ('torch_utils.persistence', '_reconstruct_persistent_obj') in globals_found

def _load_ddn_pickle(data, source):
    return safe_pickle.load(data, allowed=_ddn_allowed(source), source=source)

class PickleFormat(NamedTuple):
    name:   str                                 # Shown in messages.
    detect: Callable                            # (bytes, [(module, name), ...] globals of the pickle) -> bool.
    load:   Callable                            # (bytes, source) -> network, or a dict with 'ema'; no code runs.

# The author's released networks (EDM persistence pickles naming `sddn` classes; training/author.py,
# read without running their code), where that module exists. They name the same persistence hook
# as ours, so they are tried first.
def _author_formats():
    try:
        author = importlib.import_module('training.author')
    except ModuleNotFoundError as err:
        if err.name != 'training.author':
            raise
        return []
    return [PickleFormat("the author's DDN snapshot", lambda data, found: author.is_author_pickle(data),
                         lambda data, source: author.load_author_pickle(data, source=source))]

# Pickle layouts we can read without trusting the file, tried in order after the author's.
PICKLE_FORMATS = [PickleFormat('ddn snapshot', _is_ddn_pickle, _load_ddn_pickle)]
