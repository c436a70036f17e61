"""Pickling of networks by constructor arguments + state dict (`@persistent_class`).

A snapshot `network-snapshot-NNNNNN.pkl` must load in a fresh process (`pickle.load(f)['ema']`) even
after the module's private attributes, helper objects or code layout have changed. So a decorated
`torch.nn.Module` is pickled as: its module name and qualified class name, the arguments its
constructor was called with, and its `state_dict()` (moved to the CPU). Unpickling imports the class,
calls the constructor with those arguments and loads the state dict. Consequences worth knowing:

- Everything that changes the behaviour of the object must be a constructor argument or live in the
  state dict (parameters and persistent buffers). Attributes set after construction are not saved;
  non-persistent buffers are rebuilt by the constructor.
- An unpickled network is on the CPU in the constructor's dtypes; call `.to(device)` as usual. Its
  `training` flags and `requires_grad` flags are restored as they were when pickled.
- The class must be importable under the same name when loading (the repository on `sys.path`).
  Classes defined inside functions cannot be pickled this way.

SECURITY: a plain `pickle.load` imports modules and runs constructors, i.e. executes code: load only
pickles from sources you trust. `training/snapshot.py` loads our snapshots through a restricted
unpickler that lets this hook build only our network classes, and reads and writes the safetensors
format, which is the one to share.

`copy.deepcopy` does not go through the pickle path: it copies the live object (same devices,
dtypes, buffers, hooks), as `ema = copy.deepcopy(net)` in the training loop expects.
"""

import copy
import functools
import importlib

import torch

import dnnlib

# Bumped if the pickled layout changes, so old snapshots can still be read by a newer loader.
_FORMAT_VERSION = 1

# Every class decorated with @persistent_class.
_decorated_classes = set()

# ----------------------------------------------------------------------------
# Class decorator: record constructor arguments and pickle by (class, arguments, state dict).

def persistent_class(orig_class):
    """Make a `torch.nn.Module` subclass picklable by constructor arguments (see module docstring).

    Instances get `init_args` (tuple) and `init_kwargs` (an `EasyDict`): deep copies of what the
    constructor received. The class itself is modified in place and returned, so its name, module
    and MRO stay what the source code says.
    """
    if not (isinstance(orig_class, type) and issubclass(orig_class, torch.nn.Module)):
        raise TypeError(f'@persistent_class expects a torch.nn.Module subclass, got {orig_class!r}')
    if orig_class in _decorated_classes:
        return orig_class
    orig_init = orig_class.__init__

    # Run the original constructor, then remember its arguments for pickling.
    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        # A decorated base class also runs this wrapper (through super().__init__); only the
        # outermost decorated class, the one actually instantiated, records its arguments.
        if type(self) is orig_class:
            object.__setattr__(self, 'init_args', copy.deepcopy(tuple(args)))
            object.__setattr__(self, 'init_kwargs', dnnlib.EasyDict(copy.deepcopy(kwargs)))

    orig_class.__init__ = __init__
    orig_class.__reduce_ex__ = _reduce_ex
    orig_class.__deepcopy__ = _deepcopy
    _decorated_classes.add(orig_class)
    return orig_class

# ----------------------------------------------------------------------------
# True if `obj` (an instance or a class) is handled by @persistent_class pickling.

def is_persistent(obj):
    cls = obj if isinstance(obj, type) else type(obj)
    return cls in _decorated_classes

# ----------------------------------------------------------------------------
# Pickle hook of decorated classes: describe the object by what rebuilds it.

def _reduce_ex(self, protocol):
    # An undecorated subclass of a decorated class has no arguments of its own recorded: it is
    # pickled the ordinary way.
    if not is_persistent(self) or 'init_kwargs' not in self.__dict__:
        return torch.nn.Module.__reduce_ex__(self, protocol)
    cls = type(self)
    if '<locals>' in cls.__qualname__:
        raise TypeError(f'Cannot pickle {cls.__qualname__}: a persistent class must be defined at module level '
                        'so that it can be imported when loading')
    meta = {
        'version':          _FORMAT_VERSION,
        'module_name':      cls.__module__,
        'class_name':       cls.__qualname__,
        'init_args':        self.init_args,
        'init_kwargs':      dict(self.init_kwargs),
        'state_dict':       {name: value.detach().cpu() for name, value in self.state_dict().items()},
        'training':         {name: module.training for name, module in self.named_modules()},
        'requires_grad':    {name: param.requires_grad for name, param in self.named_parameters()},
    }
    return _reconstruct_persistent_obj, (meta,)

# ----------------------------------------------------------------------------
# Unpickle hook: import the class, call its constructor, load the state dict and flags.

def _reconstruct_persistent_obj(meta):
    if meta.get('version') != _FORMAT_VERSION:
        raise ValueError(f'Unsupported persistent-object format version {meta.get("version")!r} '
                         f'(this code reads version {_FORMAT_VERSION})')
    cls = importlib.import_module(meta['module_name'])
    for name in meta['class_name'].split('.'):
        cls = getattr(cls, name)
    obj = cls(*meta['init_args'], **meta['init_kwargs'])
    obj.load_state_dict(meta['state_dict'])
    modules = dict(obj.named_modules())
    for name, training in meta['training'].items():
        if name in modules:
            modules[name].training = training
    params = dict(obj.named_parameters())
    for name, requires_grad in meta['requires_grad'].items():
        if name in params:
            params[name].requires_grad_(requires_grad)
    return obj

# ----------------------------------------------------------------------------
# deepcopy hook of decorated classes: copy the live object, attribute by attribute.

def _deepcopy(self, memo):
    # This is what copy.deepcopy does for an object without a custom __reduce_ex__; it keeps
    # devices, dtypes, non-persistent buffers and hooks, which the pickle route would not.
    cls = type(self)
    new = cls.__new__(cls)
    memo[id(self)] = new
    new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
    return new
