"""Benchmark one training step of our Discrete Distribution Layer against the author's reference layer.

A step is what a training loop does for one DDL: zero the gradients, forward (all K candidates
scored, the nearest chosen, the loss of the chosen one), `loss.mean().backward()` (down to the input
features, through a tiny upstream op), `optimizer.step()` (Adam, lr 1e-3), then the Split-and-Prune
step (statistics update and split decision, weights and Adam state rows copied on a split).

- ours:   `training.ddl.DiscreteDistributionLayer` + `training.split_prune.split_and_prune()`;
- sddn:   `sddn.DiscreteDistributionOutput` (the paper author's PyPI package) + its `try_split()`.

Both get the same features, previous image and target, start from the same 1x1 weights, and run
the same configuration: image channels C=3, leak feature on, learning residual on (the previous image
at half resolution), chain dropout off (so the compared work is identical), L2 loss, targets at twice
the layer resolution area-resized by each layer. Steps of the two layers are timed in alternating
blocks so that machine noise hits both; the medians are compared.

Before timing, a check on each shape runs a few steps of both from identical weights and inputs and
prints whether they choose the same codes and end with the same weights and statistics.

The last line printed is `ddl_step_ratio_vs_sddn=<x>`: the geometric mean over shapes of
(our median step time / sddn's median step time); lower is better.

`sddn` is a benchmark-only dependency (not in requirements.txt): `pip install sddn` (pulls in `boxx`).

    python bench/ddl.py                          # default device (cuda if available), fp32
    python bench/ddl.py --device=cpu --threads=2 --steps=20
"""

import gc
import itertools
import math
import os
import statistics
import sys
import time
import warnings
from typing import NamedTuple

import click
import numpy as np
import torch

if __package__ in (None, ''):
    # Run as `python bench/ddl.py`: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli
from torch_utils import distributed as dist
from training.ddl import DiscreteDistributionLayer
from training.split_prune import split_and_prune

# ----------------------------------------------------------------------------
# Benchmark configuration.

class Shape(NamedTuple):
    B:  int     # Batch size.
    Cf: int     # Feature channels of the block output (half of them feed the candidates: leak on).
    H:  int     # Layer resolution H = W.
    K:  int     # Number of candidates.

    def __str__(self):
        return f'B={self.B} Cf={self.Cf} {self.H}x{self.H} K={self.K}'

SHAPES = [
    Shape(64, 256, 8, 64),
    Shape(64, 256, 32, 64),
    Shape(256, 64, 16, 512),
]
C = 3               # Image channels.
LR = 1e-3           # Adam learning rate.
WARMUP = 3          # Untimed steps of each layer before timing.
BLOCK = 5           # Timed steps of one layer before switching to the other.
CHECK_STEPS = 3     # Training steps compared in the agreement check.

SDDN_MISSING = ('bench/ddl.py compares against the reference layer of the `sddn` package, which is not installed.\n'
                'It is a benchmark-only dependency (not in requirements.txt); install it with:\n'
                '    pip install sddn        # also installs its dependency `boxx`')

# Import the reference package, or explain how to get it and exit 1.
def import_sddn():
    try:
        import sddn
    except ImportError as e:
        print(f'{SDDN_MISSING}\n(import failed: {e})', file=sys.stderr)
        sys.exit(1)
    return sddn

# ----------------------------------------------------------------------------
# Inputs shared by both layers: features (before the upstream op), previous image, target.

class Inputs(NamedTuple):
    feat:   torch.Tensor    # (B, Cf, H, W) block output before the upstream op.
    prev:   torch.Tensor    # (B, C, H/2, W/2) previous chosen image (learning residual).
    target: torch.Tensor    # (B, C, 2H, 2W) training image in [-1, 1].

