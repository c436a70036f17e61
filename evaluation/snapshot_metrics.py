"""Metrics during training (train.py --metrics): each snapshot's samples against the training data.

`SnapshotMetrics` is what the training loop constructs by name (metric_kwargs.class_name, so that
training/ never imports evaluation/) and calls on every snapshot: samples of seeds 0..N-1 streamed
into the detector on all ranks, one line per snapshot in `metric-<name>.jsonl` and the best snapshot
so far in `metric-<name>-best.json`. The reference statistics of the training data are computed once
per dataset and detector, and cached.
"""

import hashlib
import json
import os
import re
import time

import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils.checkpoint import append_line, write_json
from evaluation.detectors import detector_name, load_detector
from evaluation.image_sources import generator_batches, image_batches
from evaluation.metrics import calc_metrics, load_ref, reference_stats, save_ref

# One training-time metric: its name, the kind of calc_metrics it runs, and how many samples.
def parse_training_metrics(spec):
    """'fid50k,kid10k,pr10k,fid200' -> [(name, kind, num)]; kinds fid, kid, pr; k = thousands."""
    names = spec.split(',') if isinstance(spec, str) else list(spec or [])
    out = []
    for name in (n.strip().lower() for n in names if n.strip()):
        m = re.fullmatch(r'(fid|kid|pr)(\d+)(k?)', name)
        if m is None:
            raise ValueError(f'Unknown metric {name!r}: expected fid, kid or pr followed by a sample count, '
                             'e.g. fid50k, fid10k, kid10k, pr10k, fid500')
        num = int(m.group(2)) * (1000 if m.group(3) else 1)
        if num < 2:
            raise ValueError(f'Metric {name!r}: needs at least 2 samples')
        if name not in [n for n, _, _ in out]:
            out.append((name, m.group(1), num))
    return out

# Identity of a file (path, size, modification time) or of a name/URL, for cache keys.
def _file_identity(path):
    if path and os.path.isfile(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, int(st.st_mtime)]
    return path

# Reference statistics of the training data with this detector, computed once and cached (keyed by dataset and detector).
def training_reference(dataset_kwargs, detector, detector_url=None, device=None, batch=64, cache_dir=None):
    kwargs = dict(dataset_kwargs, xflip=False, use_labels=False)    # The data as it is, without augmentation.
    dataset = dnnlib.util.construct_class_by_name(**kwargs)
    key = json.dumps(dict(dataset=kwargs, data=_file_identity(kwargs.get('path')), num=len(dataset),
                          shape=list(dataset.image_shape), detector=_file_identity(detector_name(detector_url))),
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]
    cache_dir = cache_dir or dnnlib.util.make_cache_dir_path('fid-refs')
    path = os.path.join(cache_dir, f'{dataset.name}-{digest}.npz')
    # Every rank agrees on whether the file is there (rank 0 may be writing it right now otherwise).
    found = torch.tensor([int(os.path.isfile(path))], device=device)
    dist.all_reduce_([found], op='min')
    if int(found):
        dist.print0(f'Reference statistics: {path} (cached)')
        return path, load_ref(path)
    dist.print0(f'Computing reference statistics of {len(dataset)} training images into {path}...')
    stats = reference_stats(image_batches(dataset, batch=batch, workers=0, progress=False), detector, device)
    if dist.get_rank() == 0:
        save_ref(path, stats['mu'], stats['sigma'], features=stats['features'], num=stats['num'],
                 detector=detector_name(detector_url), mu_s=stats.get('mu_s'), sigma_s=stats.get('sigma_s'))
    dist.barrier()
    return path, {key: stats[key] for key in ('mu', 'sigma', 'features', 'mu_s', 'sigma_s') if key in stats}

# Lower is better for these; precision/recall are two numbers, so no single "best".
_BEST_OF = {'fid': 'fid', 'kid': 'kid'}

class SnapshotMetrics:
    """Evaluates each training snapshot: samples of seeds 0..N-1 streamed into the detector on all ranks,
    one line per snapshot in `metric-<name>.jsonl`, the best snapshot so far in `metric-<name>-best.json`."""

    def __init__(self,
        metrics,                    # 'fid50k,kid10k' or a list of names (parse_training_metrics).
        run_dir,                    # Run folder (rank 0 writes there).
        dataset_kwargs,             # The training set: its reference statistics are computed from it.
        detector_url    = None,     # Detector name, path or URL; None = Inception-v3.
        trust_pickle    = False,    # Allow a detector pickle that runs code when loaded.
        batch           = 64,       # Samples per batch and rank.
        device          = None,     # Where to generate and detect.
        cache_dir       = None,     # Reference statistics cache; None = <ddn cache>/fid-refs.
    ):
        self.metrics = parse_training_metrics(metrics)
        self.run_dir, self.batch = run_dir, batch
        self.device = dist.device() if device is None else torch.device(device)
        self.detector_url = detector_url
        self.detector = load_detector(detector_url, self.device, trust_pickle=trust_pickle)
        self.ref_path, self.ref = training_reference(dataset_kwargs, self.detector, detector_url, self.device, batch, cache_dir)
        self.best = {}
        for name, _kind, _num in self.metrics:  # A resumed run continues the record of its folder.
            best_path = os.path.join(run_dir, f'metric-{name}-best.json')
            if os.path.isfile(best_path):
                with open(best_path) as f:
                    self.best[name] = json.load(f)

    # Evaluate `net` (the snapshot `snapshot` at `kimg`); returns {name: results}, the same on every rank.
    def __call__(self, net, snapshot, kimg):
        out = {}
        by_num = {}
        for name, kind, num in self.metrics:    # Metrics over the same samples share one generation.
            by_num.setdefault(num, []).append((name, kind))
        rank, world = dist.get_rank(), dist.get_world_size()
        for num, group in by_num.items():
            start = time.time()
            kinds = sorted({kind for _, kind in group})
            batches = generator_batches(net, range(num)[rank::world], batch=self.batch)
            results = calc_metrics(batches, self.ref, kinds, detector=self.detector, device=self.device)
            seconds = time.time() - start
            for name, kind in group:
                out[name] = results
                self._record(name, kind, results, snapshot, kimg, seconds)
        return out

    def _record(self, name, kind, results, snapshot, kimg, seconds):
        keys = {'fid': ['fid'], 'kid': ['kid', 'kid_se'], 'pr': ['precision', 'recall']}[kind]
        values = {key: results[key] for key in keys}
        line = dict(metric=name, snapshot=snapshot, kimg=kimg, num=results['num'], results=values,
                    total_time=seconds, detector=detector_name(self.detector_url), ref=self.ref_path, timestamp=time.time())
        text = f'{name} {snapshot}: ' + '  '.join(f'{k} {v:.6g}' for k, v in values.items()) + f'  ({seconds:.1f} s)'
        if kind in _BEST_OF:
            line['value'] = value = values[_BEST_OF[kind]]
            best = self.best.get(name)
            if best is None or value < best['value']:
                best = self.best[name] = dict(metric=name, snapshot=snapshot, kimg=kimg, value=value)
                if dist.get_rank() == 0:
                    write_json(os.path.join(self.run_dir, f'metric-{name}-best.json'), best)
            text += f'  best {best["value"]:.6g} at {best["snapshot"]}'
        if dist.get_rank() == 0:
            append_line(os.path.join(self.run_dir, f'metric-{name}.jsonl'), json.dumps(line))
        dist.print0(text)

# ----------------------------------------------------------------------------
