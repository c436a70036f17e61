"""The report of a tick: the statistics of the tick through `training_stats` (they become a
`stats.jsonl` line) and the progress line on the console and in log.txt; and the progress bar over
the images of the tick in progress, on an interactive terminal. The device's statistics reach the
host here, once per tick.
"""

import os
import sys
import time

import psutil
import torch

import dnnlib
from torch_utils import distributed, training_stats
from training.pictures import node_usage_summary

# ----------------------------------------------------------------------------
# Statistics and the progress line of each tick.

class TickReport:
    def __init__(self, net, device, start_time):
        self.net, self.device, self.start_time = net, device, start_time
        self.tick_start_time = time.time()
        self.maintenance_time = self.tick_start_time - start_time   # Time outside the last tick's steps.
        self.prev_splits = node_usage_summary(net)['splits']        # Splits before the tick.

    # Report the tick that ended at `tick_end_time` after `tick_img` images; returns the statistics.
    def __call__(self, cur_tick, cur_nimg, tick_img, tick_end_time):
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
