"""Benchmark: cost of one Split-and-Prune pass over the 63 DDLs of the reference CIFAR-10 net.

The node sets are the reference network's (`DDNGenerator(32, 3, max_blockn=32, max_outputk=64)`:
L = 63 DDLs, K = 64, each weight 192 x 128), with an EMA mirror and Adam state, as in training;
the convolutional blocks play no part in Split-and-Prune and are left out. Every step, each
layer observes one batch of random distances (not timed), then one pass runs:
- before: `split_and_prune_per_layer` (tests/split_prune_reference.py), the per-layer loop this project used up to commit
  3f4006a (fold, copy back and row copies one node set at a time: a few operations per layer);
- after:  `training.split_prune.split_and_prune`, batched over the layers (a fixed number of
  operations, whatever L).
Both start from identical copies, see identical observations, and must end bit-identical (checked).

Counts per pass, with torch.profiler: the ATen operations the pass issues from Python (top-level
events, views and other metadata-only operations left out; on the CPU each is one kernel call) and,
on CUDA, the kernels launched on the GPU. Times: median and minimum per pass over the timed steps.

    python bench/split_prune.py                    # CPU, 1 thread
    python bench/split_prune.py --device=cuda

Last lines: `sp_ops_before=`, `sp_ops_after=`, `sp_ops_ratio=`, `sp_time_ratio=` (before / after).
"""

import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli
from tests.split_prune_reference import count_ops, make_setup, observe_all, split_and_prune_per_layer
from torch_utils import distributed as dist
from training.split_prune import split_and_prune

# ----------------------------------------------------------------------------
# Every tensor a pass may change: weights, EMA weights and buffers, optimizer state.

def _state(model, ema, optimizer):
    tensors = list(model.state_dict().values()) + list(ema.state_dict().values())
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensors

# ----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True))
@click.option('--layers',   help='Number of DDLs (63 in the reference CIFAR-10 net)', metavar='INT', type=click.IntRange(min=1), default=63)
@click.option('--batch',    help='Targets observed per layer per step', metavar='INT', type=click.IntRange(min=1), default=256)
@click.option('--steps',    help='Timed steps', metavar='INT', type=click.IntRange(min=1), default=30)
@click.option('--warmup',   help='Untimed steps first', metavar='INT', type=click.IntRange(min=0), default=3)
@cli.device_option()
@click.option('--threads',  help='CPU threads', metavar='INT', type=click.IntRange(min=1), default=1)
def main(layers, batch, steps, warmup, device, threads):
    """Operations and time of one Split-and-Prune pass: per-layer loop vs batched."""
    torch.set_num_threads(threads)
    device = dist.pick_device(device)
    cuda = device.type == 'cuda'
    before = make_setup(layers, device=device)
    after = make_setup(layers, device=device)
    passes = dict(before=lambda: split_and_prune_per_layer(before[0], before[2], mirrors=[before[1]]),
                  after=lambda: split_and_prune(after[0], after[2], mirrors=[after[1]]))
    generator = torch.Generator().manual_seed(1)
    times = dict(before=[], after=[])
    counts = {}
    splits = dict(before=0, after=0)
    for i in range(warmup + steps + 1):
        observe_all([before[0], after[0]], batch, generator)
        for name in ('before', 'after'):
            if i == warmup + steps:                 # Last step: profiled, not timed.
                counts[name] = count_ops(passes[name], cuda)
                continue
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            n = passes[name]()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            splits[name] += int(n)
    identical = all(torch.equal(a, b) for a, b in zip(_state(*before), _state(*after), strict=True))
    if not identical or splits['before'] != splits['after']:
        raise SystemExit('The batched Split-and-Prune pass differs from the per-layer one')

    where = torch.cuda.get_device_name(device) if cuda else f'cpu ({torch.get_num_threads()} threads)'
    print(f'Split-and-Prune pass over {layers} DDLs (K=64, weight 192x128, EMA mirror, Adam state); '
          f'device {where}; torch {torch.__version__}')
    print(f'{splits["after"]} splits in {warmup + steps} steps; results bit-identical: {identical}')
    print(f'{"pass":<8} {"ops/pass":>9} {"kernels/pass":>13} {"median ms":>10} {"min ms":>8}')
    for name in ('before', 'after'):
        ops, kernels = counts[name]
        print(f'{name:<8} {ops:>9d} {"-" if kernels is None else kernels:>13} '
              f'{statistics.median(times[name]) * 1e3:>10.3f} {min(times[name]) * 1e3:>8.3f}')
    print(f'sp_ops_before={counts["before"][0]}')
    print(f'sp_ops_after={counts["after"][0]}')
    if cuda:
        print(f'sp_kernels_before={counts["before"][1]}')
        print(f'sp_kernels_after={counts["after"][1]}')
    print(f'sp_ops_ratio={counts["before"][0] / counts["after"][0]:.3g}')
    print(f'sp_time_ratio={min(times["before"]) / min(times["after"]):.3g}')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------