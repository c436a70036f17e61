"""The single-shot DDN generator: a coarse-to-fine stack of residual blocks with a DDL after each.

Paper §3.4 / our spec `DDN.md` §4. Starting from a fixed positional feature map at `start_size`, the
network walks the scales 2^s up to the output resolution. Each block refines the features; the DDL
after it emits K candidate images and keeps one; the chosen image (and the chosen head's leak map)
is added back into the features that go to the next block. With L layers the latent of an image is
its L codes (sum of log2 K bits).

`DDNRecurrent` is the paper's other paradigm, recurrence iteration (paper Fig. 1c): one network and
one DDL, their weights shared by all L layers, applied L times at the output resolution to the
previous choice, like the steps of a diffusion sampler.

Both networks are driven the same four ways (`forward`, shared through `_DDNBase`): train on
targets, sample from per-image seeds, decode given codes, encode/reconstruct an image; plus a scorer
for guided generation.
"""

import contextlib
import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from torch_utils import persistence
from training.conditions import condition_channels, condition_tensor, parse_condition
from training.determinism import batch_invariant     # Also importable from here, as before the move.
from training.ddl import Chooser, DiscreteDistributionLayer, Scorer, resize_area, uniform_to_codes
from training.latent import latent_bits
from training.low_precision import autocast_dtype_of, param_as
from training.split_prune import batched_statistics

# ----------------------------------------------------------------------------
# The architecture schedule of DDN.md §4, as plain functions of the scale s (size 2^s).

# Feature channels at scale s: 2^(13-s) clipped to [min_channels, max_channels].
def channels_at(s, max_channels=256, min_channels=4):
    return int(min(max(2 ** (13 - s), min_channels), max_channels))

# Number of candidates K at scale s: 4 x channels in [16, 1024], halved for RGB, capped.
def outputk_at(s, img_channels, max_outputk=64, max_channels=256, min_channels=4):
    k = min(max(4 * channels_at(s, max_channels, min_channels), 16), 1024)
    if img_channels == 3:
        k //= 2
    return max(2, min(k, max_outputk))

# Number of blocks (and DDLs) at scale s: 2^s, capped.
def blocks_at(s, max_blockn=32):
    return int(min(2 ** s, max_blockn))

# ----------------------------------------------------------------------------
# The fixed input of the network: a 2D sinusoidal embedding of the positions; at 1x1, where
# there is no position, a linear ramp over the channels.

def positional_feature(channels, size):
    if size == 1:
        return torch.linspace(-1, 1, channels).view(1, channels, 1, 1)
    pos = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(pos, pos, indexing='ij')
    n_freq = max(channels // 4, 1)
    freqs = (2.0 ** torch.arange(n_freq)) * (math.pi / 2)
    maps = []
    for coord in (yy, xx):
        arg = coord[None] * freqs[:, None, None]
        maps += [torch.sin(arg), torch.cos(arg)]
    feat = torch.cat(maps)[:channels]
    if feat.shape[0] < channels:  # Too few channels for 4 per frequency: pad with ramps.
        feat = torch.cat([feat, yy[None].expand(channels - feat.shape[0], -1, -1)])
    return feat[None]

# ----------------------------------------------------------------------------
# Residual block: GroupNorm -> SiLU -> (up 2x) -> conv3x3 -> GroupNorm -> SiLU -> dropout -> conv3x3,
# plus a skip, the sum scaled by sqrt(1/2) (EDM's UNet block without the noise embedding). The skip
# is a learned 1x1 conv when channels change and, with `resample_proj`, on every upsampling block
# (EDM's `resample_proj=True`, as in the reference DDN); identity otherwise. Initialisation as
# EDM: xavier_uniform weights, zero biases, and the second 3x3 conv scaled by 1e-5, so every
# residual branch starts near zero and a deep stack starts close to its skip path.

def _groups(channels):
    return max(1, min(32, channels // 4))

# GroupNorm in the dtype of its input. Under autocast a bf16 / fp16 input is normalised in that
# dtype (the kernels accumulate the statistics in fp32) and the output keeps it, with the affine
# parameters cast to it, as the reference DDN's fp16 GroupNorm does. CUDA autocast would run
# group_norm in fp32 instead (it is on its fp32 list): an fp32 copy of the input and an fp32 output
# for the next SiLU, both kept for backward, 2x the activation memory of the block and a cast each
# way (bench/step_cost.py counts them). Outside autocast, or on an fp32 input, this is nn.GroupNorm
# exactly (fp32 training is bit-identical).
#
# `norm_silu(x)` is silu(norm(x)); in that low-precision case it keeps only x for backward and
# recomputes the normalised value there (_GroupNormSiLU): autograd would otherwise also keep the
# GroupNorm output for SiLU's backward, a third of a block's saved activations.
class GroupNorm(nn.GroupNorm):
    def _low_precision(self, x):
        return x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type)

    def forward(self, x):
        if self._low_precision(x):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, param_as(self.weight, x.dtype), param_as(self.bias, x.dtype), self.eps)
        return super().forward(x)

    def norm_silu(self, x):
        # Compiled (--compile), inductor fuses the two and picks what to save itself; the Function
        # would break the graph there.
        if self._low_precision(x) and not torch.compiler.is_compiling():
            with torch.autocast(x.device.type, enabled=False):
                return _GroupNormSiLU.apply(x, param_as(self.weight, x.dtype), param_as(self.bias, x.dtype), self.num_groups, self.eps)
        return F.silu(self(x))

# silu(group_norm(x, weight, bias)) that saves x, weight and bias only; backward recomputes the
# normalised value (the same kernel, so the same bits), applies SiLU's backward to it (SiLU's
# gradient needs its input only, so SiLU itself is not recomputed) and differentiates GroupNorm.
# Gradients equal autograd's through F.silu(F.group_norm(...)) bit for bit.
class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        ctx.groups, ctx.eps = groups, eps
        ctx.save_for_backward(x, weight, bias)
        return F.silu(F.group_norm(x, groups, weight, bias, eps), inplace=True)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3], strict=True)]
        with torch.enable_grad():
            y = F.group_norm(inputs[0], ctx.groups, inputs[1], inputs[2], ctx.eps)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, torch.ops.aten.silu_backward(grad, y.detach())) if wanted else ())
        return tuple(next(grads) if t.requires_grad else None for t in inputs) + (None, None)

