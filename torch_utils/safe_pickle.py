"""Restricted unpickling: read a pickle without letting it run code.

`pickle.load` imports and calls whatever the file names, so a pickle received from someone else can
run any command. `load()` here resolves only the globals it is told about: plain containers, the
functions torch and numpy use to rebuild tensors and arrays, and what the caller allows (for example
a stand-in class for each of a snapshot's network classes). Any other global is refused with an
`UnsafePickleError` naming the file and the global, before anything from the file is called.

Tensors pickled with `pickle` (not `torch.save`) carry their storage as the bytes of a nested
`torch.save` archive, rebuilt by `torch.storage._load_from_bytes`, which would load that archive with
full unpickling. Here it is loaded with `torch.load(weights_only=True)`, so the nested archive is held
to torch's own allowlist as well.
"""

import builtins
import codecs
import collections
import copyreg
import io
import pickle

import numpy as np
import torch

# ----------------------------------------------------------------------------

class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global that the restricted unpickler does not allow."""

def _load_storage_from_bytes(data):
    return torch.load(io.BytesIO(data), weights_only=True)

# Constructors a pickle may call, bounded: each takes only what the file holds (a list, bytes), never
# a count it could inflate (`bytearray(4_000_000_000)`, `set(range(400_000_000))`: a few bytes of
# pickle, gigabytes of memory). A `range` is allowed (the author's snapshots hold some): it takes no
# memory itself, and none of these constructors accepts one.
def _from_contents(cls):
    def build(*args):
        if any(not isinstance(a, (bytes, bytearray, str, list, tuple, set, frozenset, dict)) for a in args[:1]):
            raise UnsafePickleError(f'refusing {cls.__name__}() of a {type(args[0]).__name__}: a pickle may build it only '
                                    'from the contents it holds')
        return cls(*args)
    build.__name__ = cls.__name__
    return build

def _bounded_reconstructor(cls, base, state):
    if base is not object and state is not None and not isinstance(state, (bytes, str, list, tuple, dict)):
        raise UnsafePickleError(f'refusing copyreg._reconstructor({getattr(cls, "__name__", cls)}, '
                                f'{getattr(base, "__name__", base)}, {type(state).__name__})')
    return copyreg._reconstructor(cls, base, state)

def _safe_globals():
    table = {('builtins', name): _from_contents(getattr(builtins, name)) for name in ('set', 'frozenset', 'bytearray')}
    table.update({('builtins', name): getattr(builtins, name) for name in ('slice', 'complex', 'range')})
    table.update({
        ('collections', 'OrderedDict'):             collections.OrderedDict,
        ('_codecs', 'encode'):                      codecs.encode,      # bytes in protocol 2
        ('copyreg', '_reconstructor'):              _bounded_reconstructor,  # its class arguments are resolved here too
        ('torch._utils', '_rebuild_tensor_v2'):     torch._utils._rebuild_tensor_v2,
        ('torch._utils', '_rebuild_parameter'):     torch._utils._rebuild_parameter,
        ('torch.storage', '_load_from_bytes'):      _load_storage_from_bytes,
        ('torch', 'Size'):                          torch.Size,
        ('torch', 'device'):                        torch.device,
        ('numpy', 'dtype'):                         np.dtype,
        ('numpy', 'ndarray'):                       np.ndarray,
    })
    # numpy moved its pickling helpers from numpy.core to numpy._core in 2.0; files name either.
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        table[(module, '_reconstruct')] = multiarray._reconstruct
        table[(module, 'scalar')] = multiarray.scalar
    numeric = np._core.numeric if hasattr(np, '_core') else np.core.numeric
    for module in ('numpy.core.numeric', 'numpy._core.numeric'):
        table[(module, '_frombuffer')] = numeric._frombuffer  # arrays in protocol 5
    # Dtype objects (torch.float32, ...) pickle as module attributes.
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            table[('torch', name)] = value
    # numpy scalar types (numpy.float32, numpy.dtypes.Float32DType, ...) needed by dtype pickles.
    for name in ('bool_', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64',
                 'float16', 'float32', 'float64', 'complex64', 'complex128', 'str_', 'bytes_'):
        if hasattr(np, name):
            table[('numpy', name)] = getattr(np, name)
    if hasattr(np, 'dtypes'):
        for name in dir(np.dtypes):
            if name.endswith('DType'):
                table[('numpy.dtypes', name)] = getattr(np.dtypes, name)
    return table

SAFE_GLOBALS = _safe_globals()
_PY2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}

# ----------------------------------------------------------------------------

class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allowed, resolve, source):
        super().__init__(file)
        self._allowed = allowed
        self._resolve = resolve
        self._source = source

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)  # protocol <= 2 writes Python 2 module names
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        if key in SAFE_GLOBALS:
            return SAFE_GLOBALS[key]
        if self._resolve is not None:
            value = self._resolve(module, name)
            if value is not None:
                return value
        raise UnsafePickleError(f'{self._source}: refusing to load global {module}.{name} '
                                '(the file would run code that is not on the allowlist; load it only if you trust it)')

    def persistent_load(self, pid):
        raise UnsafePickleError(f'{self._source}: persistent ids are not supported by the restricted unpickler ({pid!r:.80})')

def load(file, allowed=None, resolve=None, source=None):
    """Unpickle `file` (a binary file object or bytes) resolving only allowed globals.

    allowed: {(module, name): object} — what each extra global resolves to (a real class, or a
             stand-in that builds the object another way).
    resolve: optional `resolve(module, name) -> object or None`, asked for globals not in the tables
             (None refuses).
    source:  the name used in error messages (a path or URL).
    """
    if isinstance(file, (bytes, bytearray, memoryview)):
        file = io.BytesIO(file)
    if source is None:
        source = getattr(file, 'name', '<pickle>')
    try:
        return _Unpickler(file, dict(allowed or {}), resolve, source).load()
    except UnsafePickleError as err:
        if str(err).startswith(f'{source}:'):
            raise
        raise UnsafePickleError(f'{source}: {err}') from None

class _Placeholder:
    """Stands for every global during a dry run: accepts any arguments and state, calls nothing."""
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)
    def __init__(self, *args, **kwargs):
        pass
    def __setstate__(self, state):
        pass
    def __setitem__(self, key, value):
        pass
    def append(self, value):
        pass
    def extend(self, values):
        pass

class _Recorder(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.found = []
    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        if (module, name) not in self.found:
            self.found.append((module, name))
        return type(name, (_Placeholder,), {})
    def persistent_load(self, pid):
        return None

def globals_of(file):
    """The (module, name) pairs a pickle refers to, in order of first use, found by a dry run in
    which every global is a placeholder (nothing from the file is imported or called). Lets a caller
    tell formats apart (ours, the author's) before choosing what to allow."""
    if isinstance(file, (bytes, bytearray, memoryview)):
        file = io.BytesIO(file)
    recorder = _Recorder(file)
    recorder.load()
    return recorder.found
