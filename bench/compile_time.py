"""Benchmark: what `--compile=True` (regional compilation of the residual blocks) costs and gives.

Builds the reference CIFAR-10 net (or the README's digits net), runs training steps with the
training loop's own `TrainingStep(compile=...)` and reports: the graphs dynamo compiled (one per
block shape), graph breaks, the first step's seconds (tracing + code generation + the step) and a
later step's. The compile time depends on the machine (C++ on a CPU, Triton on a GPU) and on a
warm inductor cache (`TORCHINDUCTOR_CACHE_DIR`); the graph count does not. On a shared machine the
CPU seconds (this process and the compiler processes it starts) say more than the wall time.

    python bench/compile_time.py                       # reference net, bf16, batch 2, inductor
    python bench/compile_time.py --net=digits --backend=aot_eager

Last line: `compile_s=<first step minus a later step>`; `--json=FILE` writes the figures.
"""

import json
import os
import resource
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli
from torch_utils import distributed as dist
from training.loss import DDNLoss
from training.networks import DDNGenerator
from training.training_step import TrainingStep

NETS = {
    'ref':    dict(img_resolution=32, img_channels=3, max_blockn=32, max_outputk=64),
    'digits': dict(img_resolution=16, img_channels=1, max_channels=32, max_blockn=3, max_outputk=64, chain_dropout=0.0),
}

@click.command(context_settings=dict(show_default=True))
@click.option('--net', 'net_name', help='Network', type=click.Choice(list(NETS)), default='ref')
@click.option('--precision', help='Training precision', type=click.Choice(['fp32', 'bf16', 'fp16']), default='bf16')
@click.option('--batch', help='Images per step', metavar='INT', type=click.IntRange(min=1), default=2)
@click.option('--backend', help='torch.compile backend', type=str, default='inductor')
@cli.device_option()
@click.option('--threads', help='CPU threads', metavar='INT', type=click.IntRange(min=1), default=1)
@click.option('--json', 'json_path', help='Also write the figures to this JSON file', metavar='FILE', type=str)
def main(net_name, precision, batch, backend, device, threads, json_path):
    """Compile time and graph count of the regional torch.compile of a DDN training step."""
    from torch._dynamo.utils import counters
    device = dist.pick_device(device)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs = NETS[net_name]
    net = DDNGenerator(**kwargs).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = TrainingStep(net, net, DDNLoss(), opt, batch_size=batch, precision=precision, compile=backend)
    C, R = kwargs['img_channels'], kwargs['img_resolution']
    images = torch.rand(batch, C, R, R, device=device) * 2 - 1
    def cpu_seconds():
        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    seconds, cpu = [], []
    for i in range(2):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        step.accumulate(images)
        step.update(lr=1e-3, ema_beta=0)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        cpu.append(cpu_seconds() - start_cpu)
        print(f'step {i}: {seconds[-1]:.1f} s wall, {cpu[-1]:.1f} CPU s, '
              f'{counters["stats"]["unique_graphs"]} graphs so far', flush=True)
    figures = dict(net=net_name, layers=net.num_layers, precision=precision, batch=batch, backend=backend,
                   device=str(device), torch=torch.__version__, graphs=counters['stats']['unique_graphs'],
                   graph_breaks=sum(counters['graph_break'].values()), first_step_s=seconds[0], later_step_s=seconds[1],
                   compile_s=seconds[0] - seconds[1], first_step_cpu_s=cpu[0], later_step_cpu_s=cpu[1])
    for key, value in figures.items():
        print(f'{key:<14} {value:.1f}' if isinstance(value, float) else f'{key:<14} {value}')
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(figures, f, indent=2)
    print(f'compile_s={figures["compile_s"]:.4g}')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