# EDM's `weight_init(mode='xavier_uniform')` for a conv, times `gain`; zero bias.
def _init_conv(conv, gain=1.0):
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    bound = math.sqrt(6 / (fan_in + fan_out)) * gain
    with torch.no_grad():
        conv.weight.uniform_(-bound, bound)
        conv.bias.zero_()
    return conv

class Block(nn.Module):
    def __init__(self,
        in_channels,                # Input feature channels.
        out_channels,               # Output feature channels.
        up              = False,    # Upsample 2x (first block of a new scale).
        dropout         = 0.0,      # Dropout probability before the second conv.
        resample_proj   = False,    # Learned 1x1 skip on an upsampling block even if channels do not change.
        eps             = 1e-6,     # GroupNorm epsilon (EDM's and the reference DDN's).
        edm_init        = True,     # EDM's initialisation; False keeps PyTorch's defaults.
    ):
        super().__init__()
        init = _init_conv if edm_init else (lambda conv, gain=1.0: conv)
        self.up = up
        self.norm0 = GroupNorm(_groups(in_channels), in_channels, eps=eps)
        self.conv0 = init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.norm1 = GroupNorm(_groups(out_channels), out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = init(nn.Conv2d(out_channels, out_channels, 3, padding=1), gain=1e-5)
        proj = in_channels != out_channels or (up and resample_proj)
        self.skip = init(nn.Conv2d(in_channels, out_channels, 1)) if proj else None

    # The 1x1 skip runs before the nearest upsampling (each output pixel is the same product as
    # after it): a quarter of the work, and it reads the input that GroupNorm keeps anyway.
    def forward(self, x):
        h = self.norm0.norm_silu(x)
        if self.skip is not None:
            x = _conv(self.skip, x)
        if self.up:
            h = F.interpolate(h, scale_factor=2, mode='nearest')
            x = F.interpolate(x, scale_factor=2, mode='nearest')
        h = _conv(self.conv0, h)
        h = _conv(self.conv1, self.dropout(self.norm1.norm_silu(h)))
        return (h + x) * math.sqrt(0.5)

# conv(x), its weight and bias read through `param_as` under autocast (the training step's
# low-precision copies, made once per step, see training/low_precision.py); else conv(x) exactly.
def _conv(conv, x):
    dtype = autocast_dtype_of(x)
    if dtype is None:
        return conv(x)
    return conv._conv_forward(x, param_as(conv.weight, dtype), param_as(conv.bias, dtype))

# The parameters a network reads through `param_as` under autocast (its blocks' convolutions and its
# GroupNorms), for the training step's once-per-step low-precision copies (training/low_precision.py).
def low_precision_params(module):
    params = {}
    for m in module.modules():
        if isinstance(m, Block):
            for conv in (m.conv0, m.conv1, m.skip):
                if conv is not None:
                    params.update((id(p), p) for p in conv.parameters())
        elif isinstance(m, GroupNorm):
            params.update((id(p), p) for p in m.parameters())
    return list(params.values())

# ----------------------------------------------------------------------------
# feat + pad(image) into the first C channels + pad(leak) into the last C (leak may be None), in the
# dtype of feat: each addition computed in the wider dtype and rounded once to feat's, the values of
# `(feat + F.pad(image, ...)).to(feat.dtype)` then the same with the leak, in one copy of feat instead
# of two padded copies and two full-size additions (and no cast of the small maps: in-place adds of
# mixed dtypes); backward passes feat's gradient through and slices the two small ones. `inplace`:
# add into feat itself (no copy), for a caller that knows nothing else reads or saved feat.

class _AddIntoChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, image, leak, inplace=False):
        C = image.shape[1]
        x = feat if inplace else feat.clone()
        if inplace:
            ctx.mark_dirty(x)
        x[:, :C].add_(image)
        if leak is not None:
            x[:, x.shape[1] - C:].add_(leak)
        ctx.C, ctx.dtypes = C, (image.dtype, None if leak is None else leak.dtype)
        return x

    @staticmethod
    def backward(ctx, grad):
        C, (image_dtype, leak_dtype) = ctx.C, ctx.dtypes
        g_image = grad[:, :C].to(image_dtype) if ctx.needs_input_grad[1] else None
        g_leak = grad[:, grad.shape[1] - C:].to(leak_dtype) if leak_dtype is not None and ctx.needs_input_grad[2] else None
        return grad if ctx.needs_input_grad[0] else None, g_image, g_leak, None

