"""Training statistics accumulated on the device and synchronised once per tick.

`report(name, value)` adds the count, sum and sum of squares of all elements of `value` to a
float64 accumulator on the value's own device: no `.item()`, no host round trip, so reporting the
loss of every layer every step costs nothing noticeable. `Collector.update()` (once per tick) packs
every matching accumulator into one buffer, all-reduces it across processes in one collective and
copies it to the host once; `mean`, `std`, `num` then read the statistics of the interval since the
collector's previous update.

Rule for multi-process runs: every rank must report the same names (possibly with empty values),
because the buffers of all ranks are reduced element-wise. `report0` follows the rule by reporting
an empty value on the other ranks. A name mismatch that keeps the buffer length is detected and
raised; one that changes the length makes the collective itself fail.
"""

import re
import zlib

import numpy as np
import torch

import dnnlib

from . import distributed

# Statistics kept per name: count, sum, sum of squares.
_NUM_MOMENTS = 3

# Accumulators of everything reported so far: {name: {device: float64 tensor (3,)}}; cleared by reset().
_counters = {}

# Number of reset() calls so far: a Collector whose totals predate the last reset starts afresh.
_generation = 0

# Forget everything reported so far: a new training run in this process starts from clean statistics
# (a diverged run's NaN would otherwise stay in every later Collector's deltas).
def reset():
    global _generation
    _counters.clear()
    _generation += 1

# ----------------------------------------------------------------------------
# Accumulate the elements of `value` under `name`, on the value's device; returns `value`.

def report(name, value):
    """Add all elements of `value` (a tensor, a number or a sequence) to the statistic `name`.

    Returns `value` unchanged, so `loss = report('Loss/loss', loss)` reads naturally. Never syncs
    with the host; NaN and Inf are kept so that a diverging loss shows in the log.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f'Statistic name must be a non-empty string, got {name!r}')
    elems = torch.as_tensor(value).detach().flatten().to(torch.float64)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    device_counters = _counters.setdefault(name, {})
    if elems.device not in device_counters:
        device_counters[elems.device] = torch.zeros(_NUM_MOMENTS, dtype=torch.float64, device=elems.device)
    device_counters[elems.device].add_(moments)
    return value

# ----------------------------------------------------------------------------
# Like report(), but only rank 0's value counts; other ranks register the name with no elements.

def report0(name, value):
    report(name, value if distributed.get_rank() == 0 else [])
    return value

# ----------------------------------------------------------------------------
# Reads the statistics of names matching a regex, for the interval between two update() calls.

class Collector:
    def __init__(self,
        regex           = None,     # Collect the names where this regex matches (re.search); None = all.
        keep_previous   = True,     # A name with no new elements keeps its last values instead of becoming NaN.
    ):
        self._regex = re.compile(regex) if regex is not None else None
        self._keep_previous = keep_previous
        self._cumulative = {}   # name -> reduced totals (np.float64 (3,)) at the previous update()
        self._moments = {}      # name -> totals of the last interval (np.float64 (3,))
        self._names_cache = {}  # name -> whether it matches the regex
        self._generation = _generation  # reset() count that _cumulative belongs to

    # Whether `name` is collected by this collector.
    def _matches(self, name):
        if name not in self._names_cache:
            self._names_cache[name] = self._regex is None or self._regex.search(name) is not None
        return self._names_cache[name]

    # Reduce all matching accumulators across ranks (one collective, one host copy) and take deltas.
    def update(self):
        if self._generation != _generation:     # The counters were reset: the old totals are void.
            self._cumulative.clear()
            self._moments.clear()
            self._generation = _generation
        names = sorted(name for name in _counters if self._matches(name))
        # One float64 buffer for everything: (names + 1 check row, 3) on a single device.
        on_device = [dev for name in names for dev in _counters[name] if dev.type != 'cpu']
        buffer_device = distributed.device() if distributed.get_world_size() > 1 else (on_device[0] if on_device else torch.device('cpu'))
        rows = []
        for name in names:
            total = torch.zeros(_NUM_MOMENTS, dtype=torch.float64, device=buffer_device)
            for counter in _counters[name].values():
                total += counter.to(buffer_device)
            rows.append(total)
        # The last row carries a checksum of the name list: after a sum over ranks it must equal
        # world_size times the local one, otherwise ranks reported different names.
        check = float(zlib.crc32('\n'.join(names).encode('utf-8')) % (1 << 24))
        rows.append(torch.tensor([check, float(len(names)), 1.0], dtype=torch.float64, device=buffer_device))
        buffer = torch.stack(rows)
        distributed.all_reduce_([buffer])
        buffer = buffer.cpu().numpy()  # the only host transfer
        world = distributed.get_world_size()
        if buffer[-1, 0] != check * world or buffer[-1, 1] != len(names) * world:
            raise RuntimeError('training_stats: ranks reported different statistic names; every rank must '
                               'report the same names (use report0 for rank-0-only values)')

        if not self._keep_previous:
            self._moments.clear()
        for name, totals in zip(names, buffer[:-1], strict=True):
            delta = totals - self._cumulative.get(name, np.zeros(_NUM_MOMENTS))
            self._cumulative[name] = totals
            if delta[0] > 0 or name not in self._moments:
                self._moments[name] = delta

    # Names with statistics available after the last update(), sorted.
    def names(self):
        return sorted(self._moments)

    # Number of elements reported under `name` during the last interval.
    def num(self, name):
        moments = self._moments.get(name)
        return 0 if moments is None else round(float(moments[0]))

    # Mean of the elements reported under `name` during the last interval (NaN if none).
    def mean(self, name):
        moments = self._moments.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        return float(moments[1] / moments[0])

    # Population standard deviation of those elements (NaN if none).
    def std(self, name):
        moments = self._moments.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        mean = moments[1] / moments[0]
        # Clamp: sum(x^2)/n - mean^2 can round to slightly below zero for near-constant values.
        return float(np.sqrt(max(moments[2] / moments[0] - mean * mean, 0.0)))

    # {name: EasyDict(num, mean, std)} for stats.jsonl.
    def as_dict(self):
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                                for name in self.names()})

    # Shorthand: collector['Loss/loss'] is collector.mean('Loss/loss').
    def __getitem__(self, name):
        return self.mean(name)

# ----------------------------------------------------------------------------
# The collector the training loop reports through (all names).

default_collector = Collector()
