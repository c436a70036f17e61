"""Fit a prior over the codes of a trained DDN (training/prior.py) and save it beside the snapshot.

The network encodes the dataset's images (L2-guided selection, `net.encode`): each image's latent
(k_1..k_L). The last `--held-out` share of the images is held out; the prior trains on the rest with
cross-entropy (a small causal transformer by default, starting from the frequencies and early-stopped
on the last 10% of the training codes; `--kind frequency` is the per-layer node-frequency baseline,
fitted to all training codes; `--kind mixture` mixes, per layer, that transformer, a smoothed
conditional on one earlier layer and the frequencies, its parts and weights chosen on the last 10%,
then its counts refitted to all training codes: the baseline is inside it). It prints the held-out bits per image of uniform
codes (sum log2 K), of the frequency baseline and of the prior, and the share of code sequences
sampled from seeds 0..N-1 that equal a training image's codes (a prior that replays its training set is
not a generator). The last line is `prior_bits=...`.

The prior goes to `--out`, by default `X.prior.safetensors` beside the network file `X.safetensors` /
`X.pkl` (the newest snapshot of a run folder), where generate.py `--prior=auto` finds it. Its metadata
holds these figures and the network's fingerprint.

    python train_prior.py --network=training-runs/00000-digits-... --data=digits
    python train_prior.py --network=net.safetensors --data=datasets/cifar10-32x32.zip --steps=20000 --out=cifar.prior.safetensors

SECURITY: --network loads without running code from the file (training/snapshot.py) unless --trust-pickle.
"""

import json
import os

import click

import cli
import dnnlib
from torch_utils import distributed as dist
from training import prior as prior_lib
from training import prior_files
from training import prior_rule
from training import prior_training
from training.dataset import open_dataset
from training.snapshot import fingerprint, load_network

@click.command(context_settings=dict(show_default=True))
@click.option('--network',      help='Network snapshot (.safetensors or .pkl), URL, or run folder (latest snapshot)', metavar='FILE|URL|DIR', required=True)
@click.option('--data',         help='Dataset folder or zip, or "digits"', metavar='ZIP|DIR', default='digits')
@click.option('--out',          help='Prior file to write  [default: the network file\'s X.prior.safetensors]', metavar='FILE', default=None)
@click.option('--kind',         help='Prior', type=click.Choice(sorted(prior_lib.PRIOR_KINDS)), default='transformer')
@click.option('--max-images',   help='Use the first N images of the dataset', metavar='INT', type=click.IntRange(min=2), default=None)
@click.option('--held-out',     help='Share of the images (the last ones) held out', metavar='FRAC', type=click.FloatRange(min=0, max=1, max_open=True), default=0.1)
@click.option('--steps',        help='Training steps (transformer)', metavar='INT', type=click.IntRange(min=0), default=300)
@click.option('--batch',        help='Codes per step, and images per encoding batch', metavar='INT', type=click.IntRange(min=1), default=128)
@click.option('--lr',           help='AdamW learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-3)
@click.option('--wd',           help='AdamW weight decay', metavar='FLOAT', type=click.FloatRange(min=0), default=0.1)
@click.option('--dim',          help='Transformer width', metavar='INT', type=click.IntRange(min=8), default=64)
@click.option('--depth',        help='Transformer blocks', metavar='INT', type=click.IntRange(min=1), default=2)
@click.option('--heads',        help='Attention heads', metavar='INT', type=click.IntRange(min=1), default=4)
@click.option('--dropout',      help='Transformer dropout', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True), default=0.3)
@click.option('--code-dropout', help='Transformer: share of input codes read as unknown in training', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True), default=0.0)
@click.option('--eval-every',   help='Score the held-out codes every N steps (the best state is kept)', metavar='INT', type=click.IntRange(min=1), default=25)
@click.option('--samples',      help='Sampled code sequences (seeds 0..N-1) for the replay share', metavar='INT', type=click.IntRange(min=0), default=1000)
@click.option('--seed',         help='Random seed of the prior\'s training', metavar='INT', type=int, default=0)
@click.option('--trust-pickle', help='Load a --network pickle that is not a plain ddn snapshot (it runs code)', is_flag=True)
@cli.device_option()
def main(network, data, out, kind, max_images, held_out, steps, batch, lr, wd, dim, depth, heads, dropout, code_dropout, eval_every,
         samples, seed, trust_pickle, device):
    """Fit a prior over a DDN's codes; report held-out bits per image against uniform codes and the
    per-layer frequency baseline."""
    device = dist.pick_device(device)
    try:
        path, net = load_network(network, device, trust_pickle)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if out is None:
        if dnnlib.util.is_url(path):
            raise click.UsageError('--network is a URL: give --out for the prior file')
        out = prior_files.prior_path(path)
    if os.path.isdir(out):
        raise click.BadParameter(f'{out} is a folder; give a file name', param_hint='--out')
    try:
        dataset = open_dataset(data, resolution=net.img_resolution) if data in (None, 'digits') else open_dataset(data)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f'cannot open dataset {data}: {e}', param_hint='--data') from e
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(dataset.image_shape) != shape:
        raise click.BadParameter(f'{data} has images of shape {dataset.image_shape}, the network makes {shape}', param_hint='--data')
    num = len(dataset) if max_images is None else min(max_images, len(dataset))
    try:
        train_idx, held_idx = prior_training.split_indices(num, held_out)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--held-out') from e

    click.echo(f'Network: {path} (L={net.num_layers}, {net.bits_per_image:.1f} bits per image)')
    click.echo(f'Encoding {num} images of {data} ({len(train_idx)} to train on, {len(held_idx)} held out)...')
    try:
        codes = prior_training.dataset_codes(net, dataset, range(num), batch)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    train, held = codes[train_idx], codes[held_idx]
    fit, val = prior_training.split_validation(train)     # Early stopping on `val`; the figures on `held`, never seen.
    prior_kwargs = dict(dim=dim, depth=depth, heads=heads, dropout=dropout, code_dropout=code_dropout) if kind != 'frequency' else {}
    log = lambda row: click.echo('  ' + '  '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
    try:
        prior, history = prior_training.fit_prior(kind, net.ks, fit, val, steps=steps, batch=batch, lr=lr, weight_decay=wd,
                                             eval_every=eval_every, seed=seed, device=device, log=log,
                                             refit=train if kind == 'mixture' else None, **prior_kwargs)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    report = prior_training.prior_report(prior, train, held, prior_rule.seed_uniforms(range(samples), net.num_layers))
    report.update(kind=kind, network=os.path.basename(path), network_fingerprint=fingerprint(net), data=str(data),
                  steps=steps, held_out=held_out)
    prior_files.save_prior(prior.cpu(), out, extra_metadata=dict(report=report))
    click.echo(f'Saved {kind} prior to {out}')
    click.echo(json.dumps(report))
    if 'prior_bits' in report:
        click.echo(f'held-out bits/image: uniform {report["uniform_bits"]:.2f}  frequency {report["frequency_bits"]:.2f}  '
                   f'{kind} {report["prior_bits"]:.2f}')
    if 'prior_replay' in report:
        click.echo(f'sampled codes equal to a training image\'s: {kind} {report["prior_replay"]:.1%}  '
                   f'frequency {report["frequency_replay"]:.1%}  uniform {report["uniform_replay"]:.1%}')
    click.echo(f'prior_bits={report.get("prior_bits", float("nan")):.4f}')

if __name__ == '__main__':
    main()