# ----------------------------------------------------------------------------
# Results of a generator call.

class DDNOutput(NamedTuple):
    images:         torch.Tensor                    # (B, C, H, W) output x_L in [-1, 1] (not clipped).
    codes:          torch.Tensor                    # (B, L') int64 latent, L' = layers run.
    losses:         Optional[torch.Tensor]          # (B, L') per-layer loss vs the target, or None.
    layer_images:   Optional[list]                  # The chosen image of every layer, if asked.

# ----------------------------------------------------------------------------
# How a forward is driven: where each layer's code comes from. Per layer l, in this order: codes
# (B, Lc) for l < Lc; else the nearest candidate to `target`; else `scorer` + `chooser`; else the
# seeds' `uniforms` (B, L). Immutable, built once per call by `_DDNBase.forward`.

class Drive(NamedTuple):
    target:     Optional[torch.Tensor] = None   # (B, C, H, W) images in [-1, 1].
    codes:      Optional[torch.Tensor] = None   # (B, Lc) int64 codes of the first Lc layers.
    scorer:     Optional[Scorer] = None         # Guidance distances for the remaining layers.
    chooser:    Optional[Chooser] = None        # Scorer distances -> codes (default: ddl.argmin).
    uniforms:   Optional[torch.Tensor] = None   # (B, L) float64 per-seed uniforms in [0, 1).

    # The same drive with the scorer and chooser told that they score layer l (shared DDLs).
    def at_layer(self, l):
        return self._replace(scorer=_at_layer(self.scorer, l), chooser=_at_layer(self.chooser, l))

# A scorer or chooser that sees LayerInfo.index = l.
def _at_layer(fn, l):
    if fn is None:
        return None
    return lambda first, info, *rest: fn(first, info._replace(index=l), *rest)

# ----------------------------------------------------------------------------
# What both generators share: the latent bookkeeping, the ways to drive a network (`Drive`), per-seed
# randomness and conditions.
#
# The contract of a subclass (checked when the class is defined, see `__init_subclass__`):
#   ks              property, K of every layer (its length is the latent length L);
#   layer_sizes     property, the spatial size of every layer's image;
#   _run(L, B, drive, condition, trace)
#                   the layer loop: for l < L, compute the DDL input features, call
#                   `self._layer(ddl, l, feat, prev, drive, targets)` and `trace.add(out)`;
#   _add_condition(x, l, condition)
#                   add the (checked) condition into the input x of layer l;
# and in __init__: `img_resolution`, `img_channels`, `_init_condition(...)`, and the buffer
# `init_feature` (its fixed input, which also tells the device).