def make_inputs(shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    B, Cf, H, _ = shape
    feat = torch.randn(B, Cf, H, H, generator=g)
    prev = torch.rand(B, C, H // 2, H // 2, generator=g) * 2 - 1
    target = torch.rand(B, C, 2 * H, 2 * H, generator=g) * 2 - 1
    return Inputs(feat.to(device), prev.to(device), target.to(device))

# ----------------------------------------------------------------------------
# One side of the comparison: a layer, a per-channel scale in front of it (the tiny upstream op
# that makes the backward compute the input gradient, as inside a network), Adam over both, and
# the training step. Subclasses say how to run the layer and its Split-and-Prune step.

class Side:
    name = ''

    def __init__(self, layer, inputs, bf16):
        self.layer = layer.train()
        self.inputs = inputs
        self.bf16 = bf16
        device = inputs.feat.device
        self.scale = torch.nn.Parameter(torch.ones(1, inputs.feat.shape[1], 1, 1, device=device))
        self.optimizer = torch.optim.Adam([*layer.parameters(), self.scale], lr=LR)
        self.times = []
        self.record = False             # Keep what the layer returned (for the agreement check)?
        self.last = None                # What the layer returned at the last recorded step.

    # One training step: the optimizer part, then Split-and-Prune.
    def step(self):
        self.train_step()
        self.split()

    def train_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.inputs.feat.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, returned = self.forward(self.inputs.feat * self.scale)
        loss.mean().backward()
        self.optimizer.step()
        self.last = returned if self.record else None

    def forward(self, feat):            # -> per-sample loss (B,), what the layer returned
        raise NotImplementedError

    def split(self):
        raise NotImplementedError

    def weight(self):                   # The 1x1 conv as a (K*C, Cin) matrix.
        raise NotImplementedError

class Ours(Side):
    name = 'ours'

    def __init__(self, shape, inputs, bf16):
        layer = DiscreteDistributionLayer(shape.Cf, C, shape.K, learn_residual=True, leak=True,
                                          chain_dropout=0.0, loss_type='l2')
        super().__init__(layer.to(inputs.feat.device), inputs, bf16)

    def forward(self, feat):
        out = self.layer(feat, self.inputs.prev, target=self.inputs.target)
        return out.loss, out

    def split(self):
        split_and_prune(self.layer, self.optimizer)

    def weight(self):
        return self.layer.weight

class Sddn(Side):
    name = 'sddn'

    def __init__(self, shape, inputs, bf16, sddn):
        cls = sddn.DiscreteDistributionOutput
        # Behaviour switches of the reference are class attributes: insist on the compared setting.
        expected = dict(learn_residual=True, resize_area=True, l1_loss=False, chain_dropout=0, adapt_conv=0)
        actual = {k: getattr(cls, k) for k in expected}
        if actual != expected:
            raise RuntimeError(f'sddn.DiscreteDistributionOutput class settings {actual} differ from the benchmarked {expected}')
        cls.inits.clear()               # Class-level registry of every layer built; one layer at a time here.
        # `size` makes it area-resize the target to its resolution; last_c = Cf with leak_choice: the
        # candidates read the first half of the features, like ours.
        layer = cls(k=shape.K, last_c=shape.Cf, predict_c=C, leak_choice=True, size=shape.H)
        super().__init__(layer.to(inputs.feat.device), inputs, bf16)

    def forward(self, feat):
        d = self.layer(dict(feat_last=feat, target=self.inputs.target, predict=self.inputs.prev))
        return d['loss'], d

    def split(self):
        self.layer.try_split(self.optimizer)

    def weight(self):
        w = self.layer.multi_out_conv1x1.weight
        return w.view(w.shape[0], w.shape[1])

# Build both sides on the same inputs, starting from the same 1x1 weights.
def make_pair(shape, device, bf16, sddn, seed=0):
    torch.manual_seed(seed)
    inputs = make_inputs(shape, device, seed)
    theirs = Sddn(shape, inputs, bf16, sddn)
    ours = Ours(shape, inputs, bf16)
    with torch.no_grad():
        ours.weight().copy_(theirs.weight())
    return ours, theirs

# ----------------------------------------------------------------------------
# Agreement check, in fp32. Step 1 starts from the same weights and inputs: both layers must
# choose the same codes and give the same distances, losses, images and leak maps. Steps 2.. then
# show whether the same optimizer and Split-and-Prune steps keep them identical (weights, counts,
# splits). It also checks that our statistics credit the codes actually chosen.

def check_agreement(shape, device, sddn):
    ours, theirs = make_pair(shape, device, False, sddn, seed=1)
    # sddn keeps the chosen indices to itself: record what its statistics object receives.
    received = []
    add_loss_matrix = theirs.layer.sdd.add_loss_matrix
    def recording_add_loss_matrix(loss_matrix):
        result = add_loss_matrix(loss_matrix)
        received.append((loss_matrix.detach().float().cpu(), torch.from_numpy(np.asarray(result['i_nears']))))
        return result
    theirs.layer.sdd.add_loss_matrix = recording_add_loss_matrix
    ours.record = theirs.record = True

    first = None
    agree = total = 0
    credits_codes = True
    tie_gaps = []
    stats, sdd = ours.layer.node_stats, theirs.layer.sdd
    for _ in range(CHECK_STEPS):
        ours.train_step()
        # Our statistics must count the chosen codes (the observation is still pending here).
        o = ours.last
        chosen = torch.bincount(o.codes, minlength=shape.K).to(stats.pending_count.dtype)
        credits_codes &= bool(torch.equal(stats.pending_count, chosen))
        ours.split()
        theirs.step()
        d = theirs.last
        their_dist, their_codes = received[-1]
        same = o.codes.cpu() == their_codes
        agree += int(same.sum())
        total += len(same)
        if not same.all():
            top2 = their_dist[~same].topk(2, dim=1, largest=False).values
            tie_gaps += (top2[:, 1] - top2[:, 0]).tolist()
        if first is None:
            first = dict(agree=int(same.sum()),
                         dist=float((o.dist.cpu() - their_dist).abs().max()),
                         loss=float((o.loss - d['loss']).detach().abs().max()),
                         image=float((o.image - d['predict']).detach().abs().max()),
                         leak=float((o.leak - d['feat_leak']).detach().abs().max()))
    weight_err = float((ours.weight() - theirs.weight()).detach().abs().max())
    count_err = float(np.abs(stats.count.cpu().numpy() - sdd.count).max())
    splits_ours, splits_sddn = int(stats.num_splits), len(sdd.split_iters)
    near2_ours = float(stats.near2.sum() / stats.seen)
    near2_sddn = float(sdd.near2.sum() / sdd.iter)

    problems = []
    if first['agree'] != shape.B or max(first['dist'], first['loss'], first['image'], first['leak']) > 1e-4:
        problems.append('step 1 differs')
    if agree != total or weight_err > 1e-4 or count_err > 1e-6 or splits_ours != splits_sddn:
        problems.append('diverged after Split-and-Prune')
    if not credits_codes:
        problems.append('our statistics credit other nodes than the chosen codes')
    if abs(near2_ours - 1) > 1e-6:
        problems.append('our near2 lost mass')
    line = (f'check {shape}: step 1 (same weights, same inputs): codes agree {first["agree"]}/{shape.B}, max |diff| '
            f'dist {first["dist"]:.1e}, loss {first["loss"]:.1e}, image {first["image"]:.1e}, leak {first["leak"]:.1e}; '
            f'after {CHECK_STEPS} steps with Split-and-Prune: codes agree {agree}/{total}, max |diff| weights {weight_err:.1e}, '
            f'counts {count_err:.1e}, splits {splits_ours}/{splits_sddn}, near2 mass/seen {near2_ours:.3f}/{near2_sddn:.3f} '
            f'(ours/sddn), our statistics credit the chosen codes: {"yes" if credits_codes else "NO"}')
    if tie_gaps:
        line += f', disagreeing samples\' top-2 gap in sddn distances <= {max(tie_gaps):.1e}'
    line += ' -> ' + ('OK' if not problems else 'MISMATCH: ' + '; '.join(problems))
    print(line, flush=True)

# ----------------------------------------------------------------------------
# Timing and memory.

def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def run_timed(side, n, device):
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        side.step()
        synchronize(device)
        side.times.append(time.perf_counter() - t0)

# Bytes allocated at the peak of one step above what was live when it started, or None.
# CUDA: the caching allocator's peak statistic. CPU has no allocator statistics; the profiler
# records every allocation and free, replayed here in time order.
def peak_step_memory(side, device):
    gc.collect()
    if device.type == 'cuda':
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        side.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            side.step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    except (AttributeError, RuntimeError):
        return None                     # Profiler internals changed: report as not measurable.
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))

