"""The author's released networks run here with the author's outputs (training/author.py).

tests/data/author/*.npz hold outputs of the author's own code (github:DIYer22/discrete_distribution_networks
with sddn 0.0.2), recorded by tests/scripts/record_author.py for small networks of the three released
families (CIFAR-10, FFHQ-64 blockn/outputk, FFHQ-256 colour-conditional; RGB and grayscale data;
8x8 to 32x32; K 8 to 64) with seeded weights. Here, without the author's code, our own writer builds a
pickle of the author's layout (EDM persistence: `_reconstruct_persistent_obj(meta)` with placeholder
source text, `sddn` objects by name) holding the same weights; `load_author_pickle` must refuse to run
anything from it, infer the configuration and give the author's codes and images.
"""

import collections
import importlib.util
import json
import math
import os
import pickle
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from torch_utils import persistence, safe_pickle
from training import author, networks
from training.conditions import condition_tensor
from training.networks import DDNGenerator

DATA = os.path.join(os.path.dirname(__file__), 'data', 'author')
CONFIGS = sorted(name[:-4] for name in os.listdir(DATA) if name.endswith('.npz'))

# The seeded weights of the recording (the rule lives in the recording script; import it by path).
_spec = importlib.util.spec_from_file_location('record_author', os.path.join(os.path.dirname(__file__), 'scripts', 'record_author.py'))
record_author = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_author)

# Placeholder for the module source an author pickle embeds. Running it would fail the test.
PLACEHOLDER_SRC = "raise SystemExit('the embedded source of an author pickle was executed')\n"

# ----------------------------------------------------------------------------
# Our writer of the author's layout.

class _Persistent:
    """An EDM persistent object: pickles as _reconstruct_persistent_obj(dict(type, version, module_src, class_name, state))."""
    def __init__(self, class_name, **state):
        self.class_name = class_name
        self.state = state

    def __reduce__(self):
        meta = dict(type='class', version=4, module_src=PLACEHOLDER_SRC, class_name=self.class_name, state=self.state)
        return persistence._reconstruct_persistent_obj, (meta,)   # Same module and name as the author's hook.

def _module_state(params=None, buffers=None, modules=None, **attrs):
    return dict(training=False, _parameters=collections.OrderedDict(params or {}),
                _buffers=collections.OrderedDict(buffers or {}), _non_persistent_buffers_set=set(),
                _backward_hooks=collections.OrderedDict(), _forward_hooks=collections.OrderedDict(),
                _forward_pre_hooks=collections.OrderedDict(), _state_dict_hooks=collections.OrderedDict(),
                _load_state_dict_pre_hooks=collections.OrderedDict(), _modules=collections.OrderedDict(modules or {}),
                **attrs)

