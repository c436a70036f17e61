"""Benchmark: node usage on data and sample vs reconstruction quality of the README's first recipe.

Trains our DDN on the fixed training split of the built-in digits (bench/quality.py's: the first
1500 train, the last 297 held out) for a number of images (not a time budget, so that runs compare
step for step), with the README's first-command recipe by default, and measures at the end, for
the EMA network (the snapshot) and for the training network:
- **usage on data**: per layer, how many of the K nodes the 1500 training images select when
  encoded, and the entropy of those selections (training/code_usage.py);
- **sample FD**: the Frechet distance of 1000 uniform samples to the held-out digits, in the digit
  classifier's features (bench/quality.py);
- **recon FD**: the same distance for the reconstructions of the 297 held-out digits, and the
  ratio sample FD / recon FD (the learned-prior issue's goal: within 1.5). The reconstructions are
  near copies of the very images the FD compares with, so recon FD is far below what even real
  digits score: 1000 *training* digits against the held-out ones score about 53 (printed first, "the
  floor"), 39x the recon FD of this recipe. In these features the ratio cannot approach 1.5; sample
  FD / floor is the fairer figure.
- **freq FD**: samples whose codes are drawn, per layer, from the node frequencies of the encoded
  training images (no model): what uniform sampling loses to unused nodes.

    python bench/node_usage.py                          # the README recipe, seed 0
    python bench/node_usage.py --chain-dropout=0.05 --seed=1 --json=out.json

Prints a table per network and as its last lines `sample_fd=`, `recon_fd=`, `fd_ratio=` and
`layer0_used=` of the EMA network.
"""

import copy
import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import quality
from torch_utils import checkpoint, misc
from training.code_usage import code_usage, usage_line
from training.loss import DDNLoss
from training.networks import DDNGenerator
from training.training_step import TrainingStep, ema_beta, learning_rate

# Train on uint8 `train` images for `kimg` thousand images with train.py's recipe; returns
# (training net, EMA net or None). Node statistics are copied into the EMA as the loop does.
def train(images, kimg, recipe, seed):
    torch.manual_seed(seed)
    net = DDNGenerator(img_resolution=images.shape[-1], img_channels=images.shape[1], max_blockn=recipe['max_blockn'],
        max_outputk=recipe['max_outputk'], max_channels=recipe['max_channels'],
        chain_dropout=recipe['chain_dropout']).train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe['lr'], betas=(0.9, 0.999), eps=1e-8)
    ema_kimg = recipe['ema'] * 1000
    ema = copy.deepcopy(net).eval().requires_grad_(False) if ema_kimg > 0 else net
    batch = recipe['batch']
    step_fn = TrainingStep(net, ema, DDNLoss(report_layers=False), optimizer, batch, 'fp32', dict(method=recipe['balance'], halflife=recipe['balance_halflife']))
    data = images.float() / 127.5 - 1
    order = torch.Generator().manual_seed(seed)
    perm, pos, cur_nimg, step = torch.randperm(data.shape[0], generator=order), 0, 0, 0
    while cur_nimg < kimg * 1000:
        misc.set_seed_for_step(seed, 0, step)
        if pos + batch > perm.numel():
            perm, pos = torch.randperm(data.shape[0], generator=order), 0
        step_fn.accumulate(data[perm[pos:pos + batch]])
        pos += batch
        step_fn.update(learning_rate(recipe['lr'], cur_nimg, recipe['lr_rampup']), ema_beta(cur_nimg, batch, ema_kimg, 0.05))
        cur_nimg += batch
        step += 1
    if ema is net:
        return net.eval(), None
    with torch.no_grad():
        for b_ema, b_net in zip(ema.buffers(), net.buffers(), strict=True):
            b_ema.copy_(b_net)
    return net.eval(), ema.eval()

# Samples whose code of layer l is drawn from the frequencies of `codes` (N, L) at that layer.
@torch.no_grad()
def frequency_samples(net, codes, num, seed):
    g = torch.Generator().manual_seed(seed)
    cols = []
    for l, K in enumerate(net.ks):
        freq = torch.bincount(codes[:, l], minlength=K).double()
        cols.append(torch.multinomial(freq, num, replacement=True, generator=g))
    return net.decode(torch.stack(cols, dim=1))

# All figures of one network.
@torch.no_grad()
def measure(net, clf, real, train01, held01, num, seed):
    codes = []
    for part in (train01 * 2 - 1).split(500):
        c, _ = net.encode(part)
        codes.append(c)
    codes = torch.cat(codes)
    usage = code_usage(codes, net.ks)
    samples, held_recon = quality.evaluate_ours(net, (held01 * 255).round().to(torch.uint8), num)
    freq = quality.quantize((frequency_samples(net, codes, num, seed) + 1) / 2)
    sample_fd = quality.quality_figures(real, quality.classifier_features(clf, samples))['fd']
    recon_fd = quality.quality_figures(real, quality.classifier_features(clf, held_recon))['fd']
    freq_fd = quality.quality_figures(real, quality.classifier_features(clf, freq))['fd']
    recon_mse = float((held_recon - held01).square().mean())
    return dict(usage=usage, sample_fd=sample_fd, recon_fd=recon_fd, freq_fd=freq_fd, fd_ratio=sample_fd / recon_fd,
                recon_mse=recon_mse, splits=[int(ddl.node_stats.num_splits) for ddl in net.ddls])