_CONTRACT = ('ks', 'layer_sizes', '_run', '_add_condition')

class _DDNBase(nn.Module):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in _CONTRACT if getattr(cls, name, None) is getattr(_DDNBase, name, None)]
        if missing:
            raise TypeError(f'{cls.__name__} must define {", ".join(missing)} (see _DDNBase)')

    @property
    def ks(self):
        raise NotImplementedError

    @property
    def layer_sizes(self):
        raise NotImplementedError

    def _run(self, L, B, drive, condition, trace):
        raise NotImplementedError

    def _add_condition(self, x, l, condition):
        raise NotImplementedError

    def _init_condition(self, condition, label_dim, img_channels):
        self.condition = condition
        self.label_dim = 0
        if condition is not None:
            self.cond_channels = condition_channels(condition, img_channels)
            if parse_condition(condition).kind == 'class':
                if label_dim < 1:
                    raise ValueError('condition="class" needs label_dim >= 1 (a labelled dataset)')
                self.label_dim = label_dim

    # Latent length L, and the information content of a latent: sum of log2 K_l bits (a float;
    # training.latent.stored_bits is the whole bits it takes to store).
    @property
    def num_layers(self):
        return len(self.ks)

    @property
    def bits_per_image(self):
        return latent_bits(self.ks)

    # Per-seed uniform numbers (B, L) in [0, 1), one generator per seed: what seed 7 gets does
    # not depend on which other seeds share the batch. They become the codes of unguided layers
    # and the randomness of random choosers in guided layers.
    def seed_uniforms(self, seeds: Sequence[int], device=None):
        rows = [torch.rand(self.num_layers, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
                for seed in seeds]
        u = torch.stack(rows) if rows else torch.zeros(0, self.num_layers, dtype=torch.float64)
        return u.to(device if device is not None else self.init_feature.device)

    # Uniform random codes (B, L) of the given seeds.
    def sample_codes(self, seeds: Sequence[int], device=None):
        u = self.seed_uniforms(seeds, device)
        return torch.stack([uniform_to_codes(u[:, l], k) for l, k in enumerate(self.ks)], dim=1)

    # Add the chosen image into the first C feature channels and the leak map into the last C
    # (DDN.md §2.7: an addition, not a concatenation, so the block widths stay the paper's).
    # `inplace`: feat may be overwritten (see DDNGenerator._layers).
    def _next_input(self, feat, image, leak, inplace=False):
        return _AddIntoChannels.apply(feat, image, leak, inplace)

    # Run the network. The mode follows from the arguments (per layer, in this order, see `Drive`):
    #   codes (B, Lc)  -> the first Lc layers decode these codes;
    #   target         -> nearest candidate (training / reconstruction / encoding);
    #   scorer         -> guided selection (seed-aware argmin, or `chooser` fed with the seeds' uniforms);
    #   seeds          -> per-seed uniform random codes (sampling).
    # `num_layers` stops early (e.g. to look at the first levels of the latent tree). For per-seed
    # results that do not depend on the batch, call it inside `batch_invariant()`.
    def forward(self,
        target:         Optional[torch.Tensor] = None,  # (B, C, H, W) images in [-1, 1].
        codes:          Optional[torch.Tensor] = None,  # (B, Lc) codes of the first Lc layers.
        scorer:         Optional[Scorer] = None,        # Guidance scorer for the remaining layers.
        chooser:        Optional[Chooser] = None,       # Rule turning scorer distances into codes.
        seeds:          Optional[Sequence[int]] = None, # Per-image seeds (sampling, random choosers).
        num_layers:     Optional[int] = None,           # Run only the first layers.
        return_layers:  bool = False,                   # Also return every layer's chosen image.
        condition:      Optional[torch.Tensor] = None,  # Condition of a conditional net (make_condition()).
    ) -> DDNOutput:
        L = self.num_layers if num_layers is None else min(num_layers, self.num_layers)
        device = self.init_feature.device
        uniforms = self.seed_uniforms(seeds, device) if seeds is not None else None
        if codes is not None:
            codes = codes.to(device=device, dtype=torch.long)
            if codes.ndim != 2 or codes.shape[1] > self.num_layers:
                raise ValueError(f'codes must have shape (B, <= {self.num_layers}), got {tuple(codes.shape)}')
        condition = self._check_condition(condition)
        sizes = [t.shape[0] for t in (target, codes, uniforms, condition) if t is not None]
        if not sizes:
            raise ValueError(f'{type(self).__name__} needs a target, codes or seeds to know what to generate')
        if len(set(sizes)) != 1:
            raise ValueError(f'Batch sizes of target, codes and seeds differ: {sizes}')
        if codes is not None and codes.shape[1] < L and target is None and scorer is None and uniforms is None:
            raise ValueError(f'Got codes for {codes.shape[1]} of {L} layers and no rule (target, scorer or seeds) for the rest')
        if target is not None:
            target = target.to(device)
            if target.shape[1:] != (self.img_channels, self.img_resolution, self.img_resolution):
                raise ValueError(f'Target shape {tuple(target.shape[1:])} does not match the network '
                                 f'({self.img_channels}, {self.img_resolution}, {self.img_resolution})')
        drive = Drive(target, codes, scorer, chooser, uniforms)
        trace = _Trace(return_layers)
        self._run(L, sizes[0], drive, condition, trace)
        return trace.output()

    # Validate the condition argument against the network's condition type.
    def _check_condition(self, condition):
        if self.condition is None:
            if condition is not None:
                raise ValueError('This network is unconditional; it takes no condition')
            return None
        if condition is None:
            raise ValueError(f'This network is conditioned on {self.condition!r}; pass condition=make_condition(...)')
        condition = condition.to(self.init_feature.device).float()
        if self.label_dim:
            if condition.ndim != 2 or condition.shape[1] != self.label_dim:
                raise ValueError(f'Class condition must have shape (B, {self.label_dim}), got {tuple(condition.shape)}')
        elif condition.ndim != 4 or condition.shape[1] != self.cond_channels:
            raise ValueError(f'Condition {self.condition!r} must have shape (B, {self.cond_channels}, H, W), '
                             f'got {tuple(condition.shape)}')
        return condition

    # Add a (checked) condition into the block input x: a class through its embedding `embed`,
    # added to every channel; an image resized to x and added to the middle channels.
    # The single-shot net places the channels as the reference does (from C/2 - c/2); the recurrent
    # one keeps its original placement ((C - c) / 2), so its snapshots compute as before.
    def _inject_condition(self, x, condition, embed=None, reference_placement=True):
        if self.label_dim:
            return x + embed(condition).to(x.dtype)[:, :, None, None]
        cond = resize_area(condition, x.shape[-1]).to(x.dtype)
        lo = x.shape[1] // 2 - cond.shape[1] // 2 if reference_placement else (x.shape[1] - cond.shape[1]) // 2
        return x + F.pad(cond, (0, 0, 0, 0, lo, x.shape[1] - cond.shape[1] - lo))

    # Condition tensor for a batch of images in [-1, 1] (and one-hot labels), as in training.
    def make_condition(self, images=None, labels=None, generator=None):
        if self.condition is None:
            return None
        return condition_tensor(self.condition, images, labels, training=self.training, generator=generator)

    # One DDL call of layer l inside _run(): picks the layer's code source and target (`targets`
    # caches the area-resized target per size).
    def _layer(self, ddl, l, feat, prev, drive, targets, chain=None):
        size = feat.shape[-1]
        codes = drive.codes[:, l] if drive.codes is not None and l < drive.codes.shape[1] else None
        target = None
        if codes is None and drive.target is not None:
            if size not in targets:
                targets[size] = resize_area(drive.target.float(), size)
            target = targets[size]
        return ddl(feat, prev, target=target, codes=codes,
                   scorer=drive.scorer if target is None else None, chooser=drive.chooser,
                   uniform=drive.uniforms[:, l] if drive.uniforms is not None else None,
                   chain=chain[l] if chain is not None and target is not None else None)

    # Chain dropout of a training forward, drawn for all L layers at once: per layer (drop, codes), a
    # 0-d bool (True with probability ddl.chain_dropout: the whole batch takes random codes there) and
    # (B,) uniform random codes. A few operators per step instead of four per layer; None when no
    # layer drops.
    def _chain_dropout(self, ddls, B, device):
        ps = [ddl.chain_dropout for ddl in ddls]
        if not any(p > 0 for p in ps):
            return None
        threshold = ps[0] if len(set(ps)) == 1 else torch.tensor(ps, device=device)
        drop = torch.rand(len(ddls), device=device) < threshold
        layers_of_k = {}
        for l, ddl in enumerate(ddls):
            layers_of_k.setdefault(ddl.K, []).append(l)
        codes = [None] * len(ddls)
        for K, layers in layers_of_k.items():
            for l, c in zip(layers, torch.randint(0, K, [len(layers), B], device=device).unbind(0), strict=True):
                codes[l] = c
        return list(zip(drop.unbind(0), codes, strict=True))

    # Temporarily in evaluation mode (no chain dropout, no statistics, no dropout) and under
    # `batch_invariant()`: the context of every generation entry point of the network.
    @contextlib.contextmanager
    def evaluating(self):
        was_training = self.training
        self.eval()
        try:
            with batch_invariant():
                yield self
        finally:
            self.train(was_training)

    # Encode images to their latent (L2-guided selection): returns (codes, reconstruction).
    @torch.no_grad()
    def encode(self, images, condition=None):
        with self.evaluating():
            out = self(target=images, condition=condition)
        return out.codes, out.images

    # Decode latents (B, L) to images.
    @torch.no_grad()
    def decode(self, codes, condition=None):
        with self.evaluating():
            return self(codes=codes, condition=condition).images

# Collects the layers' DDL outputs inside _run() and stacks them into a DDNOutput.
class _Trace:
    def __init__(self, return_layers):
        self.return_layers = return_layers
        self.codes, self.losses, self.images = [], [], []

    def add(self, out):
        self.codes.append(out.codes)
        if out.loss is not None:
            self.losses.append(out.loss)
        self.images.append(out.image)

    def output(self):
        L = len(self.codes)
        return DDNOutput(
            images=self.images[-1],
            codes=torch.stack(self.codes, dim=1),
            losses=torch.stack(self.losses, dim=1) if len(self.losses) == L else None,
            layer_images=self.images if self.return_layers else None,
        )

# Check the arguments shared by both generators.
def _check_image_args(img_resolution, img_channels):
    s1 = math.log2(img_resolution)
    if img_resolution < 2 or s1 != int(s1):
        raise ValueError(f'img_resolution must be a power of two >= 2, got {img_resolution}')
    if img_channels not in (1, 3):
        raise ValueError(f'img_channels must be 1 or 3, got {img_channels}')

# ----------------------------------------------------------------------------
# The single-shot generator (the default paradigm).

@persistence.persistent_class
class DDNGenerator(_DDNBase):
    def __init__(self,
        img_resolution,                 # Output resolution, a power of two >= 2.
        img_channels,                   # 1 (grayscale) or 3 (RGB).
        start_size      = 1,            # Resolution of the first block (power of two).
        max_blockn      = 32,           # Cap on blocks (and DDLs) per scale.
        max_outputk     = 64,           # Cap on K per DDL.
        max_channels    = 256,          # Cap on feature channels (the paper's schedule tops at 256).
        min_channels    = 4,            # Floor on feature channels.
        dropout         = 0.0,          # Dropout in the blocks.
        chain_dropout   = 0.05,         # Chain dropout probability of every DDL.
        learn_residual  = True,         # DDLs predict corrections of the previous choice.
        leak            = True,         # Leak feature of the chosen head into the next block.
        loss_type       = 'l2',         # 'l2' or 'l1' loss and selection distance.
        condition       = None,         # None, 'class', 'color', 'edge' or 'resizeN' (conditional DDN).
        label_dim       = 0,            # Number of classes for condition='class'.
    ):
        super().__init__()
        _check_image_args(img_resolution, img_channels)
        s0, s1 = math.log2(start_size), int(math.log2(img_resolution))
        if start_size < 1 or s0 != int(s0) or start_size > img_resolution:
            raise ValueError(f'start_size must be a power of two <= img_resolution, got {start_size}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self._init_condition(condition, label_dim, img_channels)
        ch = lambda s: channels_at(s, max_channels, min_channels)

        s0 = int(s0)
        self.register_buffer('init_feature', positional_feature(ch(s0), start_size), persistent=False)
        blocks, ddls = [], []
        plan = [(s, i) for s in range(s0, s1 + 1) for i in range(blocks_at(s, max_blockn))]
        cin = ch(s0)
        for l, (s, i) in enumerate(plan):
            blocks.append(Block(cin, ch(s), up=(i == 0 and s > s0), dropout=dropout, resample_proj=True))
            K = outputk_at(s, img_channels, max_outputk, max_channels, min_channels)
            ddls.append(DiscreteDistributionLayer(ch(s), img_channels, K, learn_residual=learn_residual,
                leak=leak, chain_dropout=chain_dropout, loss_type=loss_type, index=l, num_layers=len(plan)))
            cin = ch(s)
        self.blocks = nn.ModuleList(blocks)
        self.ddls = nn.ModuleList(ddls)
        # Layers whose block input receives the condition: the first block whose input has a new
        # size (as the reference does), so the condition enters at every scale from start_size up to
        # the output resolution: 1, 2, 4, ..., 32 for a 32x32 net. (The up block of a scale still
        # sees the previous size, where the condition was already added.)
        in_sizes = [2 ** (s - 1) if (i == 0 and s > s0) else 2 ** s for s, i in plan]
        self.cond_layers = [l for l in range(len(plan)) if l == 0 or in_sizes[l] != in_sizes[l - 1]]
        if self.label_dim:
            # A learned class embedding per scale, added to every channel of that block input.
            self.class_embed = nn.ModuleList([nn.Linear(self.label_dim, self.blocks[l].norm0.num_channels)
                                              for l in self.cond_layers])

    @property
    def ks(self):
        return [ddl.K for ddl in self.ddls]

    # Input sizes of the blocks that receive the condition (for tests and summaries).
    @property
    def condition_sizes(self):
        sizes = [self.init_feature.shape[-1]] + self.layer_sizes[:-1]
        return [sizes[l] for l in self.cond_layers]

    # Snapshots written before the block layout followed the reference exactly (no 1x1 skip on
    # up blocks whose channels do not change) are refused with a clear message rather than
    # loaded with fresh random skip weights.
    def load_state_dict(self, state_dict, *args, **kwargs):
        missing = [f'blocks.{l}.skip.weight' for l, block in enumerate(self.blocks)
                   if block.skip is not None and f'blocks.{l}.skip.weight' not in state_dict]
        if missing and 'blocks.0.conv0.weight' in state_dict:
            raise ValueError(f'This DDNGenerator snapshot predates the reference block layout (learned 1x1 skip on '
                             f'every upsampling block; no {missing[0]} in the file). Snapshots of ddn made '
                             f'before that change cannot be loaded by this version: retrain, or use an older '
                             f'ddn checkout to generate from it.')
        return super().load_state_dict(state_dict, *args, **kwargs)

    @property
    def layer_sizes(self):
        sizes, size = [], self.init_feature.shape[-1]
        for block in self.blocks:
            size *= 2 if block.up else 1
            sizes.append(size)
        return sizes

    # Add the condition into the block input x of layer l (first block of each scale only).
    def _add_condition(self, x, l, condition):
        if condition is None or l not in self.cond_layers:
            return x
        embed = self.class_embed[self.cond_layers.index(l)] if self.label_dim else None
        return self._inject_condition(x, condition, embed)

    # The layer loop of forward(). Training selection records the node statistics of all layers
    # together when the loop ends (batched_statistics: the same statistics, fewer operators).
    def _run(self, L, B, drive, condition, trace):
        training = self.training and drive.target is not None
        with batched_statistics(self) if training else contextlib.nullcontext():
            self._layers(L, B, drive, condition, trace)

    def _layers(self, L, B, drive, condition, trace):
        x = self.init_feature.expand(B, -1, -1, -1)
        prev, targets = None, {}
        chain = self._chain_dropout(self.ddls[:L], B, x.device) if self.training and drive.target is not None else None
        for l in range(L):
            feat = self.blocks[l](self._add_condition(x, l, condition))
            out = self._layer(self.ddls[l], l, feat, prev, drive, targets, chain)
            if l + 1 < L:
                # A block output in a lower precision is read by nothing else (the DDL kept an fp32
                # copy of it for its head and selection): the next input is made in its place.
                inplace = feat.dtype != torch.float32 and feat._base is None and not torch.compiler.is_compiling()
                x = self._next_input(feat, out.image, out.leak, inplace)
            prev = out.image
            trace.add(out)

# ----------------------------------------------------------------------------
# The recurrence-iteration generator (paper Fig. 1c): one small UNet and one DDL, shared by all L
# layers. Layer l feeds the UNet the fixed positional features plus the previous choice (and the
# leak map of the chosen head), at the output resolution; the DDL emits K candidates of the next
# image. The latent is L codes of K each, as for the single-shot generator, but the parameter count
# does not grow with L. `iter_embed=True` adds a learned embedding of l to the UNet input (a
# diffusion model's time embedding); off by default, so every layer is literally the same function.

# Its blocks keep PyTorch's initialisation and GroupNorm eps 1e-5: the reference's EDM settings are
# those of the single-shot network; the recurrent paradigm has no reference code to match, and its
# snapshots and tuned tests predate them.
class UNet(nn.Module):
    def __init__(self,
        channels,               # Feature channels at every level.
        levels,                 # Number of 2x downsamplings.
        dropout     = 0.0,      # Dropout in the blocks.
    ):
        super().__init__()
        block = lambda up=False: Block(channels, channels, up=up, dropout=dropout, eps=1e-5, edm_init=False)
        self.down = nn.ModuleList([block() for _ in range(levels)])
        self.mid = block()
        self.up = nn.ModuleList([block(up=True) for _ in range(levels)])
        self.out = block()

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.avg_pool2d(x, 2)
        x = self.mid(x)
        for block in self.up:
            x = (block(x) + skips.pop()) * math.sqrt(0.5)
        return self.out(x)

@persistence.persistent_class
class DDNRecurrent(_DDNBase):
    def __init__(self,
        img_resolution,                 # Output resolution, a power of two >= 2.
        img_channels,                   # 1 (grayscale) or 3 (RGB).
        num_iters       = 32,           # Latent length L: how many times the shared layer runs.
        outputk         = 64,           # K of the shared DDL.
        channels        = 64,           # Feature channels of the UNet.
        levels          = 3,            # Downsamplings in the UNet (capped so the bottom is >= 1x1).
        dropout         = 0.0,          # Dropout in the blocks.
        chain_dropout   = 0.05,         # Chain dropout probability of the DDL (drawn at every layer).
        learn_residual  = True,         # The DDL predicts corrections of the previous choice.
        leak            = True,         # Leak feature of the chosen head into the next iteration.
        loss_type       = 'l2',         # 'l2' or 'l1' loss and selection distance.
        iter_embed      = False,        # Add a learned embedding of the layer index to the input.
        condition       = None,         # None, 'class', 'color', 'edge' or 'resizeN' (conditional DDN).
        label_dim       = 0,            # Number of classes for condition='class'.
    ):
        super().__init__()
        _check_image_args(img_resolution, img_channels)
        if num_iters < 1:
            raise ValueError(f'num_iters must be >= 1, got {num_iters}')
        if outputk < 2:
            raise ValueError(f'outputk must be >= 2, got {outputk}')
        if channels < 2 * img_channels or channels % 4:
            raise ValueError(f'channels must be a multiple of 4 and >= {2 * img_channels}, got {channels}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.L = num_iters
        self._init_condition(condition, label_dim, img_channels)
        levels = min(levels, int(math.log2(img_resolution)))
        self.register_buffer('init_feature', positional_feature(channels, img_resolution), persistent=False)
        self.unet = UNet(channels, levels, dropout=dropout)
        self.ddl = DiscreteDistributionLayer(channels, img_channels, outputk, learn_residual=learn_residual,
            leak=leak, chain_dropout=chain_dropout, loss_type=loss_type, index=0, num_layers=num_iters)
        self.iter_embed = nn.Parameter(torch.zeros(num_iters, channels)) if iter_embed else None
        if self.label_dim:
            self.class_embed = nn.Linear(self.label_dim, channels)

    @property
    def ks(self):
        return [self.ddl.K] * self.L

    @property
    def layer_sizes(self):
        return [self.img_resolution] * self.L

    # Every layer sees the condition (the same module runs at every layer).
    def _add_condition(self, x, l, condition):
        if condition is None:
            return x
        return self._inject_condition(x, condition, self.class_embed if self.label_dim else None, reference_placement=False)

    # The layer loop of forward(): the shared UNet + DDL, L times. Scorers and choosers are told
    # which layer they score (the shared DDL alone cannot know).
    def _run(self, L, B, drive, condition, trace):
        x0 = self.init_feature.expand(B, -1, -1, -1)
        prev, leak, targets = None, None, {}
        for l in range(L):
            x = x0 if prev is None else self._next_input(x0, prev, leak)
            if self.iter_embed is not None:
                x = x + self.iter_embed[l].to(x.dtype)[None, :, None, None]
            feat = self.unet(self._add_condition(x, l, condition))
            out = self._layer(self.ddl, l, feat, prev, drive.at_layer(l), targets)
            prev, leak = out.image, out.leak
            trace.add(out)

# ----------------------------------------------------------------------------