class AuthorLayoutWriter:
    """Builds the author's module tree for a configuration and pickles it like the author's training loop."""
    def __init__(self, classes):
        self.classes = classes      # (module, name) -> a class of that qualified name (sddn, training.networks).
        self.names = []             # Parameter names in order, as named_parameters() of the author's DDNPrecond.

    def obj(self, module, name, **state):
        o = self.classes[(module, name)].__new__(self.classes[(module, name)])
        o.__dict__.update(state)
        return o

    def param(self, prefix, name, shape):
        full = f'{prefix}.{name}'
        self.names.append((full, list(shape)))
        return torch.nn.Parameter(record_author.perturbed_value(full, tuple(shape)), requires_grad=False)

    def conv(self, prefix, cin, cout, kernel, up=False):
        f = torch.full((1, 1, 2, 2), 0.25) if up else None
        return _Persistent('Conv2d', **_module_state(
            params=dict(weight=self.param(prefix, 'weight', (cout, cin, kernel, kernel)), bias=self.param(prefix, 'bias', (cout,))),
            buffers=dict(resample_filter=f), in_channels=cin, out_channels=cout, up=up, down=False, fused_resample=False))

    def norm(self, prefix, c):
        return _Persistent('GroupNorm', **_module_state(
            params=dict(weight=self.param(prefix, 'weight', (c,)), bias=self.param(prefix, 'bias', (c,))),
            num_groups=min(32, c // 4), eps=1e-6))

    def ddb(self, prefix, cin, cout, up, K, size):
        sd = 'sddn.discrete_distribution'
        modules = collections.OrderedDict()
        modules['norm0'] = self.norm(f'{prefix}.block.norm0', cin)
        modules['conv0'] = self.conv(f'{prefix}.block.conv0', cin, cout, 3, up)
        modules['norm1'] = self.norm(f'{prefix}.block.norm1', cout)
        modules['conv1'] = self.conv(f'{prefix}.block.conv1', cout, cout, 3)
        modules['skip'] = self.conv(f'{prefix}.block.skip', cin, cout, 1, up) if up or cin != cout else None
        block = _Persistent('UNetBlockWoEmb', **_module_state(modules=modules, in_channels=cin, out_channels=cout,
                            num_heads=0, dropout=0, skip_scale=np.sqrt(0.5), adaptive_scale=False))
        head = self.obj(sd, 'Conv2dMixedPrecision', **_module_state(
            params=dict(weight=self.param(f'{prefix}.ddo.multi_out_conv1x1', 'weight', (K * 3, cout // 2, 1, 1)), bias=None),
            in_channels=cout // 2, out_channels=K * 3, padding_mode='zeros', groups=1))
        sdd = self.obj(sd, 'SplitableDiscreteDistribution', k=K, i_to_idx=np.arange(K), count=np.zeros(K),
                       near2=np.zeros((K, K)), loss_acc=np.zeros(K), idx_max=K - 1, iter=0, split_iters=[], batchn=0)
        ddo = self.obj(sd, 'DiscreteDistributionOutput', **_module_state(
            modules=dict(multi_out_conv1x1=head), buffers=dict(split_idxs=-torch.ones(2)),
            k=K, leak_choice=True, size=size, sdd=sdd, last_c=cout, predict_c=3, conv_inc=cout // 2,
            loss_func=None, distance_func=None, idx=0))
        return _Persistent('DiscreteDistributionBlock', **_module_state(
            modules=dict(block=block, ddo=ddo), in_c=cin, out_c=cout, predict_c=3, leak_choice=True,
            input_dict=False, output_size=size))

    def snapshot(self, cfg, extra_model_modules=(), **model_attrs):
        res, s1 = cfg['res'], int(math.log2(cfg['res']))
        ch = lambda s: min(max(4, 2 ** (13 - s)), cfg['max_channels'])
        modules, names, per_scale = collections.OrderedDict(), [], {}
        if cfg['condition']:
            modules['condition_process'] = self.obj('training.networks', 'ConditionProcess', **_module_state(
                input_at='stage_begin', condition_type=cfg['condition']))
        for s in range(s1 + 1):
            K = networks.outputk_at(s, 3, cfg['max_outputk'], cfg['max_channels'])
            for i in range(networks.blocks_at(s, cfg['max_blockn'])):
                up = i == 0 and s > 0
                name = f'block_{2 ** s}x{2 ** s}_{i}' + ('_up' if up else '')
                modules[name] = self.ddb(f'model.{name}', ch(s - 1) if up else ch(s), ch(s), up, K, 2 ** s)
                names.append(name)
                per_scale.setdefault(s, []).append(name)
        modules.update(extra_model_modules)
        model = _Persistent('PHDDNHandsDense', **_module_state(
            modules=modules, label_dim=0, condition_type=cfg['condition'], scalen=s1, module_names=names,
            scale_to_module_names=per_scale, scale_to_repeatn={}, scalis=range(0, s1 + 1), refiner_repeatn=0,
            **model_attrs))
        ema = _Persistent('DDNPrecond', **_module_state(
            modules=dict(model=model), img_resolution=res, img_channels=cfg['channels'], label_dim=0,
            use_fp16=False, sigma_min=0, sigma_max=float('inf'), sigma_data=0.5))
        manager = self.obj('sddn.discrete_distribution', 'DivergeShapingManager', fix_rand_gen=random.Random('diverge_shaping'))
        loss_fn = _Persistent('DDNLoss', P_mean=-1.2, P_std=1.2, sigma_data=0.5, diverge_shaping_manager=manager,
                              diverge_shaping=0)
        return dict(ema=ema, loss_fn=loss_fn, augment_pipe=None,
                    dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='datasets/x.zip',
                                        use_labels=False, xflip=False, cache=True, resolution=res, max_size=1000))

# Classes named like the author's (sddn.discrete_distribution.*, training.networks.ConditionProcess),
# reachable under those names while pickling only.
@pytest.fixture
def author_classes(monkeypatch):
    classes = {}
    sddn = types.ModuleType('sddn')
    sddn_dd = types.ModuleType('sddn.discrete_distribution')
    for name in ('DiscreteDistributionOutput', 'Conv2dMixedPrecision', 'SplitableDiscreteDistribution', 'DivergeShapingManager'):
        cls = type(name, (), {'__module__': 'sddn.discrete_distribution'})
        setattr(sddn_dd, name, cls)
        classes[('sddn.discrete_distribution', name)] = cls
    cls = type('ConditionProcess', (), {'__module__': 'training.networks'})
    monkeypatch.setattr(networks, 'ConditionProcess', cls, raising=False)
    classes[('training.networks', 'ConditionProcess')] = cls
    monkeypatch.setitem(sys.modules, 'sddn', sddn)
    monkeypatch.setitem(sys.modules, 'sddn.discrete_distribution', sddn_dd)
    return classes

def write_author_pickle(classes, cfg, **kwargs):
    writer = AuthorLayoutWriter(classes)
    raw = pickle.dumps(writer.snapshot(cfg, **kwargs), protocol=4)
    return raw, writer.names

def _recorded(name):
    with np.load(os.path.join(DATA, f'{name}.npz'), allow_pickle=False) as npz:
        r = {key: npz[key] for key in npz.files}
    r['config'] = json.loads(str(r['config']))
    return r

# ----------------------------------------------------------------------------
# Conversion against the author's recorded outputs.

@pytest.mark.parametrize('name', CONFIGS)
def test_author_network_matches_recorded_outputs(name, author_classes):
    r = _recorded(name)
    cfg = r['config']
    raw, params = write_author_pickle(author_classes, cfg)
    # The writer reproduces the author's file: the same globals and the same parameters.
    assert sorted(map(tuple, json.loads(str(r['globals'])))) == sorted(set(safe_pickle.globals_of(raw)))
    assert [n for n, _ in params] == r['param_names'].tolist()
    assert [s for _, s in params] == json.loads(str(r['param_shapes']))
    assert author.is_author_pickle(raw)

    net = author.load_author_pickle(raw, source=f'{name}.pkl')
    assert isinstance(net, DDNGenerator) and not net.training
    assert net.ks == r['ks'].tolist()
    assert net.img_resolution == cfg['res'] and net.img_channels == 3 and net.author_data_channels == cfg['channels']
    assert net.condition == cfg['condition']
    cond = condition_tensor('color', torch.from_numpy(r['cond_images'])) if net.condition else None

    # Seeded samples: the author's per-seed stream gives the author's codes and images.
    codes = author.author_seed_codes(net, r['sample_seeds'].tolist())
    assert np.array_equal(codes.numpy(), r['sample_codes'])
    np.testing.assert_allclose(net.decode(codes, condition=cond).numpy(), r['sample_images'], rtol=0, atol=1e-5)
    # Decoding given codes.
    out = net.decode(torch.from_numpy(r['decode_codes']), condition=cond)
    np.testing.assert_allclose(out.numpy(), r['decode_images'], rtol=0, atol=1e-5)
    # Reconstruction: the same nearest candidates, the same images (grayscale data repeated to RGB).
    x = torch.from_numpy(r['recon_inputs']).expand(-1, 3, -1, -1)
    rcond = condition_tensor('color', x) if net.condition else None
    rec_codes, rec = net.encode(x, condition=rcond)
    assert np.array_equal(rec_codes.numpy(), r['recon_codes'])
    np.testing.assert_allclose(rec.numpy(), r['recon_images'], rtol=0, atol=1e-5)

def test_author_config_inference(author_classes):
    r = _recorded('ffhq_blockn_outputk8')
    raw, _ = write_author_pickle(author_classes, r['config'])
    kwargs = author.author_network_kwargs(raw)
    assert kwargs['max_blockn'] == 8 and kwargs['max_outputk'] == 64 and kwargs['max_channels'] == 32
    assert kwargs['leak'] and kwargs['learn_residual'] and kwargs['condition'] is None
    assert author.author_network_kwargs(raw, learn_residual=False)['learn_residual'] is False

# ----------------------------------------------------------------------------
# Nothing from the file runs; what cannot be mapped is refused by name.

def test_author_pickle_runs_no_code(author_classes):
    raw, _ = write_author_pickle(author_classes, _recorded('gray8')['config'])
    author.load_author_pickle(raw)   # PLACEHOLDER_SRC would raise SystemExit if executed.
    assert 'boxx' not in sys.modules
    # A global outside the allowlist is refused before anything is called.
    class Evil:
        def __reduce__(self):
            return os.system, ('echo pwned',)
    bad = pickle.dumps(dict(ema=None, evil=Evil()))
    with pytest.raises(author.AuthorPickleError, match=r'refusing to load global (posix|os)\.system'):
        author.read_author_pickle(bad, source='evil.pkl')
    assert not author.is_author_pickle(bad)
    assert not author.is_author_pickle(b'not a pickle')

@pytest.mark.parametrize('change, part', [
    (dict(refiner_repeatn=3), 'refiner'),
    (dict(scale_to_repeatn={1: 2}), 'repeatn'),
    (dict(condition_type='edge'), 'condition'),
    (dict(scalis=range(1, 4)), 'start size'),
])
def test_author_pickle_refuses_unmappable_parts(author_classes, change, part):
    writer = AuthorLayoutWriter(author_classes)
    data = writer.snapshot(_recorded('gray8')['config'])
    data['ema'].state['_modules']['model'].state.update(change)
    with pytest.raises(author.AuthorPickleError, match=f'^author.pkl: cannot map .*{part}'):
        author.load_author_pickle(pickle.dumps(data), source='author.pkl')

def test_author_pickle_refuses_other_conv_variants(author_classes):
    writer = AuthorLayoutWriter(author_classes)
    data = writer.snapshot(_recorded('gray8')['config'])
    model = data['ema'].state['_modules']['model']
    model.state['_modules']['block_2x2_0_up'].state['_modules']['block'].state['_modules']['conv0'].state['fused_resample'] = True
    with pytest.raises(author.AuthorPickleError, match=r'block_2x2_0_up\.block\.conv0.*fused'):
        author.load_author_pickle(pickle.dumps(data))
    data = writer.snapshot(_recorded('gray8')['config'])
    data['ema'].state['_modules']['model'].state['_modules']['block_1x1_0'].state['_modules']['block'].state['num_heads'] = 1
    with pytest.raises(author.AuthorPickleError, match='attention'):
        author.load_author_pickle(pickle.dumps(data))

# ----------------------------------------------------------------------------
# Our own snapshot of an author network, and the command lines that take --network.

def test_convert_author_pickle_writes_our_snapshot(author_classes, tmp_path):
    r = _recorded('cifar_rgb16')
    raw, _ = write_author_pickle(author_classes, r['config'])
    src = tmp_path / 'author.pkl'
    src.write_bytes(raw)
    dst = tmp_path / 'converted.pkl'
    net = author.convert_author_pickle(src, dst)
    with open(dst, 'rb') as f:
        data = pickle.load(f)      # Ours: a persistence pickle by constructor arguments.
    assert not author.is_author_pickle(dst)
    again = data['ema'].eval()
    codes = torch.from_numpy(r['decode_codes'])
    assert torch.equal(again.decode(codes), net.decode(codes))
    np.testing.assert_allclose(again.decode(codes).numpy(), r['decode_images'], rtol=0, atol=1e-5)

def test_generate_decodes_author_codes(author_classes, tmp_path, subprocess_env):
    r = _recorded('cifar_rgb16')
    raw, _ = write_author_pickle(author_classes, r['config'])
    (tmp_path / 'author.pkl').write_bytes(raw)
    ks = r['ks']
    np.savez(tmp_path / 'latents.npz', seeds=np.arange(4), codes=r['decode_codes'].astype(np.int64), ks=ks.astype(np.int64))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(repo, 'generate.py'), f'--network={tmp_path / "author.pkl"}',
                           f'--codes={tmp_path / "latents.npz"}', f'--outdir={tmp_path / "out"}', '--device=cpu'],
                          env=dict(subprocess_env, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pngs = sorted(p for p in os.listdir(tmp_path / 'out') if p.endswith('.png'))
    assert len(pngs) >= 4
    import PIL.Image
    first = np.asarray(PIL.Image.open(tmp_path / 'out' / pngs[0]))
    expected = (r['decode_images'][0] * 127.5 + 128).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert first.shape == expected.shape and np.abs(first.astype(int) - expected).max() <= 1

def test_recorded_data_is_small():
    total = sum(os.path.getsize(os.path.join(DATA, n)) for n in os.listdir(DATA))
    assert total < 1 << 20, total

def test_network_loaders_of_every_command_take_author_pickles(author_classes, tmp_path):
    # generate.py, tree.py and compress.py use training.snapshot.load_network; zscg.py wraps it.
    import zscg
    from training import snapshot
    raw, _ = write_author_pickle(author_classes, _recorded('gray8')['config'])
    path = tmp_path / 'author.pkl'
    path.write_bytes(raw)
    _, net = snapshot.load_network(str(path), 'cpu')
    assert isinstance(net, DDNGenerator) and net.num_layers == 7
    assert isinstance(zscg.load_network(str(path), 'cpu'), DDNGenerator)