def fmt_mib(nbytes):
    return 'n/a' if nbytes is None else f'{nbytes / 2**20:.1f}'

# ----------------------------------------------------------------------------

@click.command()
@cli.device_option()
@click.option('--steps',     help='Timed steps per layer and shape', metavar='INT', type=click.IntRange(min=1), default=20,
              show_default=True)
@click.option('--threads',   help='CPU threads for torch [default: number of cores]', metavar='INT', type=click.IntRange(min=1),
              default=None)
@click.option('--precision', help='fp32, or bf16 autocast (CUDA only)', type=click.Choice(['fp32', 'bf16']), default='fp32',
              show_default=True)
def main(device, steps, threads, precision):
    """Time one DDL training step, ours vs the reference package sddn; print the ratio of medians."""
    device = dist.pick_device(device)
    if precision == 'bf16' and device.type != 'cuda':
        raise click.BadParameter('bf16 autocast is only benchmarked on CUDA', param_hint='--precision')
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    sddn = import_sddn()
    # sddn divides by empty near2 rows on purpose (and repairs the NaNs); keep its warning off our output.
    warnings.filterwarnings('ignore', message='invalid value encountered in divide', category=RuntimeWarning, module=r'sddn\.')
    torch.set_num_threads(threads)
    bf16 = precision == 'bf16'
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    print(f'device {name}, threads {threads}, precision {precision}, torch {torch.__version__}, sddn {sddn.__version__}; '
          f'{WARMUP} warm-up + {steps} timed steps per layer and shape, alternating blocks of {min(BLOCK, steps)}', flush=True)

    # Both layers compute the same thing?
    for shape in SHAPES:
        check_agreement(shape, device, sddn)

    rows = []
    for shape in SHAPES:
        ours, theirs = make_pair(shape, device, bf16, sddn)
        for side in (ours, theirs):
            for _ in range(WARMUP):
                side.step()
        synchronize(device)
        for block in itertools.count():
            if len(ours.times) >= steps:
                break
            n = min(BLOCK, steps - len(ours.times))
            for side in ((ours, theirs) if block % 2 == 0 else (theirs, ours)):
                run_timed(side, n, device)
        t_ours, t_sddn = statistics.median(ours.times), statistics.median(theirs.times)
        mem_ours, mem_sddn = peak_step_memory(ours, device), peak_step_memory(theirs, device)
        rows.append((shape, t_ours, t_sddn, mem_ours, mem_sddn))
        print(f'  timed {shape}: ours {t_ours * 1e3:.1f} ms, sddn {t_sddn * 1e3:.1f} ms', flush=True)
        del ours, theirs
        gc.collect()

    print()
    print(f'{"shape":<26} {"ours ms":>9} {"sddn ms":>9} {"ratio":>7} {"ours peak MiB":>14} {"sddn peak MiB":>14}')
    for shape, t_ours, t_sddn, mem_ours, mem_sddn in rows:
        print(f'{str(shape):<26} {t_ours * 1e3:>9.2f} {t_sddn * 1e3:>9.2f} {t_ours / t_sddn:>7.3f} '
              f'{fmt_mib(mem_ours):>14} {fmt_mib(mem_sddn):>14}')
    print('(peak MiB: memory allocated at the peak of one step above what was live at its start)')
    ratio = math.exp(statistics.fmean(math.log(t_ours / t_sddn) for _, t_ours, t_sddn, _, _ in rows))
    print(f'ddl_step_ratio_vs_sddn={ratio:.4f}')

if __name__ == '__main__':
    main()