def print_figures(name, f):
    u = f['usage']
    print(f'{name}: sample FD {f["sample_fd"]:.3f}  recon FD {f["recon_fd"]:.3f}  ratio {f["fd_ratio"]:.2f}  '
          f'freq-prior FD {f["freq_fd"]:.3f}  recon MSE {f["recon_mse"]:.5f}  {usage_line(u)}')
    print('  layer      ' + ' '.join(f'{l:>5d}' for l in range(len(u['ks']))))
    print('  K          ' + ' '.join(f'{k:>5d}' for k in u['ks']))
    print('  used       ' + ' '.join(f'{n:>5d}' for n in u['used']))
    print('  bits       ' + ' '.join(f'{h:>5.2f}' for h in u['entropy']))
    print('  splits     ' + ' '.join(f'{s:>5d}' for s in f['splits']))

@click.command(context_settings=dict(max_content_width=120))
@click.option('--kimg',          help='Training images (thousands)', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=48, show_default=True)
@click.option('--seed',          help='Seed of the training', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--samples',       help='Samples for the FD', metavar='INT', type=click.IntRange(min=10), default=1000, show_default=True)
@click.option('--json', 'json_path', help='Also write the figures to this JSON file', metavar='PATH', type=str)
@click.option('--batch',         help='Batch size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--lr',            help='Learning rate (Adam)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option('--lr-rampup',     help='Learning-rate warm-up', metavar='KIMG', type=click.FloatRange(min=0), default=2, show_default=True)
@click.option('--ema',           help='EMA half-life, 0 = none', metavar='MIMG', type=click.FloatRange(min=0), default=0.002, show_default=True)
@click.option('--max-channels',  help='Max feature channels per block', metavar='INT', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--max-blockn',    help='Max blocks (and DDLs) per resolution', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--max-outputk',   help='Max K per DDL', metavar='INT', type=click.IntRange(min=2), default=64, show_default=True)
@click.option('--chain-dropout', help='Chain dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0, show_default=True)
@click.option('--balance',       help='Node balancing', type=click.Choice(['tv', 'paper', 'bias', 'none']), default='tv', show_default=True)
@click.option('--balance-halflife', help='Half-life of the node statistics, targets per node', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--save', 'save_path', help='Also save the trained networks (state dicts) to this file', metavar='PATH', type=str)
def main(kimg, seed, samples, json_path, save_path, **recipe):
    """Node usage on data, sample FD and held-out reconstruction FD of a DDN trained on the built-in digits."""
    torch.set_num_threads(1)
    train01_u8, labels, held_u8, _ = quality.load_split(16)
    train01, held01 = train01_u8.float() / 255, held_u8.float() / 255
    clf = quality.train_classifier(train01, labels)
    real = quality.classifier_features(clf, held01)
    # The floor of any model of the training set: 1000 training images against the held-out digits.
    train_fd = quality.quality_figures(real, quality.classifier_features(clf, train01[:samples]))['fd']
    print(f'FD of {min(samples, train01.shape[0])} training images to the held-out digits (the floor): {train_fd:.3f}')
    t0 = time.process_time()
    net, ema = train(train01_u8, kimg, recipe, seed)
    print(f'Trained {kimg:g} kimg in {time.process_time() - t0:.0f} CPU s; seed {seed}; recipe ' +
          ' '.join(f'--{k.replace("_", "-")}={v}' for k, v in recipe.items()))
    result = dict(seed=seed, kimg=kimg, recipe=recipe, train_fd=train_fd)
    if save_path:           # The trained networks' state dicts, to look at them again without training.
        checkpoint.save_atomic(dict(net=net.state_dict(), ema=None if ema is None else ema.state_dict()), save_path, mode='torch')
    for name, model in [('ema', ema), ('net', net)]:
        if model is not None:
            result[name] = measure(model, clf, real, train01, held01, samples, seed)
            print_figures(name, result[name])
    if json_path:
        checkpoint.write_atomic(json_path, lambda f: json.dump(result, f, indent=2), mode='w')
    snap = result['ema'] if ema is not None else result['net']
    print(f'sample_fd={snap["sample_fd"]:.4f}')
    print(f'recon_fd={snap["recon_fd"]:.4f}')
    print(f'fd_ratio={snap["fd_ratio"]:.4f}')
    print(f'layer0_used={snap["usage"]["used"][0]}')

if __name__ == '__main__':
    main()
