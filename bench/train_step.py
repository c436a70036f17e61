"""Benchmark: training throughput of the reference CIFAR-10 DDN (32x32 RGB, max-blockn 32, max-outputk 64).

Runs full training steps (forward, backward, gradient all-reduce, Adam, Split-and-Prune) with the
training loop's own `TrainingStep` on synthetic images, on the current device: the CPU in fp32, or
CUDA in bf16, with the options of train.py's Performance group (--compile, --channels-last,
--adam). Reports the median over the timed steps after warm-up; prints a table, then as its LAST
line `train_img_per_s=<x>`; `--json=FILE` also writes the figures to FILE.

    python bench/train_step.py                    # CPU: batch 4, 1 warm-up + 3 timed steps
    python bench/train_step.py --batch=256        # CUDA default, bf16
    python bench/train_step.py --batch=256 --precision=bf16 --compile=True

On the CPU the reference network costs about 0.3 TFLOP per image per step, so the CPU defaults are
small (batch 4: a 2-core machine needs one to three minutes per 16 images, and the benchmark should
finish within about three minutes), and it runs ONE thread by default: on a shared machine
OpenMP threads wait for each other whenever other processes hold the cores, which made two threads
up to 5x slower and the figure unstable (0.08 to 0.43 img/s between runs) here, while one thread
gave the same figure within 10%. Pass `--threads=N` to use more on a dedicated machine.
"""

import json
import os
import resource
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli
from torch_utils import distributed as dist
from training.loss import DDNLoss
from training.networks import DDNGenerator
from training.training_step import ADAM_IMPLEMENTATIONS, TrainingStep

# The reference CIFAR-10 network of DDN.md §4.
REFERENCE_NET = dict(img_resolution=32, img_channels=3, max_blockn=32, max_outputk=64)

# ----------------------------------------------------------------------------

@click.command()
@click.option('--batch',     help='Images per step  [default: 4 on CPU, 256 on CUDA]', metavar='INT', type=click.IntRange(min=1))
@click.option('--steps',     help='Timed steps  [default: 3 on CPU, 20 on CUDA]', metavar='INT', type=click.IntRange(min=1))
@click.option('--warmup',    help='Untimed steps first  [default: 1 on CPU, 5 on CUDA]', metavar='INT', type=click.IntRange(min=0))
@click.option('--precision', help='Training precision  [default: fp32 on CPU, bf16 on CUDA]', type=click.Choice(['fp32', 'bf16', 'fp16']))
@click.option('--compile',   help='torch.compile the training forward', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--channels-last', help='Channels-last convolutions', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--adam',      help='Adam implementation (auto = torch\'s choice)', type=click.Choice(['auto', 'for-loop', 'foreach', 'fused']), default='auto', show_default=True)
@cli.device_option()
@click.option('--threads',   help='CPU threads', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--json', 'json_path', help='Also write the figures to this JSON file', metavar='FILE', type=str)
def main(batch, steps, warmup, precision, compile, channels_last, adam, device, threads, json_path):
    """Images/s and peak memory of training steps of the reference CIFAR-10 DDN."""
    device = dist.pick_device(device)
    cuda = device.type == 'cuda'
    batch = batch or (256 if cuda else 4)
    steps = steps or (20 if cuda else 3)
    warmup = warmup if warmup is not None else (5 if cuda else 1)
    precision = precision or ('bf16' if cuda else 'fp32')
    torch.set_num_threads(threads)
    if cuda:    # As the training loop: cuDNN autotuning on, TF32 off (fp32 means fp32).
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    torch.manual_seed(0)
    net = DDNGenerator(**REFERENCE_NET).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **ADAM_IMPLEMENTATIONS[adam])
    step = TrainingStep(net, net, DDNLoss(), optimizer, batch_size=batch, precision=precision,
                        compile=compile, channels_last=channels_last)
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1

    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step.accumulate(images)
        step.update(lr=1e-3, ema_beta=0)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if i == warmup - 1 and cuda:
            torch.cuda.reset_peak_memory_stats(device)

    sec = statistics.median(times)
    img_per_s = batch / sec
    if cuda:
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f'{peak_gib:.2f} GiB (CUDA peak allocated)'
        where = torch.cuda.get_device_name(device)
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        memory = f'{peak_gib:.2f} GiB (CPU peak RSS)'
        where = f'cpu ({torch.get_num_threads()} threads)'
    options = f'compile={compile} channels_last={channels_last} adam={adam}'
    rows = [
        ('device', where),
        ('network', f'DDN CIFAR-10 reference: 32x32x3, L={net.num_layers}, K={max(net.ks)}, '
                    f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters'),
        ('precision', precision),
        ('options', options),
        ('torch', f'{torch.__version__} (CUDA {torch.version.cuda})' if cuda else torch.__version__),
        ('batch', str(batch)),
        ('steps', f'{steps} timed after {warmup} warm-up'),
        ('sec/step', f'median {sec:.3f} (min {min(times):.3f}, max {max(times):.3f})'),
        ('img/s', f'{img_per_s:.2f}'),
        ('peak memory', memory),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f'{name:<{width}}  {value}')
    if json_path:
        figures = dict(device=where, precision=precision, compile=compile, channels_last=channels_last, adam=adam,
                       batch=batch, steps=steps, warmup=warmup, sec_per_step_median=sec, sec_per_step_min=min(times),
                       img_per_s=img_per_s, img_per_s_best=batch / min(times), peak_memory_gib=peak_gib,
                       torch=torch.__version__, cuda=torch.version.cuda)
        with open(json_path, 'w') as f:
            json.dump(figures, f, indent=2)
    print(f'train_img_per_s={img_per_s:.4g}')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
