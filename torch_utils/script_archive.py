"""Reading the tensors of a TorchScript archive without running it.

`torch.jit.load` compiles the archive's code and runs it while loading (a scripted class's
`__setstate__`, for one), so a TorchScript file from someone else can write any file the user can.
`read_module_tree()` here reads only the archive's `data.pkl` through a restricted unpickler: each
scripted object (`__torch__.*` class) becomes a `ScriptObject` holding its attributes as they were
saved (no method of the file is called, its code files are never read), tensors are rebuilt from the
archive's `data/<key>` records, and any other global is refused. A caller then matches the tree
against a module of its own (`named_tensors`, `attribute`) and copies the weights into it.
"""

import io
import pickle
import zipfile

import numpy as np
import torch

from torch_utils.safe_pickle import SAFE_GLOBALS, UnsafePickleError

# Largest data.pkl we parse (the module tree; weights live in separate records).
MAX_DATA_PKL = 64 << 20

class ScriptObject:
    """Stands for one object of a TorchScript archive: its class name and saved attributes."""
    def __init__(self, qualname):
        self.qualname = qualname
        self.state = {}

    def __setstate__(self, state):
        self.state = dict(state) if isinstance(state, dict) else {'__state__': state}

    def __repr__(self):
        return f'ScriptObject({self.qualname}, {sorted(self.state)})'

def _script_class(qualname):
    # A fresh class per name, so NEWOBJ builds a ScriptObject that knows what it stands for.
    def new(cls, *args):
        obj = object.__new__(cls)
        ScriptObject.__init__(obj, qualname)
        return obj
    return type('ScriptObject', (ScriptObject,), {'__new__': new, '__init__': lambda self, *args: None})

# torch.FloatStorage etc. -> dtype, as data.pkl names the storage type of each tensor record.
_STORAGE_DTYPES = {'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
                   'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                   'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                   'BoolStorage': torch.bool}

# TorchScript's typed-list and type-tag helpers in data.pkl: each only returns its first argument.
_JIT_PICKLE_HELPERS = {name: (lambda value, *args: value) for name in
                       ('build_intlist', 'build_doublelist', 'build_boollist', 'build_tensorlist', 'restore_type_tag')}

# The tensor rebuild function of data.pkl, done here on a flat tensor (no storage object from the file).
def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, torch.Tensor):
        raise UnsafePickleError('a tensor record does not name a storage')
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(n > 0 for n in size) else 0
    if offset < 0 or any(s < 0 for s in stride) or needed > storage.numel():
        raise UnsafePickleError(f'a tensor of shape {tuple(size)} does not fit its storage of {storage.numel()} elements')
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()

class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data, archive, prefix, source):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._source = archive, prefix, source

    def find_class(self, module, name):
        if module.startswith('__torch__.') or module == '__torch__':
            return _script_class(f'{module}.{name}')
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == 'torch.jit._pickle' and name in _JIT_PICKLE_HELPERS:
            return _JIT_PICKLE_HELPERS[name]
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return _rebuild_tensor
        if (module, name) in (('collections', 'OrderedDict'), ('builtins', 'set'), ('builtins', 'frozenset')) \
                or (module == 'torch' and isinstance(SAFE_GLOBALS.get((module, name)), torch.dtype)):
            return SAFE_GLOBALS[(module, name)]
        raise UnsafePickleError(f'{self._source}: TorchScript data names {module}.{name}, which a weights-only read does not allow')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], torch.dtype)):
            raise UnsafePickleError(f'{self._source}: unexpected record reference {pid!r:.80}')
        _, dtype, key, _location, numel = pid
        try:
            raw = self._archive.read(f'{self._prefix}data/{key}')
        except KeyError:
            raise UnsafePickleError(f'{self._source}: tensor record {key} is missing') from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not isinstance(numel, int) or len(raw) < numel * itemsize:
            raise UnsafePickleError(f'{self._source}: tensor record {key} holds {len(raw)} bytes, expected {numel} x {itemsize}')
        return torch.from_numpy(np.frombuffer(raw[:numel * itemsize], dtype=np.uint8).copy()).view(dtype)

# Whether bytes are a TorchScript archive (a zip with `<name>/constants.pkl` beside `<name>/data.pkl`).
def is_script_archive(data):
    if bytes(data[:4]) != b'PK\x03\x04':
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return any(name.endswith('/constants.pkl') for name in z.namelist())
    except zipfile.BadZipFile:
        return False

def read_module_tree(data, source='<archive>'):
    """The root ScriptObject of a TorchScript archive's bytes, read without running anything from it.
    Raises ValueError (UnsafePickleError for a disallowed global) naming `source`."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = [n for n in z.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
            if len(names) != 1:
                raise ValueError(f'{source} is not a TorchScript archive (no <name>/data.pkl)')
            info = z.getinfo(names[0])
            if info.file_size > MAX_DATA_PKL:
                raise ValueError(f'{source}: data.pkl of {info.file_size} bytes is larger than {MAX_DATA_PKL}')
            root = _ArchiveUnpickler(z.read(info), z, names[0][:-len('data.pkl')], source).load()
    except zipfile.BadZipFile as e:
        raise ValueError(f'{source} is not a TorchScript archive: {e}') from e
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as e:
        raise ValueError(f'{source}: cannot read the TorchScript data: {e}') from e
    if not isinstance(root, ScriptObject):
        raise ValueError(f'{source}: the TorchScript data holds a {type(root).__name__}, not a module')
    return root

def named_tensors(obj, prefix=''):
    """{dotted attribute path: tensor} of every tensor below a ScriptObject, as a state dict names them."""
    out = {}
    for key, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value
        elif isinstance(value, ScriptObject):
            out.update(named_tensors(value, f'{prefix}{key}.'))
    return out

def attribute(obj, path, default=None):
    """The saved attribute at a dotted path below a ScriptObject (or `default`)."""
    for key in path.split('.'):
        if not isinstance(obj, ScriptObject) or key not in obj.state:
            return default
        obj = obj.state[key]
    return obj
