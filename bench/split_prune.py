"""Benchmark: cost of one Split-and-Prune pass over the 63 DDLs of the reference CIFAR-10 net.

The node sets are the reference network's (`DDNGenerator(32, 3, max_blockn=32, max_outputk=64)`:
L = 63 DDLs, K = 64, each weight 192 x 128), with an EMA mirror and Adam state, as in training;
the convolutional blocks play no part in Split-and-Prune and are left out. Every step, each
layer observes one batch of random distances (not timed), then one pass runs:
- before: `split_and_prune_per_layer` below, the per-layer loop this project used up to commit
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

import copy
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli
from torch_utils import distributed
from torch_utils import distributed as dist
from training.ddl import DiscreteDistributionLayer
from training.split_prune import decide, find_node_sets, redistribute, split_and_prune

# ATen operations that only make views or metadata (no kernel runs).
METADATA_OPS = {
    'aten::view', 'aten::unbind', 'aten::select', 'aten::slice', 'aten::as_strided', 'aten::detach',
    'aten::alias', 'aten::expand', 'aten::reshape', 'aten::_reshape_alias', 'aten::unsqueeze',
    'aten::squeeze', 'aten::t', 'aten::transpose', 'aten::permute', 'aten::lift_fresh',
    'aten::result_type', 'aten::resolve_conj', 'aten::resolve_neg', 'aten::empty', 'aten::empty_strided',
    'aten::split', 'aten::split_with_sizes', 'aten::narrow', 'aten::_unsafe_view', 'detach',
}

# ----------------------------------------------------------------------------
# The per-layer Split-and-Prune pass as it was before batching (commit 3f4006a), kept as the
# "before" of this benchmark and as the reference the batched pass is tested against
# (tests/test_split_prune.py). Same decisions and arithmetic, one node set at a time.

@torch.no_grad()
def _copy_node_rows_per_layer(tensors, rows, do, s, d):
    ar = torch.arange(rows, device=do.device)
    dst = d * rows + ar
    src = torch.where(do, s * rows + ar, dst)
    for tensor in tensors:
        tensor.index_copy_(0, dst, tensor.index_select(0, src))

@torch.no_grad()
def split_and_prune_per_layer(model, optimizer=None, mirrors=(), rule='tv'):
    node_sets = find_node_sets(model)
    mirror_sets = [find_node_sets(m) for m in mirrors]
    device = node_sets[0].node_stats.count.device
    distributed.all_reduce_([t for ns in node_sets for t in ns.node_stats.pending_tensors()])
    for ns in node_sets:
        ns.node_stats.fold()
    total_splits = torch.zeros([], dtype=torch.int64, device=device)
    groups = {}
    for idx, ns in enumerate(node_sets):
        groups.setdefault((ns.K, ns.node_stats.track_near2), []).append(idx)
    for (K, track_near2), members in groups.items():
        stats = [node_sets[i].node_stats for i in members]
        count = torch.stack([st.count for st in stats])
        near2 = torch.stack([st.near2 for st in stats]) if track_near2 else None
        dist_acc = torch.stack([st.dist_acc for st in stats])
        decision = decide(count, dist_acc, rule=rule)
        new_count, new_near2, new_dist = redistribute(count, near2, dist_acc, decision)
        for g, st in enumerate(stats):
            st.count.copy_(new_count[g])
            if track_near2:
                st.near2.copy_(new_near2[g])
            st.dist_acc.copy_(new_dist[g])
            st.num_splits.add_(decision.do_split[g].long())
        total_splits += decision.do_split.sum()
        for g, i in enumerate(members):
            do, s, d = decision.do_split[g], decision.i_split[g], decision.i_prune[g]
            mirrored = [ms[i].node_params() for ms in mirror_sets]
            for p, (param, rows) in enumerate(node_sets[i].node_params()):
                tensors = [param.data] + [m[p][0].data for m in mirrored]
                if optimizer is not None:
                    state = optimizer.state.get(param, {})
                    tensors += [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]
                _copy_node_rows_per_layer(tensors, rows, do, s, d)
    return total_splits

# ----------------------------------------------------------------------------
# The reference net's node sets: L DDLs on 256 feature channels (leak: 128 per head), RGB, K = 64.

def make_setup(num_layers=63, K=64, device='cpu', seed=0):
    torch.manual_seed(seed)
    model = torch.nn.ModuleList([DiscreteDistributionLayer(256, 3, K, index=l, num_layers=num_layers)
                                 for l in range(num_layers)]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():                    # One step, so that Adam has state rows to copy.
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, ema, optimizer

# One batch of random selection distances (B, K) per layer, the same for both setups.
def observe_all(models, batch, generator):
    K = find_node_sets(models[0])[0].K
    for l in range(len(find_node_sets(models[0]))):
        dist = torch.rand(batch, K, generator=generator).to(find_node_sets(models[0])[l].node_stats.count.device)
        dist = dist ** 3                            # Uneven node usage, so that layers split.
        for model in models:
            find_node_sets(model)[l].node_stats.select(dist)

# Operations issued per pass (and kernels launched on CUDA), from one profiled pass.
def count_ops(fn, cuda):
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    ops = sum(1 for e in events if e.cpu_parent is None and e.name.startswith('aten::') and e.name not in METADATA_OPS)
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else None
    return ops, kernels

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
