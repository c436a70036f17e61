"""Generation speed of the reference CIFAR-10 DDN: images per second, single-head vs all-K path.

The network is `DDNGenerator(32, 3, max_blockn=32, max_outputk=64)` (L = 63 layers, ~76M
parameters) with random weights: speed does not depend on training. Each timed step samples one
batch from fresh seeds, exactly as `generate.py` does (`net(seeds=...)`, eval mode, batch-invariant
kernels); the all-K path (`training.ddl.reference_heads`) evaluates every head of every DDL and gathers the chosen
one, the single-head path computes only the chosen head (DDN.md §2, "Cost"). The fast path is the
single head with the fastest kernels instead of the batch-invariant ones (`generate.py --exact=False`:
the same codes per seed, images within one grey level): the cost of bit-identical images is the ratio.

    python bench/generate.py                       # CPU: small batch, few steps (< 3 minutes)
    python bench/generate.py --device=cuda --batch=256 --steps=20

Prints a table, then `gen_img_per_s=<single-head images/s>` as the last line; `--json=FILE` also
writes the figures to FILE.
"""

import contextlib
import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli
from torch_utils import distributed as dist
from training.ddl import reference_heads
from training.determinism import batch_invariant
from training.networks import DDNGenerator

# ----------------------------------------------------------------------------
# Seconds per batch of one generation path: `warmup` untimed steps, then the mean of `steps`.

@torch.no_grad()
def time_path(net, batch, steps, warmup, all_heads, exact=True):
    device = net.init_feature.device
    def step(i):
        seeds = range(i * batch, (i + 1) * batch)
        with batch_invariant() if exact else contextlib.nullcontext(), \
             reference_heads(net) if all_heads else contextlib.nullcontext():
            images = net(seeds=seeds).images
        return images.sum().item()  # The host reads a value: the device work is finished.
    for i in range(warmup):
        step(i)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    return (time.perf_counter() - start) / steps

@click.command(context_settings=dict(show_default=True))
@click.option('--batch', help='Images per step  [default: 2 on CPU, 256 on CUDA]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--steps', help='Timed steps per path  [default: 2 on CPU, 20 on CUDA]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--warmup', help='Untimed steps per path', metavar='INT', type=click.IntRange(min=0), default=1)
@cli.device_option()
@click.option('--json', 'json_path', help='Also write the figures to this JSON file', metavar='FILE', type=str)
def main(batch, steps, warmup, device, json_path):
    """Images/s of generation with the reference CIFAR-10 network, single-head vs all-K."""
    device = dist.pick_device(device)
    on_cuda = device.type == 'cuda'
    batch, steps = batch or (256 if on_cuda else 2), steps or (20 if on_cuda else 2)
    torch.manual_seed(0)
    net = DDNGenerator(32, 3, max_blockn=32, max_outputk=64).eval().requires_grad_(False).to(device)
    params = sum(p.numel() for p in net.parameters())
    name = torch.cuda.get_device_name(device) if on_cuda else f'cpu, {torch.get_num_threads()} threads'
    print(f'DDNGenerator(32, 3, max_blockn=32, max_outputk=64): {params / 1e6:.1f}M parameters, '
          f'L={net.num_layers}, {net.bits_per_image:.0f} bits/image; device {device} ({name}); torch {torch.__version__}')

    rows = []
    for label, all_heads, exact in (('single-head', False, True), ('all-K', True, True), ('fast', False, False)):
        sec = time_path(net, batch, steps, warmup, all_heads, exact)
        rows.append((label, sec, batch / sec))
    print(f'{"path":<12} {"batch":>6} {"steps":>6} {"s/batch":>9} {"img/s":>9}')
    for label, sec, ips in rows:
        print(f'{label:<12} {batch:>6} {steps:>6} {sec:>9.3f} {ips:>9.2f}')
    ratio = rows[0][2] / rows[1][2]
    print(f'{"ratio":<12} {"":>6} {"":>6} {"":>9} {ratio:>8.2f}x  (single-head / all-K)')
    print(f'{"ratio":<12} {"":>6} {"":>6} {"":>9} {rows[2][2] / rows[0][2]:>8.2f}x  (fast / single-head exact)')
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(dict(device=name, batch=batch, steps=steps, warmup=warmup, torch=torch.__version__, cuda=torch.version.cuda,
                           **{f'{label.replace("-", "_").lower()}_img_per_s': ips for label, _, ips in rows}), f, indent=2)
    print(f'gen_img_per_s={rows[0][2]:.4g}')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
