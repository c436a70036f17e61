"""Benchmark: the AUTHOR's code on the reference CIFAR-10 configuration, training step and generation.

The peer of bench/train_step.py and bench/generate.py in bench/gpu.sh. It imports the author's EDM
fork (github.com/DIYer22/discrete_distribution_networks, given by --author-repo) and its layer
package `sddn` (PyPI `sddn==0.0.2`, which pulls in `boxx`), builds the net its train.py builds
for `--arch=ddn` (`DDNPrecond`, model `PHDDN`) with `--max-blockn=32 --max-outputk=64`
(L = 63 layers, K = 64, the configuration of our REFERENCE_NET), dropout 0 and chain dropout 0.05
as ours, and times:
- train: its training step as its training loop runs it: the net wrapped in DDP (a one-process
  group), `loss_fn(net=ddp, ...)` of its `DDNLoss`, `loss.sum() / batch` backward, nan_to_num on
  the gradients, `optimizer.step()` (Adam, lr 1e-3), then `DiscreteDistributionOutput.try_split_all`
  (its Split-and-Prune). --precision=fp16 is its default `--fp16=True` (feature maps cast to
  half inside the network, no loss scaling: its `--ls` is 1), fp32 its `--fp16=False`;
- generate: `net(d)` in eval mode without gradients, `d` holding per-seed uniform numbers as its
  generate.py's `ddn_sampler` builds them (every layer computes all K candidates and keeps the one
  its number picks); fp16 is its default there too (generate.py restores the training options).
Nothing of this project is imported here: the author's packages are named like ours
(`training`, `torch_utils`, `dnnlib`), so this runs in a process of its own.

Preparing the GPU machine (which may have no package index): on a machine with one,
    git clone https://github.com/DIYer22/discrete_distribution_networks author/ddn
    pip download sddn==0.0.2 boxx -d author/wheels      # plus their dependencies
then copy `author/` over and `pip install --no-index --find-links author/wheels sddn==0.0.2 boxx`
(bench/gpu.sh does this step when given the folder).

    python bench/author_speed.py --author-repo=author/ddn --mode=train --precision=fp16 --batch=256
    python bench/author_speed.py --author-repo=author/ddn --mode=generate --batch=256

The author's code hard-codes `.cuda()`; on a machine without CUDA (to check this script at a
tiny size) `Tensor.cuda` is made a no-op for this process. Last line: `author_train_img_per_s=`
or `author_gen_img_per_s=`; `--json=FILE` also writes the figures.
"""

import json
import os
import statistics
import sys
import time

import click
import torch

# ----------------------------------------------------------------------------

def import_author(author_repo, precision):
    author_repo = os.path.abspath(author_repo)
    if not os.path.isfile(os.path.join(author_repo, 'training', 'networks.py')):
        raise click.BadParameter(f'{author_repo} does not hold the author\'s repository (no training/networks.py)',
                                 param_hint='--author-repo')
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') not in (here, os.path.dirname(here))]
    sys.path.insert(0, author_repo)
    try:
        import boxx
        import sddn
    except ImportError as err:
        raise click.ClickException(f'{err}: install the author\'s layer package first, '
                                   '`pip install sddn==0.0.2 boxx` (or from the wheels of bench/gpu.sh)') from None
    # What the author's train.py main() sets from its options before building anything.
    boxx.cf.kwargs = dict(max_blockn=32, max_outputk=64, fp16=(precision == 'fp16'), learn_res=True,
                          chain_dropout=0.05, start_size=1, blockn_times=1, refinern=0, condition=None,
                          diverge_shaping=0, dropout=0.0)
    boxx.cf.debug = False
    sddn.DiscreteDistributionOutput.learn_residual = True
    sddn.DiscreteDistributionOutput.chain_dropout = 0.05
    from training import loss as author_loss
    from training import networks as author_networks
    return sddn, author_networks, author_loss

def one_process_group(device):
    os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
    os.environ.setdefault('MASTER_PORT', str(29500 + os.getpid() % 1000))
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    torch.distributed.init_process_group(backend, rank=0, world_size=1)

# Seconds of each of `steps` calls of `step` after `warmup` untimed ones (the device finished each);
# the CUDA peak memory counts from the first timed step.
def time_steps(step, warmup, steps, cuda):
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if i == warmup - 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
    return times

