"""The DDN author's released networks, read without running their code, as our DDNGenerator.

The author's checkpoints (github:DIYer22/discrete_distribution_networks, e.g. the CIFAR-10 file
`v15-00035-cifar10-32x32-...-shot-087808.pkl`) are EDM persistence pickles of
`dict(ema=DDNPrecond, loss_fn, augment_pipe, dataset_kwargs)`: every persistent object carries the
source code of its module as text, rebuilt by `torch_utils.persistence._reconstruct_persistent_obj`,
which executes that text, and the `sddn` package's layer objects are referenced by name. This module
reads such a file with the restricted unpickler of `torch_utils.safe_pickle`:

- `_reconstruct_persistent_obj` is a stand-in that keeps the class name and the object's state and
  never looks at the embedded source; the few `sddn` / author classes the file names (the DDL, its
  1x1 conv, its statistics, the condition module, the loss's helpers) are inert stand-ins that only
  receive their state. Every other global is refused, naming the file and the global. Neither
  `sddn`, `boxx` nor the author's repository is needed.
- The network's configuration is not in the pickle's arguments (the author keeps it in process
  globals), so it is inferred from module names and tensor shapes: resolution, channels, blocks per
  scale, K per layer, leak, condition. A part that has no exact equivalent here (the refiner,
  `--repeatn`, attention, other conv variants, a start size above 1, conditions other than colour)
  is refused with an error naming it.
- The weights go into a `DDNGenerator` built with those settings; it computes the author's forward
  (same codes, same images to float rounding; tests/test_author.py checks it against outputs
  recorded from the author's code).

What is not in the file: `learn_residual` (a class attribute in the author's code, `--learn-res`,
default on) — pass `learn_residual=False` for a network trained without it. The author's network
always predicts 3 channels, also on grayscale data: such a file gives an RGB `DDNGenerator`, and a
grayscale image to encode is repeated over the 3 channels (the author's loss broadcasts it the
same way). Split-and-Prune statistics are not carried over (they describe the author's run).

API: `is_author_pickle(file)`, `load_author_pickle(file, ...) -> DDNGenerator`,
`author_network_kwargs(file)` (the inferred constructor arguments), `convert_author_pickle(src, dst)`
(writes our own snapshot), `author_seed_codes(net, seeds)` (the author's generate.py random stream).
"""

import io
import math
import os
import re
from typing import Sequence

import torch

from torch_utils import checkpoint, safe_pickle
from training.networks import DDNGenerator, _groups, channels_at, outputk_at

# ----------------------------------------------------------------------------
# Stand-ins for the globals an author pickle names. None of them runs anything from the file.

class AuthorPersistent:
    """What `_reconstruct_persistent_obj(meta)` of the author's persistence returns here: the
    class name and the object's `__dict__` (for modules: `_parameters`, `_buffers`, `_modules`, ...)."""
    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state

    def __repr__(self):
        return f'AuthorPersistent({self.class_name})'

def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class' or 'class_name' not in meta:
        raise safe_pickle.UnsafePickleError('an EDM persistent object without the expected fields (type, class_name, state)')
    return AuthorPersistent(str(meta['class_name']), dict(meta.get('state') or {}))

class AuthorObject:
    """An ordinary (non-persistent) object of the author's code or of `sddn`: keeps its state only."""
    author_class = '?'

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {'_state': state}

    def __repr__(self):
        return f'AuthorObject({self.author_class})'

def _stand_in(name):
    return type(name, (AuthorObject,), {'author_class': name})

# sddn classes and the author's module-level (non-persistent) classes that a snapshot may hold.
_SDDN_CLASSES = ['DiscreteDistributionOutput', 'Conv2dMixedPrecision', 'SplitableDiscreteDistribution',
                 'DivergeShapingManager']
_AUTHOR_CLASSES = ['ConditionProcess']
_STAND_INS = {name: _stand_in(name) for name in _SDDN_CLASSES + _AUTHOR_CLASSES + ['Random']}

