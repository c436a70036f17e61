"""The report of a tick: the statistics of the tick through `training_stats` (they become a
`stats.jsonl` line) and the progress line on the console and in log.txt; and the progress bar over
the images of the tick in progress, on an interactive terminal. The device's statistics reach the
host here, once per tick.

Besides Split-and-Prune's own statistics (how often each node was the nearest during training), the
report measures, at snapshot ticks, the node usage of the snapshot network (the EMA) on data: a fixed
batch of training images is encoded under no_grad and each layer's nodes used and entropy are logged
(training/code_usage.py) and drawn in the node-usage plot. The two can disagree: statistics that never forget call a node balanced
long after the data stopped choosing it.
"""

import math
import os
import sys
import time

import psutil
import torch

import dnnlib
from torch_utils import distributed, training_stats
from training.code_usage import snapshot_usage, usage_line
from training.pictures import node_usage_summary

# ----------------------------------------------------------------------------
# Statistics and the progress line of each tick.

class TickReport:
    def __init__(self, net, device, start_time,
        ema             = None,         # The snapshot network (EMA copy, or `net`), for the usage on data.
        usage_images    = None,         # (images, labels) of code_usage.usage_batch; None = no usage on data here.
        measure_usage   = None,         # Whether any rank measures it (the same on every rank, so every rank
                                        # reports the same statistic names); None = usage_images is not None.
    ):
        self.net, self.device, self.start_time = net, device, start_time
        self.ema = net if ema is None else ema
        self.usage_images = usage_images
        self.measure_usage = usage_images is not None if measure_usage is None else measure_usage
        self.data_usage = None          # code_usage dict of this tick's snapshot; None at other ticks.
        self.tick_start_time = time.time()
        self.maintenance_time = self.tick_start_time - start_time   # Time outside the last tick's steps.
        self.prev_splits = node_usage_summary(net)['splits']        # Splits before the tick.

    # Report the tick that ended at `tick_end_time` after `tick_img` images; returns the statistics.
    # With `data_usage` (at snapshot ticks), also the snapshot's usage on data (about 2 ms of CPU per
    # image on the README's digits net, so not at every tick).
    def __call__(self, cur_tick, cur_nimg, tick_img, tick_end_time, data_usage=False):
        usage = node_usage_summary(self.net)
        tick_sec = tick_end_time - self.tick_start_time
        report0 = training_stats.report0
        report0('Progress/tick', cur_tick)
        report0('Progress/kimg', cur_nimg / 1e3)
        report0('Timing/total_sec', tick_end_time - self.start_time)
        report0('Timing/sec_per_tick', tick_sec)
        report0('Timing/sec_per_kimg', tick_sec / max(tick_img, 1) * 1e3)
        report0('Timing/img_per_sec', tick_img / max(tick_sec, 1e-8))
        report0('Timing/maintenance_sec', self.maintenance_time)
        report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
        if self.device.type == 'cuda':
            report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(self.device) / 2**30)
            report0('Resources/peak_gpu_mem_reserved_gb', torch.cuda.max_memory_reserved(self.device) / 2**30)
            torch.cuda.reset_peak_memory_stats(self.device)
        report0('SplitPrune/splits', usage['splits'])
        report0('SplitPrune/splits_tick', usage['splits'] - self.prev_splits)
        report0('SplitPrune/dead_nodes', usage['dead_nodes'])
        report0('SplitPrune/usage_tv', usage['usage_tv'])
        self.data_usage = None
        if data_usage and self.measure_usage:
            values = {}
            if self.usage_images is not None:       # Rank 0 measures; the others report the names, empty.
                self.data_usage = snapshot_usage(self.ema, *self.usage_images)
                values = data_usage_stats(self.data_usage)
            for name in USAGE_STATS:
                report0(f'Usage/{name}', values.get(name, []))
        training_stats.default_collector.update()
        stats = training_stats.default_collector.as_dict()
        distributed.print0(self.progress_line(cur_tick, cur_nimg, tick_img, tick_sec, tick_end_time, usage))
        self.prev_splits = usage['splits']
        return stats

    # The progress line of a tick (EDM's fields, and the node usage of Split-and-Prune).
    def progress_line(self, cur_tick, cur_nimg, tick_img, tick_sec, tick_end_time, usage):
        mean = training_stats.default_collector.mean
        fields = [
            f'tick {cur_tick:<5d}',
            f'kimg {cur_nimg / 1e3:<9.3f}',
            f'loss {mean("Loss/loss"):<8.5f}',
            f'time {dnnlib.util.format_time(tick_end_time - self.start_time):<10s}',
            f'sec/tick {tick_sec:<7.1f}',
            f'img/s {tick_img / max(tick_sec, 1e-8):<8.1f}',
            f'sec/kimg {tick_sec / max(tick_img, 1) * 1e3:<8.2f}',
            f'splits {usage["splits"]} (+{usage["splits"] - self.prev_splits})',
            f'tv {usage["usage_tv"]:<6.3f}',
            *([f'data {usage_line(self.data_usage)}'] if self.data_usage is not None else []),
            f'maintenance {self.maintenance_time:<5.1f}',
            f'cpumem {mean("Resources/cpu_mem_gb"):<5.2f}',
        ]
        if self.device.type == 'cuda':
            fields.append(f'gpumem {mean("Resources/peak_gpu_mem_gb"):<5.2f}')
        return '  '.join(fields)

    # The next tick starts now; the time since the end of the last one counts as maintenance.
    def next_tick(self, tick_end_time):
        self.tick_start_time = time.time()
        self.maintenance_time = self.tick_start_time - tick_end_time

# The stats.jsonl figures of a usage on data (code_usage dict): the share of nodes used by the
# least used layer and its index, the mean entropy as a share of log2(K), and layer 0's nodes used
# and entropy in bits (the first layer is where collapse shows first).
USAGE_STATS = ('min_used_share', 'min_used_layer', 'entropy_share', 'layer0_used', 'layer0_bits')

def data_usage_stats(u):
    shares = [n / k for n, k in zip(u['used'], u['ks'])]
    worst = min(range(len(shares)), key=shares.__getitem__)
    entropy = [h / math.log2(k) for h, k in zip(u['entropy'], u['ks']) if k > 1]
    return dict(min_used_share=shares[worst], min_used_layer=worst, entropy_share=sum(entropy) / max(len(entropy), 1),
                layer0_used=u['used'][0], layer0_bits=u['entropy'][0])

# ----------------------------------------------------------------------------
# A tqdm bar over the images of the current tick, shown only on an interactive terminal. It writes
# to the real stdout, not through the log tee, so log.txt keeps only the per-tick lines.

class TickProgress:
    def __init__(self, enabled):
        stream = sys.__stdout__
        self.enabled = enabled and stream is not None and stream.isatty()
        self.bar = None

    def start(self, total):
        if self.enabled:
            import tqdm
            self.bar = tqdm.tqdm(total=total, unit='img', leave=False, file=sys.__stdout__, dynamic_ncols=True)

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