@click.command(context_settings=dict(show_default=True))
@click.option('--author-repo', help='Checkout of github.com/DIYer22/discrete_distribution_networks', metavar='DIR', type=str, required=True)
@click.option('--mode',      help='What to time', type=click.Choice(['train', 'generate']), default='train')
@click.option('--precision', help='fp16 = the author\'s --fp16=True (its default), fp32 = --fp16=False', type=click.Choice(['fp32', 'fp16']), default='fp16')
@click.option('--batch',     help='Images per step  [default: 4 on CPU, 256 on CUDA]', metavar='INT', type=click.IntRange(min=1))
@click.option('--steps',     help='Timed steps  [default: 2 on CPU, 20 on CUDA]', metavar='INT', type=click.IntRange(min=1))
@click.option('--warmup',    help='Untimed steps first  [default: 1 on CPU, 5 on CUDA]', metavar='INT', type=click.IntRange(min=0))
@click.option('--threads',   help='CPU threads', metavar='INT', type=click.IntRange(min=1), default=1)
@click.option('--json', 'json_path', help='Also write the figures to this JSON file', metavar='FILE', type=str)
def main(author_repo, mode, precision, batch, steps, warmup, threads, json_path):
    """Images/s of the author's training step or generation, reference CIFAR-10 configuration."""
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    batch = batch or (256 if cuda else 4)
    steps = steps or (20 if cuda else 2)
    warmup = warmup if warmup is not None else (5 if cuda else 1)
    torch.set_num_threads(threads)
    if not cuda:
        torch.Tensor.cuda = lambda self, *args, **kwargs: self     # See the module docstring.
    else:   # As its training loop.
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    sddn, author_networks, author_loss = import_author(author_repo, precision)

    torch.manual_seed(0)
    net = author_networks.DDNPrecond(img_resolution=32, img_channels=3, label_dim=0, use_fp16=(precision == 'fp16'),
                                     model_type='PHDDN', dropout=0.0).to(device)
    layers = len(sddn.DiscreteDistributionOutput.inits)
    params = sum(p.numel() for p in net.parameters())
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1

    if mode == 'train':
        one_process_group(device)
        net.train().requires_grad_(True)
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None, broadcast_buffers=False)
        loss_fn = author_loss.DDNLoss()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net=ddp, images=images, labels=None)
            loss.sum().mul(1 / batch).backward()
            for param in net.parameters():
                if param.grad is not None:
                    torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            optimizer.step()
            sddn.DiscreteDistributionOutput.try_split_all(optimizer)
    else:
        net.eval().requires_grad_(False)
        counter = iter(range(10**9))
        def step():
            # As its ddn_sampler: per-seed uniform numbers for up to 2000 layers pick the candidates.
            i = next(counter)
            seeds = torch.arange(i * batch, (i + 1) * batch)
            idx_ks = torch.cat([torch.rand(2000, 1, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds], -1)
            with torch.no_grad():
                d = net({'batch_size': batch, 'batch_seeds': seeds, 'idx_gens': seeds, 'idx_ks': idx_ks}, None, None)
                d['predict'].float().sum().item()

    times = time_steps(step, warmup, steps, cuda)
    if mode == 'train':
        torch.distributed.destroy_process_group()

    sec = statistics.median(times)
    img_per_s = batch / sec
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    where = torch.cuda.get_device_name() if cuda else f'cpu ({torch.get_num_threads()} threads)'
    print(f'author {mode}: DDNPrecond/PHDDN 32x32x3, max_blockn=32, max_outputk=64: L={layers}, {params / 1e6:.2f} M parameters; '
          f'{precision}; batch {batch}; device {where}; torch {torch.__version__}')
    print(f'sec/step median {sec:.3f} (min {min(times):.3f}, max {max(times):.3f}) over {steps} steps after {warmup} warm-up')
    print(f'img/s {img_per_s:.2f}' + (f'; peak memory {peak_gib:.2f} GiB (CUDA peak allocated)' if cuda else ''))
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(dict(mode=mode, precision=precision, batch=batch, steps=steps, warmup=warmup, layers=layers,
                           params=params, sec_per_step_median=sec, sec_per_step_min=min(times), img_per_s=img_per_s,
                           img_per_s_best=batch / min(times), peak_memory_gib=peak_gib, device=where,
                           torch=torch.__version__, cuda=torch.version.cuda), f, indent=2)
    print(f'author_{"train" if mode == "train" else "gen"}_img_per_s={img_per_s:.4g}')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