def _allowed():
    table = {('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
             ('random', 'Random'): _STAND_INS['Random']}     # DivergeShapingManager's RNG (of the loss).
    for module in ('sddn', 'sddn.discrete_distribution'):
        for name in _SDDN_CLASSES:
            table[(module, name)] = _STAND_INS[name]
    return table

# The author's network module is `training.networks`, or `_imported_module_<uuid>` when the
# network itself came out of a pickle (EDM persistence names its rebuilt modules that way).
def _resolve(module, name):
    if name in _AUTHOR_CLASSES and (module == 'training.networks' or module.startswith('_imported_module_')):
        return _STAND_INS[name]
    return None

class AuthorPickleError(ValueError):
    """An author snapshot that cannot be mapped to a DDNGenerator; the message names the part."""

# ----------------------------------------------------------------------------
# Reading the file.

def _read_bytes(file):
    if isinstance(file, (bytes, bytearray, memoryview)):
        return bytes(file), '<bytes>'
    if isinstance(file, (str, os.PathLike)):
        with open(file, 'rb') as f:
            return f.read(), os.fspath(file)
    return file.read(), getattr(file, 'name', '<pickle>')

def is_author_pickle(file) -> bool:
    """True if `file` (path, bytes or binary file) is an EDM persistence pickle of the author's DDN:
    it names `torch_utils.persistence._reconstruct_persistent_obj` and a class of `sddn`. Found by a
    dry run that calls nothing (`safe_pickle.globals_of`); not a pickle at all gives False."""
    data, _ = _read_bytes(file)
    try:
        found = safe_pickle.globals_of(data)
    except Exception:  # Not a pickle, or truncated: not an author pickle either.
        return False
    return (('torch_utils.persistence', '_reconstruct_persistent_obj') in found
            and any(module == 'sddn' or module.startswith('sddn.') for module, _ in found))

def read_author_pickle(file, source=None):
    """The unpickled file with stand-ins: a dict whose 'ema' is an `AuthorPersistent('DDNPrecond')`."""
    data, name = _read_bytes(file)
    source = source or name
    try:
        obj = safe_pickle.load(io.BytesIO(data), allowed=_allowed(), resolve=_resolve, source=source)
    except safe_pickle.UnsafePickleError as err:
        raise AuthorPickleError(f'{err}. ddn reads the author\'s DDN snapshots without running their code and '
                                'maps only the classes of the released networks; this file uses another one') from None
    if not isinstance(obj, dict) or not isinstance(obj.get('ema'), AuthorPersistent):
        raise AuthorPickleError(f'{source}: not an author DDN snapshot (expected a dict whose "ema" is a DDNPrecond)')
    return obj

# ----------------------------------------------------------------------------
# Walking the author's module tree.

def _modules(obj):
    return obj.state.get('_modules') or {}

def _param(obj, name, part):
    value = (obj.state.get('_parameters') or {}).get(name)
    if value is None:
        raise AuthorPickleError(f'{part}: no parameter {name!r}')
    return value.detach().float()

def _expect(ok, part, what):
    if not ok:
        raise AuthorPickleError(f'cannot map {part}: {what}')

def _child(obj, name, part, class_name=None):
    child = _modules(obj).get(name)
    _expect(child is not None, part, f'no submodule {name!r}')
    if class_name is not None:
        got = getattr(child, 'class_name', None) or getattr(child, 'author_class', '?')
        _expect(got == class_name, f'{part}.{name}', f'a {got}, expected {class_name}')
    return child

# A GroupNorm of the author's block -> (weight, bias), checked against ours.
def _group_norm(obj, part, channels):
    _expect(obj.state.get('num_groups') == _groups(channels), part, f'{obj.state.get("num_groups")} groups, '
            f'expected {_groups(channels)}')
    _expect(math.isclose(float(obj.state.get('eps', 0)), 1e-6), part, f'eps {obj.state.get("eps")} (this network uses 1e-6)')
    return {'weight': _param(obj, 'weight', part), 'bias': _param(obj, 'bias', part)}

# An EDM Conv2d of the author's block -> (weight, bias), checked to be a plain conv (+ nearest up).
def _conv(obj, part, kernel, up=False):
    st = obj.state
    _expect(not st.get('down') and not st.get('fused_resample'), part, 'a downsampling or fused-resampling conv')
    _expect(bool(st.get('up')) == up, part, f'up={st.get("up")}, expected {up}')
    if up:
        f = (st.get('_buffers') or {}).get('resample_filter')
        _expect(f is not None and tuple(f.shape) == (1, 1, 2, 2) and torch.allclose(f.float(), torch.full((1, 1, 2, 2), 0.25)),
                part, 'a resample filter other than [1, 1] (nearest upsampling)')
    w = _param(obj, 'weight', part)
    _expect(w.ndim == 4 and w.shape[-1] == w.shape[-2] == kernel, part, f'kernel {tuple(w.shape[2:])}, expected {kernel}x{kernel}')
    return {'weight': w, 'bias': _param(obj, 'bias', part)}

_BLOCK_NAME = re.compile(r'block_(\d+)x(\d+)_(\d+)(_up)?$')

def _parse_network(data, source):
    ema = data['ema']
    _expect(ema.class_name == 'DDNPrecond', 'ema', f'a {ema.class_name}, expected DDNPrecond')
    model = _child(ema, 'model', 'ema')
    _expect(model.class_name == 'PHDDNHandsDense', 'ema.model', f'a {model.class_name}; only PHDDNHandsDense '
            '(the released single-shot network) is mapped')
    st = model.state
    _expect(not st.get('refiner_repeatn') and 'refiner' not in _modules(model), 'ema.model.refiner',
            'the refiner (the author\'s refinern option) has no equivalent here')
    repeats = {int(k): int(v) for k, v in (st.get('scale_to_repeatn') or {}).items()}
    _expect(all(v == 1 for v in repeats.values()), 'ema.model.scale_to_repeatn', f'repeated blocks (the author\'s repeatn) {repeats}')
    names = list(st.get('module_names') or [])
    _expect(names, 'ema.model', 'no module_names')
    resolution = int(ema.state.get('img_resolution'))
    scalis = st.get('scalis')
    s0 = scalis[0] if isinstance(scalis, range) and len(scalis) else 0
    _expect(s0 == 0, 'ema.model.scalis', f'start size {2 ** s0} (the author\'s init feature above 1x1 differs from ours)')

    layers = []
    for l, name in enumerate(names):
        m = _BLOCK_NAME.fullmatch(name)
        part = f'ema.model.{name}'
        _expect(m is not None and m.group(1) == m.group(2), part, 'an unknown module name')
        size, up = int(m.group(1)), m.group(4) is not None
        ddb = _child(model, name, 'ema.model', 'DiscreteDistributionBlock')
        _expect(not ddb.state.get('input_dict') and 'choice_conv1x1' not in _modules(ddb), part,
                'a DiscreteDistributionBlock without short_plus (1x1 choice convs)')
        block = _child(ddb, 'block', part, 'UNetBlockWoEmb')
        bs = block.state
        _expect(not bs.get('num_heads'), f'{part}.block', 'attention')
        _expect(math.isclose(float(bs.get('skip_scale', 1)), math.sqrt(0.5), rel_tol=1e-6), f'{part}.block',
                f'skip_scale {bs.get("skip_scale")}')
        cin, cout = int(bs['in_channels']), int(bs['out_channels'])
        w = {}
        for key, value in _group_norm(_child(block, 'norm0', f'{part}.block', 'GroupNorm'), f'{part}.block.norm0', cin).items():
            w[f'norm0.{key}'] = value
        for key, value in _conv(_child(block, 'conv0', f'{part}.block', 'Conv2d'), f'{part}.block.conv0', 3, up).items():
            w[f'conv0.{key}'] = value
        for key, value in _group_norm(_child(block, 'norm1', f'{part}.block', 'GroupNorm'), f'{part}.block.norm1', cout).items():
            w[f'norm1.{key}'] = value
        for key, value in _conv(_child(block, 'conv1', f'{part}.block', 'Conv2d'), f'{part}.block.conv1', 3).items():
            w[f'conv1.{key}'] = value
        skip = _modules(block).get('skip')
        if up or cin != cout:
            _expect(skip is not None and (skip.state.get('_parameters') or {}).get('weight') is not None,
                    f'{part}.block.skip', 'an upsampling block without a learned 1x1 skip (resample_proj=False)')
            for key, value in _conv(skip, f'{part}.block.skip', 1, up).items():
                w[f'skip.{key}'] = value
        else:
            _expect(skip is None, f'{part}.block.skip', 'a skip conv where channels do not change')

        ddo = _child(ddb, 'ddo', part, 'DiscreteDistributionOutput')
        ds = ddo.state
        _expect(ds.get('loss_func') is None and ds.get('distance_func') is None, f'{part}.ddo', 'a custom loss or distance')
        _expect(int(ds.get('size') or 0) == size, f'{part}.ddo', f'size {ds.get("size")}, expected {size}')
        conv = _child(ddo, 'multi_out_conv1x1', f'{part}.ddo', 'Conv2dMixedPrecision')
        K, C = int(ds['k']), int(ds['predict_c'])
        head = _param(conv, 'weight', f'{part}.ddo.multi_out_conv1x1')
        _expect((conv.state.get('_parameters') or {}).get('bias') is None, f'{part}.ddo.multi_out_conv1x1', 'a bias')
        leak = bool(ds.get('leak_choice'))
        _expect(tuple(head.shape) == (K * C, cout // 2 if leak else cout, 1, 1), f'{part}.ddo.multi_out_conv1x1',
                f'weight shape {tuple(head.shape)} for K={K}, C={C}, {cout} channels, leak={leak}')
        w['head'] = head.reshape(K * C, -1)
        layers.append(dict(name=name, size=size, up=up, cin=cin, cout=cout, K=K, C=C, leak=leak,
                           dropout=float(bs.get('dropout') or 0), weights=w))

    condition = None
    cp = _modules(model).get('condition_process')
    ctype = st.get('condition_type')
    if cp is not None or ctype:
        ctype = ctype or (cp.state.get('condition_type') if cp is not None else None)
        _expect(ctype == 'color', 'ema.model.condition_process', f'condition {ctype!r}: only the colour condition '
                '(the released FFHQ-256 network) is mapped; class, edge and resizeN are computed differently here')
        _expect(cp is None or cp.state.get('input_at', 'stage_begin') == 'stage_begin', 'ema.model.condition_process',
                f'input_at={cp.state.get("input_at")!r}')
        condition = 'color'
    return dict(resolution=resolution, data_channels=int(ema.state.get('img_channels', 3)),
                label_dim=int(ema.state.get('label_dim') or 0), layers=layers, condition=condition, source=source)

# The DDNGenerator arguments that give the parsed layout, or an error naming what differs.
def _network_kwargs(net, learn_residual):
    layers, res = net['layers'], net['resolution']
    s1 = int(math.log2(res))
    _expect(2 ** s1 == res, 'ema', f'resolution {res}')
    C = {layer['C'] for layer in layers}
    leak = {layer['leak'] for layer in layers}
    _expect(len(C) == 1 and C <= {1, 3}, 'ema.model', f'image channels {sorted(C)} per layer')
    _expect(len(leak) == 1, 'ema.model', 'leak on some layers only')
    C, leak = C.pop(), leak.pop()
    per_scale = {}
    for layer in layers:
        per_scale.setdefault(int(math.log2(layer['size'])), []).append(layer)
    _expect(sorted(per_scale) == list(range(s1 + 1)), 'ema.model', f'scales {sorted(per_scale)}, expected 0..{s1}')
    channels = [per_scale[s][0]['cout'] for s in range(s1 + 1)]
    blocks = [len(per_scale[s]) for s in range(s1 + 1)]
    ks = [per_scale[s][0]['K'] for s in range(s1 + 1)]
    _expect(all(layer['K'] == ks[s] and layer['cout'] == channels[s] for s in per_scale for layer in per_scale[s]),
            'ema.model', 'K or channels vary within a scale')
    max_channels = max(channels)
    _expect(channels == [channels_at(s, max_channels, 4) for s in range(s1 + 1)], 'ema.model',
            f'channels per scale {channels} (not the schedule clip(2^(13-s), 4, {max_channels}))')
    max_blockn = max(blocks)
    _expect(blocks == [min(2 ** s, max_blockn) for s in range(s1 + 1)], 'ema.model',
            f'blocks per scale {blocks} (not min(2^s, max_blockn); the author\'s blockn_times?)')
    max_outputk = max(ks)
    _expect(ks == [outputk_at(s, C, max_outputk, max_channels, 4) for s in range(s1 + 1)], 'ema.model',
            f'K per scale {ks} (not the schedule of K with max_outputk={max_outputk})')
    dropout = {layer['dropout'] for layer in layers}
    return dict(img_resolution=res, img_channels=C, start_size=1, max_blockn=max_blockn, max_outputk=max_outputk,
                max_channels=max_channels, min_channels=4, dropout=dropout.pop() if len(dropout) == 1 else 0.0,
                chain_dropout=0.05, learn_residual=learn_residual, leak=leak, loss_type='l2',
                condition=net['condition'], label_dim=0)

# The parsed network of an author snapshot (path, bytes or binary file); errors name the file.
def _parsed(file, source=None):
    data, name = _read_bytes(file)
    source = source or name
    snapshot = read_author_pickle(data, source)
    try:
        return _parse_network(snapshot, source)
    except AuthorPickleError as err:
        raise AuthorPickleError(f'{source}: {err}') from None

def author_network_kwargs(file, learn_residual=True, source=None):
    """The `DDNGenerator` constructor arguments inferred from an author snapshot (see the module docstring)."""
    return _network_kwargs(_parsed(file, source), learn_residual)

def load_author_pickle(file, learn_residual=True, source=None) -> DDNGenerator:
    """An author snapshot (path, bytes or binary file) as a `DDNGenerator` in eval mode, on the CPU,
    computing the author's forward. Raises `AuthorPickleError` naming any part it cannot map.
    `learn_residual` is not recorded in the file (the author's --learn-res, default True)."""
    return _build(_parsed(file, source), learn_residual)

def _build(parsed, learn_residual):
    net = DDNGenerator(**_network_kwargs(parsed, learn_residual))
    _expect(net.num_layers == len(parsed['layers']), 'ema.model', f'{len(parsed["layers"])} layers, rebuilt {net.num_layers}')
    state = {}
    for l, layer in enumerate(parsed['layers']):
        ours = net.blocks[l]
        _expect(ours.up == layer['up'] and ours.conv0.in_channels == layer['cin'], f'ema.model.{layer["name"]}',
                'the block order differs from the schedule')
        for key, value in layer['weights'].items():
            state[f'ddls.{l}.weight' if key == 'head' else f'blocks.{l}.{key}'] = value
    missing = {name for name, _ in net.named_parameters()} - set(state)
    _expect(not missing, 'ema.model', f'no weights for {sorted(missing)[:3]}')
    full = net.state_dict()  # Buffers (the fresh Split-and-Prune statistics) stay as built.
    for key, value in state.items():
        _expect(tuple(full[key].shape) == tuple(value.shape), 'ema.model', f'{key} has shape {tuple(value.shape)}')
        full[key] = value
    net.load_state_dict(full)
    net.author_data_channels = parsed['data_channels']  # 1 for a network trained on grayscale data.
    return net.eval().requires_grad_(False)

# ----------------------------------------------------------------------------
# Our snapshot of an author network, and the author's per-seed codes.

def convert_author_pickle(src, dst, learn_residual=True):
    """Write the author snapshot `src` as our own snapshot `dst` (a persistence pickle of
    `dict(ema=DDNGenerator, loss_fn, dataset_kwargs, network_kwargs)`, written to a temporary name and
    renamed), loadable with `pickle.load(f)['ema']` like any snapshot of ours. Returns the network."""
    from training.loss import DDNLoss
    net = load_author_pickle(src, learn_residual=learn_residual)
    data = read_author_pickle(src)
    dataset_kwargs = data.get('dataset_kwargs') if isinstance(data.get('dataset_kwargs'), dict) else {}
    snapshot = dict(ema=net, loss_fn=DDNLoss(), dataset_kwargs={k: v for k, v in dataset_kwargs.items()
                                                               if isinstance(v, (str, int, float, bool, type(None)))},
                    network_kwargs=dict(class_name='training.networks.DDNGenerator', **net.init_kwargs))
    checkpoint.save_atomic(snapshot, os.fspath(dst), mode='pickle')
    return net

def author_seed_codes(net, seeds: Sequence[int], device=None):
    """The codes the author's generate.py draws for `seeds`: torch.rand(2000) from a generator seeded
    with the seed, layer l taking floor(K_l * u_l) in float32. Decoding them gives the author's image
    of that seed (ours draws its own stream, `net.sample_codes`)."""
    L = net.num_layers
    if L > 2000:
        raise ValueError(f'the author\'s stream has 2000 numbers per seed; this network has {L} layers')
    rows = [torch.rand(2000, generator=torch.Generator().manual_seed(int(seed)))[:L] for seed in seeds]
    u = torch.stack(rows) if rows else torch.zeros(0, L)
    ks = torch.tensor(net.ks, dtype=torch.float32)
    codes = (ks[None] * u).long().clamp(min=0)
    codes = torch.minimum(codes, torch.tensor(net.ks)[None] - 1)
    return codes.to(device if device is not None else net.init_feature.device)
